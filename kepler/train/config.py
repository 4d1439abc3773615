"""Training configuration: YAML files merged over typed defaults (OmegaConf), plus ``key=value``
command-line overrides. Unknown keys are an error naming the key.

One source of defaults: the ``model``, ``model.quantizer`` and ``loss`` sections are the keyword
arguments of :class:`kepler.models.VQModel`, of the quantizer class that ``model.quantizer.type``
names (:func:`kepler.nn.register_quantizer`; ``kepler`` by default) and of
:class:`kepler.models.VQGANLoss`, with their defaults read off the constructors' signatures (their
docstrings say what each key means). The other sections are defined here.

Built-in configs: the YAML files in ``kepler/configs/`` ship inside the package, so ``kepler train
sample`` works from an installed wheel. :func:`resolve_config` turns a path or a built-in name into a
file (an existing file wins over a name); :func:`builtin_configs` lists them.

Learning rate: with ``optim.scale_lr: true`` (taming's rule) the rate used is
``base_lr * batch_size * grad_accum * world_size``; otherwise ``base_lr`` itself.
"""

from __future__ import annotations

import inspect
import math
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from kepler import _backend
from kepler.models import CodeTransformer, VQGANLoss, VQModel
from kepler.nn import quantizer_class
from kepler.nn.protocol import DEFAULT_TYPE

# The sections that are not a constructor's keyword arguments, written as classes so that every
# section, these and the constructors' (``model``, ``model.quantizer``, ``loss``), gives its keys'
# defaults and types the same way: its signature and annotations.
@dataclass
class RunSection:
    name: str = "run"
    run_dir: str | None = None  # default: runs/<name>
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:<i>


@dataclass
class DataSection:
    train: str = "sample"  # sample | faces | a folder of images | a list file
    val: str = "sample"
    size: int = 256
    resize: int | None = None  # shorter side before cropping; default size (2 * size for "sample")
    random_crop: bool = True
    flip: bool = True
    batch_size: int = 5
    num_workers: int = 0
    samples_per_epoch: int = 1024  # length of an epoch of the embedded "sample" set
    val_batch_size: int = 16
    val_max_images: int | None = None


@dataclass
class OptimSection:
    name: str = "adam"  # adam | adamw
    base_lr: float = 4.5e-6
    scale_lr: bool = True
    betas: Sequence[float] = (0.5, 0.9)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine (to min_lr_ratio * lr at max_steps)
    min_lr_ratio: float = 0.0
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    grad_accum: int = 1


@dataclass
class TrainSection:
    max_steps: int = 1000
    time_limit_minutes: float | None = None  # stop (then evaluate and save) after this much training time
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    eval_every: int = 500
    ckpt_every: int = 500
    log_every: int = 10
    grid_images: int = 8
    progress: bool = True
    threads: int | None = None  # torch.set_num_threads on CPU; None = torch's default
    init_from: str | None = None  # start from this checkpoint's model weights (kepler convert's or a run's)


@dataclass
class TokenizerSection:
    checkpoint: str | None = None  # the frozen tokenizer of a prior: a run's checkpoint or an exported folder


