"""The study config: loading and checking it, the trainer override strings a run is built from, and
a run's code layout (read off its quantizer).

See :mod:`kepler.study` for the config's keys.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from kepler.metrics import bits_per_position
from kepler.nn.protocol import DEFAULT_TYPE

if TYPE_CHECKING:
    from kepler.nn import Quantizer

SWEEP_MARKER = "sweep"


def load_study_config(path: str | os.PathLike, quick: bool = False) -> dict:
    """The study config at ``path`` as plain containers, checked; with ``quick`` its ``quick`` block
    replaces ``seeds``/``jobs`` and is merged over ``common`` and ``sweep``.

    ``path`` is a file or a built-in config name (:func:`kepler.train.config.resolve_config`).
    ``base`` (the trainer config) is resolved relative to the study config's folder, else it is a
    built-in name; a built-in base is kept as its name.
    """
    from omegaconf import OmegaConf

    from kepler.train.config import CONFIGS_DIR, builtin_config_path, resolve_config

    path = resolve_config(path)
    study = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(study, dict):
        raise ValueError(f"study config {path} must be a mapping")
    for key in ("base", "variants", "seeds"):
        if key not in study:
            raise ValueError(f"study config {path} has no {key!r} entry")
    # Relative to the study config's folder, kept as relative as the config path was given: the
    # path lands in study.json and in each run's result.json (the reuse check compares it). A base
    # among the built-in configs is kept as its name (load_config resolves it): the same in a
    # checkout and in an installed package, whose folder would be a machine path there.
    if study["base"]:
        beside = Path(os.path.normpath(path.parent / study["base"]))
        if beside.resolve().parent == CONFIGS_DIR:
            study["base"] = beside.stem
        elif beside.is_file() or builtin_config_path(str(study["base"])) is None:
            study["base"] = str(beside)
    else:
        study["base"] = None
    study.setdefault("name", path.stem)
    study.setdefault("out", f"runs/{study['name']}")
    study.setdefault("jobs", 1)
    study.setdefault("common", {})
    study.setdefault("sweep", None)
    if quick:
        block = study.get("quick") or {}
        for key in ("seeds", "jobs", "threads", "out"):
            if key in block:
                study[key] = block[key]
        study["common"] = {**study["common"], **block.get("common", {})}
        if study["sweep"] is not None:
            sweep = dict(study["sweep"])
            sweep.update({k: v for k, v in block.get("sweep", {}).items() if k != "weights"})
            if "weights" in block.get("sweep", {}):
                sweep["weights"] = {**sweep["weights"], **block["sweep"]["weights"]}
            study["sweep"] = sweep
    study.pop("quick", None)
    study["quick"] = bool(quick)
    _check_study(study, path)
    return study


def _check_study(study: dict, path: Path) -> None:
    variants = study["variants"]
    if not isinstance(variants, dict) or not variants:
        raise ValueError(f"study config {path}: 'variants' must be a non-empty mapping")
    seeds = study["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"study config {path}: 'seeds' must be a non-empty list of ints, got {seeds!r}")
    if not isinstance(study["jobs"], int) or study["jobs"] < 1:
        raise ValueError(f"study config {path}: 'jobs' must be an int >= 1, got {study['jobs']!r}")
    swept_keys = set((study["sweep"] or {}).get("weights", {}))
    for name, variant in variants.items():
        settings = variant.get("set", {}) if isinstance(variant, dict) else None
        if settings is None or not isinstance(settings, dict):
            raise ValueError(f"study config {path}: variant {name!r} must be a mapping with a 'set' mapping")
        reference = variant.get("compare_to")
        if reference is not None and reference not in variants:
            raise ValueError(f"study config {path}: variant {name!r} compares to unknown variant {reference!r}")
        for key, value in settings.items():
            if value == SWEEP_MARKER and key not in swept_keys:
                raise ValueError(
                    f"study config {path}: variant {name!r} takes {key!r} from the sweep, "
                    f"but the sweep has no weights for it"
                )
    sweep = study["sweep"]
    if sweep is not None:
        if sweep.get("variant") not in variants:
            raise ValueError(f"study config {path}: the sweep's 'variant' must name a variant, got {sweep.get('variant')!r}")
        for key, weight in (sweep.get("reference") or {}).items():
            if key not in sweep.get("weights", {}) or weight in sweep["weights"][key]:
                raise ValueError(
                    f"study config {path}: the sweep's reference for {key!r} must name a swept key "
                    f"and a weight that is not one of its candidates, got {weight!r}"
                )
        for key, weights in sweep.get("weights", {}).items():
            if not isinstance(weights, list) or not weights or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0 for w in weights
            ):
                raise ValueError(
                    f"study config {path}: sweep weights for {key!r} must be a list of positive numbers "
                    f"(write 1.0e-3, not 1e-3, in YAML), got {weights!r}"
                )


def override_string(key: str, value) -> str:
    """``key=value`` as the trainer's :func:`kepler.train.config.load_config` parses it."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (list, tuple, dict)):
        text = json.dumps(value)
    else:
        text = str(value)
    return f"{key}={text}"


def quantizer_layout(quantizer: Quantizer, quantizer_config: Mapping) -> dict:
    """A run's code layout, from its quantizer (the protocol: tokens per position ``P``, codes ``K``,
    the codewords' width, shared or not, bits per position) and its config section (init and the two
    regularizers' weights, for the report; ``"-"`` and 0 for a quantizer type without them)."""
    codewords = quantizer.codewords()
    sub_dim = codewords.shape[-1] if codewords is not None else quantizer.dim // quantizer.tokens_per_position
    return {
        "type": str(quantizer_config.get("type", DEFAULT_TYPE)),
        "partitions": quantizer.tokens_per_position,
        "num_codes": quantizer.codebook_size,
        "sub_dim": int(sub_dim),
        "shared_codebook": quantizer.shared_codebook,
        "init": str(quantizer_config.get("init", "-")),
        "kepler_kl_weight": float(quantizer_config.get("kepler_kl_weight", 0.0)),
        "packing_weight": float(quantizer_config.get("packing_weight", 0.0)),
        "bits": bits_per_position(quantizer.codebook_size, quantizer.tokens_per_position),
    }


def sweep_references(sweep: Mapping) -> dict:
    """Per swept key, the weight its candidates are judged against: the config's ``reference`` for
    that key, else 0 (the regularizer off)."""
    references = sweep.get("reference") or {}
    return {key: float(references.get(key, 0.0)) for key in sweep["weights"]}
