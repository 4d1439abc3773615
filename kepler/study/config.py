"""The study config: loading and checking it, the trainer override strings a run is built from, and
a run's code layout (read off its quantizer).

See :mod:`kepler.study` for the config's keys.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kepler.io.config import load_prior_config
from kepler.io.config_files import CONFIGS_DIR, builtin_config_path, resolve_config
from kepler.metrics import bits_per_position
from kepler.nn.protocol import DEFAULT_TYPE

if TYPE_CHECKING:
    from kepler.nn import Quantizer

SWEEP_MARKER = "sweep"
# The prior of a run models that run's tokenizer on that run's images: these keys of its data
# section follow the tokenizer run's config (so bits per image and PSNR are measured on the same
# held-out images), and these keys are the run's; a study's prior settings may set neither.
PRIOR_DATA_FROM_TOKENIZER = ("train", "val", "size", "resize", "val_max_images")
PRIOR_KEYS_OF_THE_RUN = ("tokenizer.checkpoint", "run_dir", "seed", "name")


def load_study_config(path: str | os.PathLike, quick: bool = False) -> dict:
    """The study config at ``path`` as plain containers, checked; with ``quick`` its ``quick`` block
    replaces ``seeds``/``jobs`` and is merged over ``common``, ``sweep`` and the prior's ``set``.

    ``path`` is a file or a built-in config name (:func:`kepler.io.config_files.resolve_config`).
    ``base`` (the trainer config) and the prior's ``config`` are resolved relative to the study
    config's folder, else they are built-in names; a built-in config is kept as its name. ``prior``
    is None without a prior block, else ``{"config", "set"}``.
    """
    from omegaconf import OmegaConf

    path = resolve_config(path)
    study = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(study, dict):
        raise ValueError(f"study config {path} must be a mapping")
    for key in ("base", "variants", "seeds"):
        if key not in study:
            raise ValueError(f"study config {path} has no {key!r} entry")
    study["base"] = _config_beside(path, study["base"]) if study["base"] else None
    study.setdefault("prior", None)
    prior = study["prior"]
    if prior is not None:
        if not isinstance(prior, dict) or not isinstance(prior.get("config"), str) or not prior["config"]:
            raise ValueError(f"study config {path}: 'prior' must be a mapping whose 'config' names a prior config "
                             f"(a file or a built-in name, e.g. prior_sample), got {prior!r}")
        settings = prior.get("set") or {}
        if not isinstance(settings, dict):
            raise ValueError(f"study config {path}: the prior's 'set' must be a mapping of prior config "
                             f"overrides, got {settings!r}")
        study["prior"] = {"config": _config_beside(path, prior["config"]), "set": settings}
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
        if study["prior"] is not None:
            study["prior"]["set"] = {**study["prior"]["set"], **block.get("prior", {})}
    study.pop("quick", None)
    study["quick"] = bool(quick)
    _check_study(study, path)
    return study


def select_variants(study: dict, names: Sequence[str]) -> dict:
    """``study`` with only the variants ``names`` and the references they are compared to, added
    where not named (their runs are the same runs a full study trains, so it reuses them later); an
    added reference keeps no reference of its own.
    The weight sweep is kept only when a kept variant takes a weight from it. ValueError naming the
    study's variants for an unknown or empty selection."""
    variants = study["variants"]
    unknown = [n for n in names if n not in variants]
    if not names or unknown:
        raise ValueError(f"study {study['name']}: unknown variant(s) {', '.join(unknown) or '(none given)'}; "
                         f"its variants are {', '.join(variants)}")
    wanted = set(names) | {variants[n]["compare_to"] for n in names if variants[n].get("compare_to")}
    # The config's order; an added reference is not compared with its own reference.
    kept = {n: {**v, "compare_to": v.get("compare_to") if v.get("compare_to") in wanted else None}
            for n, v in variants.items() if n in wanted}
    needs_sweep = any(SWEEP_MARKER in v["set"].values() for v in kept.values())
    return {**study, "variants": kept, "sweep": study["sweep"] if needs_sweep else None}


def _config_beside(study_path: Path, config: str) -> str:
    """A config that the study config at ``study_path`` names (``base``, ``prior.config``): relative to
    the study config's folder, kept as relative as the study config's path was given (the path lands
    in study.json and in each run's result.json, whose reuse check compares it); else a built-in name.
    A config among the built-in ones is kept as its name (the loaders resolve it): the same in a
    checkout and in an installed package, whose folder would be a machine path there."""
    beside = Path(os.path.normpath(study_path.parent / config))
    if beside.resolve().parent == CONFIGS_DIR:
        return beside.stem
    if beside.is_file() or builtin_config_path(str(config)) is None:
        return str(beside)
    return config


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
    if study["prior"] is not None:
        for key in study["prior"]["set"]:
            if key in PRIOR_KEYS_OF_THE_RUN:
                raise ValueError(f"study config {path}: the prior sets {key!r}, which each run sets "
                                 f"({', '.join(PRIOR_KEYS_OF_THE_RUN)}: the run's tokenizer, folder, seed and name)")
            if key in {f"data.{k}" for k in PRIOR_DATA_FROM_TOKENIZER}:
                raise ValueError(f"study config {path}: the prior sets {key!r}, which follows the tokenizer run's "
                                 "config (the prior models the run's codes of the run's images): set it under 'common'")
        # Now, not when the first prior trains after its tokenizer: a bad key or value fails at once.
        overrides = [override_string(k, v) for k, v in study["prior"]["set"].items()]
        try:
            load_prior_config(study["prior"]["config"], overrides, check_tokenizer=False)
        except (ValueError, FileNotFoundError) as error:
            raise type(error)(f"study config {path}: prior: {error}") from error
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
    """``key=value`` as the trainer's :func:`kepler.io.config.load_config` parses it."""
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
    # A residual quantizer's tokens are its stages' partitions: each stage quantizes the whole latent.
    stages = int(getattr(quantizer, "num_quantizers", 1))
    sub_dim = codewords.shape[-1] if codewords is not None else quantizer.dim * stages // quantizer.tokens_per_position
    return {
        "type": str(quantizer_config.get("type", DEFAULT_TYPE)),
        "partitions": quantizer.tokens_per_position,
        "stages": stages,
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