class Range(typing.NamedTuple):
    """Allowed values of a number: ``low <= value`` (``low < value`` if ``low_open``), ``value <= high``."""

    low: float
    high: float | None = None
    low_open: bool = False

    def admits(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        return above and (self.high is None or value <= self.high)

    def __str__(self) -> str:
        low = f"> {self.low}" if self.low_open else f">= {self.low}"
        return low if self.high is None else f"{low} and <= {self.high}"


# Ranges and choices of the keys whose classes do not check them on construction (the quantizers
# check their own arguments). A range applies to each item of a list.
AT_LEAST_1, AT_LEAST_0, POSITIVE = Range(1), Range(0), Range(0, low_open=True)
RANGES: dict[str, Range] = {
    **{f"model.{key}": AT_LEAST_1 for key in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels",
                                              "resolution", "in_channels", "out_ch", "norm_groups", "embed_dim")},
    "model.dropout": Range(0, 1),
    **{f"loss.{key}": AT_LEAST_0 for key in ("disc_start", "codebook_weight", "pixel_weight", "perceptual_weight",
                                             "disc_weight", "disc_factor")},
    **{f"loss.{key}": AT_LEAST_1 for key in ("disc_num_layers", "disc_ndf", "disc_in_channels")},
    "data.size": AT_LEAST_1, "data.resize": AT_LEAST_1, "data.batch_size": AT_LEAST_1,
    "data.num_workers": AT_LEAST_0, "data.samples_per_epoch": AT_LEAST_1, "data.val_batch_size": AT_LEAST_1,
    "data.val_max_images": AT_LEAST_1,
    "optim.base_lr": POSITIVE, "optim.weight_decay": AT_LEAST_0, "optim.warmup_steps": AT_LEAST_0,
    "optim.min_lr_ratio": Range(0, 1), "optim.grad_clip": AT_LEAST_0, "optim.grad_accum": AT_LEAST_1,
    "train.max_steps": AT_LEAST_1, "train.time_limit_minutes": POSITIVE, "train.eval_every": AT_LEAST_1,
    "train.ckpt_every": AT_LEAST_1, "train.log_every": AT_LEAST_1, "train.grid_images": AT_LEAST_0,
    "train.threads": AT_LEAST_1,
}
CHOICES: dict[str, tuple[str, ...]] = {
    "optim.name": ("adam", "adamw"),
    "optim.schedule": ("constant", "cosine"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "model.quantizer.backend": ("auto", *_backend.BACKENDS),
    "model.order": ("flat", "factorized"),
}
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")

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


def builtin_config_path(name: str) -> Path | None:
    """The file of the built-in config ``name``, or None if there is none (without reading any)."""
    path = CONFIGS_DIR / f"{name}.yaml"
    return path if Path(name).name == name and path.is_file() else None


def constructor_defaults(cls: type, exclude: Iterable[str] = ()) -> dict:
    """The keyword arguments of ``cls``'s constructor and their defaults, as config values (tuples
    become lists; an argument without a default is OmegaConf's ``MISSING``: the config must set it)."""
    defaults = {}
    for name, param in inspect.signature(cls).parameters.items():
        if name in exclude or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        value = MISSING if param.default is param.empty else param.default
        defaults[name] = list(value) if isinstance(value, tuple) else value
    return defaults


def _sections(quantizer_type: str) -> dict:
    """Config section -> the class whose constructor it configures, and the arguments it leaves out
    (``None``: the top-level keys)."""
    return {
        None: (RunSection, ()),
        "model": (VQModel, ("quantizer",)),
        "model.quantizer": (quantizer_class(quantizer_type), ("dim",)),
        "loss": (VQGANLoss, ()),
        "data": (DataSection, ()),
        "optim": (OptimSection, ()),
        "train": (TrainSection, ()),
    }


def _prior_sections() -> dict:
    """The sections of a prior's config (``kepler prior train``): ``model`` is the
    :class:`~kepler.models.CodeTransformer`'s keyword arguments (its layout comes from the tokenizer)."""
    return {
        None: (RunSection, ()),
        "tokenizer": (TokenizerSection, ()),
        "model": (CodeTransformer, ("layout",)),
        "data": (DataSection, ()),
        "optim": (OptimSection, ()),
        "train": (TrainSection, ()),
    }


def _section_types(sections: dict) -> dict[str, object]:
    """Dotted config key -> its type annotation, for the keys of ``sections`` (see :func:`_sections`)."""
    annotations = {}
    for section, (cls, exclude) in sections.items():
        hints = typing.get_type_hints(cls.__init__)
        for name in constructor_defaults(cls, exclude):
            annotations[name if section is None else f"{section}.{name}"] = hints.get(name, typing.Any)
    return annotations


def defaults(quantizer_type: str = DEFAULT_TYPE) -> dict:
    """Every config key and its default, for a model whose quantizer is ``quantizer_type``."""
    sections = {name: constructor_defaults(cls, exclude) for name, (cls, exclude) in _sections(quantizer_type).items()}
    sections["model.quantizer"] = {"type": quantizer_type, **sections["model.quantizer"]}
    return {
        **sections[None],
        "model": {**sections["model"], "quantizer": sections["model.quantizer"]},
        **{name: sections[name] for name in ("loss", "data", "optim", "train")},
    }


def key_types(quantizer_type: str = DEFAULT_TYPE) -> dict[str, object]:
    """Dotted config key -> its type annotation (``int``, ``float | None``, ``Sequence[int]``, ...)."""
    return {"model.quantizer.type": str, **_section_types(_sections(quantizer_type))}


def _quantizer_type(layers: Sequence[tuple[str, DictConfig]]) -> tuple[str, int]:
    """``model.quantizer.type`` as the last layer that sets it says (the default otherwise), and the
    index of the last layer that changed it (0 if none did)."""
    quantizer_type, changed_at = DEFAULT_TYPE, 0
    for index, (source, layer) in enumerate(layers):
        value = OmegaConf.select(layer, "model.quantizer.type", default=None)
        if value is not None:
            if not isinstance(value, str):
                raise ValueError(f"model.quantizer.type in {source} must be a name, got {value!r}")
            if value != quantizer_type:
                changed_at = index
            quantizer_type = value
    return quantizer_type, changed_at


def _without_quantizer(layer: DictConfig) -> DictConfig:
    """``layer`` without its ``model.quantizer`` section."""
    layer = layer.copy()
    model = OmegaConf.select(layer, "model", default=None)
    if isinstance(model, DictConfig) and "quantizer" in model:
        model.pop("quantizer")
    return layer


def _read_yaml(path: str | os.PathLike) -> DictConfig:
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


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> DictConfig:
    """Defaults, merged with the YAML file at ``path`` (or the built-in config of that name, see
    :func:`resolve_config`; None: defaults only), then with ``overrides``
    (``"optim.base_lr=1e-4"`` dotlist strings), then checked against the schema (:func:`key_types`,
    :data:`RANGES`, :data:`CHOICES`). Raises ValueError naming an unknown key, a bad override or a
    value of the wrong type or range, FileNotFoundError for a missing file."""
    layers = []
    if path is not None:
        layers.append((str(path), _read_yaml(path)))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
    if overrides:
        layers.append(("overrides", OmegaConf.from_dotlist(list(overrides))))
    cfg = _merged(layers)
    _check_backend_runs_here(cfg)
    _check_init_from_exists(cfg)
    return cfg


def load_prior_config(path: str | os.PathLike | None, overrides: Sequence[str] = (),
                      check_tokenizer: bool = True) -> DictConfig:
    """A prior's config (:func:`_prior_sections`), merged and checked as :func:`load_config` does;
    ``tokenizer.checkpoint`` must name an existing file or folder, unless ``check_tokenizer`` is
    False (``kepler study`` checks its prior settings before the tokenizers exist)."""
    layers = [] if path is None else [(str(path), _read_yaml(path))]
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
    if overrides:
        layers.append(("overrides", OmegaConf.from_dotlist(list(overrides))))
    sections = _prior_sections()
    default_values = constructor_defaults(RunSection) | {
        name: constructor_defaults(cls, exclude) for name, (cls, exclude) in sections.items() if name
    }
    # A transformer's usual optimizer, not the GAN's Adam(0.5, 0.9).
    default_values["optim"].update(name="adamw", betas=[0.9, 0.95])
    cfg = _merged_into(default_values, layers, _section_types(sections))
    _check_init_from_exists(cfg)
    if not check_tokenizer:
        return cfg
    tokenizer = cfg.tokenizer.checkpoint
    if tokenizer is None:
        raise ValueError("config key 'tokenizer.checkpoint' is not set: a prior needs its tokenizer "
                         "(a run's checkpoints/last.pt or an exported folder)")
    if not os.path.exists(tokenizer):
        raise ValueError(f"config key 'tokenizer.checkpoint': tokenizer {tokenizer} does not exist")
    return cfg


def _merged(layers: Sequence[tuple[str, DictConfig]]) -> DictConfig:
    """The defaults with ``(source, layer)`` merged over them in order, checked: unknown keys, values
    of the wrong type or range (:func:`_check_values`) and keys left without a value are a
    ValueError naming them.

    A layer that changes ``model.quantizer.type`` starts the quantizer section afresh: the layers
    before it keep everything but their ``model.quantizer`` keys, which were another type's
    (``configs/sample.yaml model.quantizer.type=fsq`` is an FSQ model with sample.yaml's settings)."""
    quantizer_type, changed_at = _quantizer_type(layers)
    layers = [(source, _without_quantizer(layer)) for source, layer in layers[:changed_at]] + list(layers[changed_at:])
    return _merged_into(defaults(quantizer_type), layers, key_types(quantizer_type))


def _merged_into(default_values: dict, layers: Sequence[tuple[str, DictConfig]], types_of: dict) -> DictConfig:
    """``default_values`` with the layers merged over them, checked against ``types_of`` (dotted key
    -> annotation; see :func:`_merged`)."""
    cfg = OmegaConf.create(default_values)
    OmegaConf.set_struct(cfg, True)
    for source, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except ConfigKeyError as exc:
            raise ValueError(f"unknown config key {exc.full_key!r} in {source}") from None
        except OmegaConfBaseException as exc:
            raise ValueError(f"bad config value in {source}: {exc.msg}") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(f"config keys without a value: {', '.join(missing)}")
    _check_values(cfg, types_of)
    return cfg


def _expected(value: object, hint: object) -> str | None:
    """None if ``value`` fits the type annotation ``hint``, else what was expected, in words."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        problem = _expected(value, inner)
        return None if problem is None else f"{problem} or null"
    if hint is bool:
        return None if isinstance(value, bool) else "true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok else "a finite number"
    if hint is str:
        return None if isinstance(value, str) else "a string"
    if origin in (list, tuple, Sequence) and args:
        if not isinstance(value, (list, tuple, ListConfig)) or any(_expected(item, args[0]) for item in value):
            item_kind = _expected(object(), args[0]).removeprefix("a ").removeprefix("an ")
            return f"a list of {item_kind}s"
    return None


def _check_values(cfg: DictConfig, types_of: dict) -> None:
    """Every key's value against its type annotation in ``types_of``, then :data:`RANGES`,
    :data:`CHOICES` and the device's form: a ValueError naming the first bad key."""
    for key, hint in types_of.items():
        value = OmegaConf.select(cfg, key)
        problem = _expected(value, hint)
        if problem is not None:
            raise ValueError(f"config key {key!r} must be {problem}, got {value!r}")
        if value is None:
            continue
        items = value if isinstance(value, (list, tuple, ListConfig)) else [value]
        if key in RANGES and not all(RANGES[key].admits(item) for item in items):
            raise ValueError(f"config key {key!r} must be {RANGES[key]}, got {value!r}")
        if key in CHOICES and value not in CHOICES[key]:
            raise ValueError(f"config key {key!r} must be one of {', '.join(CHOICES[key])}, got {value!r}")
    if not DEVICE_PATTERN.fullmatch(cfg.device):
        raise ValueError(f"config key 'device' must be auto, cpu, cuda or cuda:<index>, got {cfg.device!r}")


def _check_backend_runs_here(cfg: DictConfig) -> None:
    """A kernel backend named in a training config must run on this machine's training device (a
    saved config is not checked this way: a checkpoint trained on a GPU loads on a CPU)."""
    backend = OmegaConf.select(cfg, "model.quantizer.backend")
    if backend not in (None, "auto"):
        device_type = "cuda" if cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
        reason = _backend._unavailable_reason(backend, device_type)
        if reason is not None:
            raise ValueError(f"config key 'model.quantizer.backend' is {backend!r}, which cannot run here: {reason}")


def _check_init_from_exists(cfg: DictConfig) -> None:
    """``train.init_from`` of a training config must be a file now (a saved config is not checked
    this way: the run that started from it may outlive the file)."""
    path = cfg.train.init_from
    if path is not None and not os.path.isfile(path):
        raise ValueError(f"config key 'train.init_from': checkpoint {path} does not exist")


def model_config(config: object, source: str) -> dict:
    """The ``model`` section of a saved config (a checkpoint's ``config``), checked as
    :func:`load_config` checks a file, defaults filled in: plain containers for
    :meth:`kepler.models.VQModel.from_config`. ValueError, one line, naming ``source`` otherwise."""
    if not isinstance(config, Mapping) or not isinstance(config.get("model"), Mapping):
        raise ValueError(f"{source} has no model config (its config must map 'model' to a section)")
    try:
        layer = OmegaConf.create({"model": dict(config["model"])})
    except OmegaConfBaseException as exc:
        raise ValueError(f"bad config value in {source}: {exc.msg}") from None
    return to_dict(_merged([(source, layer)]))["model"]


def build_optimizer(optim: DictConfig, params, lr: float) -> torch.optim.Optimizer:
    """The optimizer an ``optim`` section names (``adam`` or ``adamw``), at learning rate ``lr``."""
    optim_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optim.name]
    return optim_cls(params, lr=lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)


def to_dict(cfg: DictConfig) -> dict:
    """Plain, resolved Python containers (what checkpoints store and models are built from)."""
    return OmegaConf.to_container(cfg, resolve=True)
