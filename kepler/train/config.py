"""Training configuration: YAML files merged over typed defaults (OmegaConf), plus ``key=value``
command-line overrides. Unknown keys are an error naming the key.

One source of defaults: the ``model``, ``model.quantizer`` and ``loss`` sections are the keyword
arguments of :class:`kepler.models.VQModel`, of the quantizer class that ``model.quantizer.type``
names (:func:`kepler.nn.register_quantizer`; ``kepler`` by default) and of
:class:`kepler.models.VQGANLoss`, with their defaults read off the constructors' signatures (their
docstrings say what each key means). The other sections are defined here.

Learning rate: with ``optim.scale_lr: true`` (taming's rule) the rate used is
``base_lr * batch_size * grad_accum * world_size``; otherwise ``base_lr`` itself.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable, Mapping, Sequence

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from kepler.models import VQGANLoss, VQModel
from kepler.nn import quantizer_class
from kepler.nn.protocol import DEFAULT_TYPE

# The sections that are not a constructor's keyword arguments. ``model`` (VQModel), ``model.quantizer``
# (the class ``model.quantizer.type`` names) and ``loss`` (VQGANLoss) are read off the constructors.
RUN_DEFAULTS: dict = {
    "name": "run",
    "run_dir": None,  # default: runs/<name>
    "seed": 0,
    "device": "auto",  # auto | cpu | cuda | cuda:<i>
}
DATA_DEFAULTS: dict = {
    "train": "sample",  # sample | faces | a folder of images | a list file
    "val": "sample",
    "size": 256,
    "resize": None,  # shorter side before cropping; default size (2 * size for "sample")
    "random_crop": True,
    "flip": True,
    "batch_size": 5,
    "num_workers": 0,
    "samples_per_epoch": 1024,  # length of an epoch of the embedded "sample" set
    "val_batch_size": 16,
    "val_max_images": None,
}
OPTIM_DEFAULTS: dict = {
    "name": "adam",  # adam | adamw
    "base_lr": 4.5e-6,
    "scale_lr": True,
    "betas": [0.5, 0.9],
    "weight_decay": 0.0,
    "warmup_steps": 0,
    "schedule": "constant",  # constant | cosine (to min_lr_ratio * lr at max_steps)
    "min_lr_ratio": 0.0,
    "grad_clip": 0.0,  # max global grad norm; 0 = off
    "grad_accum": 1,
}
TRAIN_DEFAULTS: dict = {
    "max_steps": 1000,
    "time_limit_minutes": None,  # stop (then evaluate and save) after this much training time
    "precision": "auto",  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    "eval_every": 500,
    "ckpt_every": 500,
    "log_every": 10,
    "grid_images": 8,
    "progress": True,
    "threads": None,  # torch.set_num_threads on CPU; None = torch's default
}


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


def defaults(quantizer_type: str = DEFAULT_TYPE) -> dict:
    """Every config key and its default, for a model whose quantizer is ``quantizer_type``."""
    quantizer = {"type": quantizer_type, **constructor_defaults(quantizer_class(quantizer_type), exclude=("dim",))}
    return {
        **RUN_DEFAULTS,
        "model": {**constructor_defaults(VQModel, exclude=("quantizer",)), "quantizer": quantizer},
        "loss": constructor_defaults(VQGANLoss),
        "data": dict(DATA_DEFAULTS),
        "optim": dict(OPTIM_DEFAULTS),
        "train": dict(TRAIN_DEFAULTS),
    }


def _quantizer_type(layers: Sequence[tuple[str, DictConfig]]) -> str:
    """``model.quantizer.type`` as the last layer that sets it says (the default otherwise)."""
    quantizer_type = DEFAULT_TYPE
    for source, layer in layers:
        value = OmegaConf.select(layer, "model.quantizer.type", default=None)
        if value is not None:
            if not isinstance(value, str):
                raise ValueError(f"model.quantizer.type in {source} must be a name, got {value!r}")
            quantizer_type = value
    return quantizer_type


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> DictConfig:
    """Defaults, merged with the YAML file at ``path`` (None: defaults only), then with ``overrides``
    (``"optim.base_lr=1e-4"`` dotlist strings). Raises ValueError naming an unknown key or a bad
    override, FileNotFoundError for a missing file."""
    layers = []
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file {path} does not exist")
        layers.append((str(path), OmegaConf.load(path)))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
    if overrides:
        layers.append(("overrides", OmegaConf.from_dotlist(list(overrides))))
    return _merged(layers)


def _merged(layers: Sequence[tuple[str, DictConfig]]) -> DictConfig:
    """The defaults with ``(source, layer)`` merged over them in order, checked: unknown keys, bad
    values, keys left without a value and numbers that are not numbers are a ValueError naming them."""
    schema = defaults(_quantizer_type(layers))
    cfg = OmegaConf.create(schema)
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
    _check_types(cfg, schema, "")
    return cfg


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


def _check_types(cfg: DictConfig, defaults: dict, prefix: str) -> None:
    """Numbers and booleans in the defaults must stay numbers and booleans (bools are not numbers here)."""
    for key, default in defaults.items():
        value = cfg[key]
        name = f"{prefix}{key}"
        if isinstance(default, dict):
            _check_types(value, default, name + ".")
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"config key {name!r} must be true or false, got {value!r}")
        elif isinstance(default, (int, float)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"config key {name!r} must be a number, got {value!r}")


def to_dict(cfg: DictConfig) -> dict:
    """Plain, resolved Python containers (what checkpoints store and models are built from)."""
    return OmegaConf.to_container(cfg, resolve=True)
