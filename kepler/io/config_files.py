"""Config files: the built-in configs shipped inside the package, and reading one YAML file.

The YAML files in ``kepler/configs/`` are package data (setup.py ``package_data``), so ``kepler
train sample`` works from an installed wheel. :func:`resolve_config` turns a path or a built-in name
into a file (an existing file wins over a name); :func:`builtin_configs` lists them with the first
sentence of each file's leading comment as its description.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# The built-in configs: package data, installed with kepler (setup.py package_data).
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
# The first sentence of a config's leading comment block, which is its description.
_FIRST_SENTENCE = re.compile(r"^(.+?[.?!])(?:\s|$)")


@dataclass(frozen=True)
class BuiltinConfig:
    name: str
    path: Path
    kind: str  # "train" (for kepler train), "prior" (for kepler prior train) or "study" (for kepler study)
    description: str


def builtin_configs() -> dict[str, BuiltinConfig]:
    """The configs shipped with kepler, by name (the file name without ``.yaml``), sorted."""
    configs = {}
    for path in sorted(CONFIGS_DIR.glob("*.yaml")):
        text = path.read_text()
        comment = []
        for line in text.splitlines():
            if not line.startswith("#"):
                break
            comment.append(line.lstrip("#").strip())
        joined = " ".join(comment)
        match = _FIRST_SENTENCE.match(joined)
        keys = yaml.safe_load(text)
        kind = "train"
        if isinstance(keys, dict) and "variants" in keys:
            kind = "study"
        elif isinstance(keys, dict) and "tokenizer" in keys:
            kind = "prior"
        configs[path.stem] = BuiltinConfig(path.stem, path, kind, match.group(1) if match else joined)
    return configs


def builtin_config_path(name: str) -> Path | None:
    """The file of the built-in config ``name``, or None if there is none (without reading any)."""
    path = CONFIGS_DIR / f"{name}.yaml"
    return path if Path(name).name == name and path.is_file() else None


def resolve_config(config: str | os.PathLike) -> Path:
    """The config file that ``config`` names: an existing file at that path, else the built-in
    config of that name (:func:`builtin_configs`). FileNotFoundError naming the built-in names
    otherwise."""
    path = Path(config)
    if path.is_file():
        return path
    builtin = builtin_config_path(str(config))
    if builtin is not None:
        return builtin
    raise FileNotFoundError(
        f"config file {config} does not exist and is not a built-in config name "
        f"(built-in: {', '.join(builtin_configs())})"
    )


def read_yaml(path: str | os.PathLike) -> DictConfig:
    """The YAML file at ``path`` (or the built-in config of that name), which must hold a mapping
    of config keys."""
    path = resolve_config(path)
    try:
        layer = OmegaConf.load(path)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ValueError(f"config file {path} is not valid YAML{line}: {getattr(exc, 'problem', None) or exc}") from None
    except OmegaConfBaseException as exc:
        raise ValueError(f"config file {path}: {exc.msg}") from None
    if not isinstance(layer, DictConfig):
        raise ValueError(f"config file {path} must hold a mapping of config keys, got a {type(layer).__name__}")
    return layer
