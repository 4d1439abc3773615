"""Configs: YAML files merged over typed defaults (OmegaConf), plus ``key=value`` overrides, checked.

Two kinds of config, each a set of sections (:data:`CONFIG_KINDS`):

* ``"tokenizer"`` (``kepler train``): ``model`` (with ``model.quantizer``), ``loss``, ``data``,
  ``optim``, ``train`` and the top-level run keys;
* ``"prior"`` (``kepler prior train``): ``tokenizer``, ``model``, ``data``, ``optim``, ``train`` and
  the run keys.

One source of defaults: a section is either a dataclass (:class:`RunSection`, :class:`OptimSection`,
... here; :class:`kepler.data.DataSection` beside the data sources) or the keyword arguments of the
class that registered itself for it with :func:`register_section` (``model``: :class:`kepler.models.VQModel` or
:class:`kepler.models.CodeTransformer`; ``loss``: :class:`kepler.models.VQGANLoss`;
``model.quantizer``: the quantizer class ``model.quantizer.type`` names, see
:func:`kepler.nn.register_quantizer`). Keys, defaults and types are read off the signature and its
annotations (the class's docstring says what each key means). Unknown keys, values of the wrong
type, outside :data:`RANGES` or not among :data:`CHOICES` are a one-line ValueError naming the key.

Files: :mod:`kepler.io.config_files` reads a YAML file or a built-in config by name.

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

import torch
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from kepler import _backend
from kepler.data.sources import DataSection
from kepler.io.config_files import read_yaml
from kepler.nn.protocol import DEFAULT_TYPE, quantizer_class

CONFIG_KINDS = ("tokenizer", "prior")


# The sections that are not a constructor's keyword arguments, written as classes so that every
# section gives its keys' defaults and types the same way: its signature and annotations.
@dataclass
class RunSection:
    name: str = "run"
    run_dir: str | None = None  # default: runs/<name>
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:<i>


@dataclass
class OptimSection:
    name: str = "adam"  # adam | adamw
    base_lr: float = 4.5e-6
    scale_lr: bool = True
    betas: Sequence[float] = (0.5, 0.9)  # the GAN's (taming's)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine (to min_lr_ratio * lr at max_steps)
    min_lr_ratio: float = 0.0
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    grad_accum: int = 1


@dataclass
class PriorOptimSection(OptimSection):
    """A transformer's usual optimizer, not the GAN's Adam(0.5, 0.9)."""

    name: str = "adamw"
    betas: Sequence[float] = (0.9, 0.95)


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
    threads: int | None = None  # torch.set_num_threads on CPU; None = torch's default (every core)
    init_from: str | None = None  # start from this model's weights (kepler.load: a checkpoint or a folder)
    ema_decay: float | None = None  # an EMA of the model's weights, saved beside them and used to evaluate; None = off
    compile: bool = False  # torch.compile the training forwards (tokenizer, discriminator, prior); validation stays eager
    # How long a rank waits for the others in a collective before it stops with an error (another
    # rank died or hangs): more than any work one rank does alone (rank 0 encoding a prior's codes).
    dist_timeout_minutes: float = 30.0


@dataclass
class TokenizerSection:
    checkpoint: str | None = None  # the frozen tokenizer of a prior: a run's checkpoint or an exported folder


class Range(typing.NamedTuple):
    """Allowed values of a number: ``low <= value`` (``low < value`` if ``low_open``), ``value <= high``
    (``value < high`` if ``high_open``)."""

    low: float
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def admits(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        low = f"> {self.low}" if self.low_open else f">= {self.low}"
        return low if self.high is None else f"{low} and {'<' if self.high_open else '<='} {self.high}"


# Seeds reach torch.manual_seed and numpy's generators: both take 0 <= seed < 2**63.
MAX_SEED = 2**63 - 1

# Ranges and choices of the keys whose classes do not check them on construction (the quantizers
# check their own arguments). A range applies to each item of a list.
AT_LEAST_1, AT_LEAST_0, POSITIVE = Range(1), Range(0), Range(0, low_open=True)
RANGES: dict[str, Range] = {
    **{f"model.{key}": AT_LEAST_1 for key in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels",
                                              "resolution", "in_channels", "out_ch", "norm_groups", "embed_dim")},
    "model.dropout": Range(0, 1),
    **{f"loss.{key}": AT_LEAST_0 for key in ("disc_start", "codebook_weight", "pixel_weight", "perceptual_weight",
                                             "disc_weight", "disc_factor", "lecam_weight", "dino_layers")},
    **{f"loss.{key}": AT_LEAST_1 for key in ("disc_num_layers", "disc_ndf", "disc_in_channels", "dino_resolution")},
    "data.size": AT_LEAST_1, "data.resize": AT_LEAST_1, "data.batch_size": AT_LEAST_1,
    "data.num_workers": AT_LEAST_0, "data.samples_per_epoch": AT_LEAST_1, "data.val_batch_size": AT_LEAST_1,
    "data.val_max_images": AT_LEAST_1, "data.shuffle_buffer": AT_LEAST_1,
    "optim.base_lr": POSITIVE, "optim.weight_decay": AT_LEAST_0, "optim.warmup_steps": AT_LEAST_0,
    "optim.min_lr_ratio": Range(0, 1), "optim.grad_clip": AT_LEAST_0, "optim.grad_accum": AT_LEAST_1,
    "train.max_steps": AT_LEAST_1, "train.time_limit_minutes": POSITIVE, "train.eval_every": AT_LEAST_1,
    "train.ckpt_every": AT_LEAST_1, "train.log_every": AT_LEAST_1, "train.grid_images": AT_LEAST_0,
    "train.threads": AT_LEAST_1, "train.ema_decay": Range(0, 1, low_open=True, high_open=True),
    "train.dist_timeout_minutes": POSITIVE,
    "seed": Range(0, MAX_SEED),
}
CHOICES: dict[str, tuple[str, ...]] = {
    "optim.name": ("adam", "adamw"),
    "optim.schedule": ("constant", "cosine"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "model.quantizer.backend": ("auto", *_backend.BACKENDS),
    "model.order": ("flat", "factorized"),
    "data.labels": ("auto", "none"),
}
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")

# ---------------------------------------------------------------------------------------- sections

# (kind, section) -> (class whose constructor's keyword arguments are the section, arguments left out)
_REGISTERED: dict[tuple[str, str], tuple[type, tuple[str, ...]]] = {}


def register_section(kind: str, section: str, exclude: Iterable[str] = ()):
    """Class decorator: the decorated class's keyword arguments (less ``exclude``) are the config
    section ``section`` of ``kind`` configs, e.g. ``@register_section("tokenizer", "model",
    exclude=("quantizer",))`` on :class:`kepler.models.VQModel`."""
    if kind not in CONFIG_KINDS:
        raise ValueError(f"unknown config kind {kind!r}; expected one of {CONFIG_KINDS}")

    def register(cls: type) -> type:
        _REGISTERED[(kind, section)] = (cls, tuple(exclude))
        return cls

    return register


def _registered(kind: str, section: str) -> tuple[type, tuple[str, ...]]:
    try:
        return _REGISTERED[(kind, section)]
    except KeyError:  # kepler/__init__.py imports kepler.models, whose classes register themselves
        raise RuntimeError(f"no class is registered for section {section!r} of {kind} configs "
                           "(kepler.models registers them when imported)") from None


def _sections(kind: str, quantizer_type: str = DEFAULT_TYPE) -> dict:
    """Config section (``None``: the top-level keys) -> (the class whose constructor it configures,
    the arguments it leaves out), for ``kind`` configs."""
    if kind == "tokenizer":
        return {
            None: (RunSection, ()),
            "model": _registered(kind, "model"),
            "model.quantizer": (quantizer_class(quantizer_type), ("dim",)),
            "loss": _registered(kind, "loss"),
            "data": (DataSection, ()),
            "optim": (OptimSection, ()),
            "train": (TrainSection, ()),
        }
    if kind == "prior":
        return {
            None: (RunSection, ()),
            "tokenizer": (TokenizerSection, ()),
            "model": _registered(kind, "model"),
            "data": (DataSection, ()),
            "optim": (PriorOptimSection, ()),
            "train": (TrainSection, ()),
        }
    raise ValueError(f"unknown config kind {kind!r}; expected one of {CONFIG_KINDS}")


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


def defaults(kind: str = "tokenizer", quantizer_type: str = DEFAULT_TYPE) -> dict:
    """Every key of a ``kind`` config and its default (a tokenizer's quantizer of ``quantizer_type``)."""
    values: dict = {}
    for section, (cls, exclude) in _sections(kind, quantizer_type).items():
        keys = constructor_defaults(cls, exclude)
        if section is None:
            values.update(keys)
        elif section == "model.quantizer":
            values["model"]["quantizer"] = {"type": quantizer_type, **keys}
        else:
            values[section] = keys
    return values


def key_types(kind: str = "tokenizer", quantizer_type: str = DEFAULT_TYPE) -> dict[str, object]:
    """Dotted config key -> its type annotation (``int``, ``float | None``, ``Sequence[int]``, ...)."""
    annotations: dict[str, object] = {"model.quantizer.type": str} if kind == "tokenizer" else {}
    for section, (cls, exclude) in _sections(kind, quantizer_type).items():
        hints = typing.get_type_hints(cls.__init__)
        for name in constructor_defaults(cls, exclude):
            annotations[name if section is None else f"{section}.{name}"] = hints.get(name, typing.Any)
    return annotations


def config_layers(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> list[tuple[str, DictConfig]]:
    """``(source, layer)`` of the YAML file at ``path`` (None: none), then of the ``key=value``
    ``overrides`` (dotlist strings, e.g. ``"optim.base_lr=1e-4"``), in the order they merge."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
    layers = [] if path is None else [(str(path), read_yaml(path))]
    if overrides:
        try:
            layers.append(("overrides", OmegaConf.from_dotlist(list(overrides))))
        except OmegaConfBaseException as exc:
            raise ValueError(f"bad override: {exc.msg}") from None
    return layers


# ---------------------------------------------------------------------------------------- merging


def merge_config(kind: str, layers: Sequence[tuple[str, DictConfig]]) -> DictConfig:
    """The defaults of ``kind`` with ``(source, layer)`` merged over them in order, checked: unknown
    keys, values of the wrong type or range (:func:`_check_values`) and keys left without a value
    are a ValueError naming them.

    A tokenizer layer that changes ``model.quantizer.type`` starts the quantizer section afresh: the
    layers before it keep everything but their ``model.quantizer`` keys, which were another type's
    (``configs/sample.yaml model.quantizer.type=fsq`` is an FSQ model with sample.yaml's settings)."""
    quantizer_type = DEFAULT_TYPE
    if kind == "tokenizer":
        quantizer_type, changed_at = _quantizer_type(layers)
        layers = [(source, _without_quantizer(layer)) for source, layer in layers[:changed_at]] + list(layers[changed_at:])
    default_values = defaults(kind, quantizer_type)
    cfg = OmegaConf.create(default_values)
    OmegaConf.set_struct(cfg, True)
    for source, layer in layers:
        _check_sections_not_null(layer, default_values, source)
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except ConfigKeyError as exc:
            raise ValueError(f"unknown config key {exc.full_key!r} in {source}{_kind_hint(kind, exc.full_key)}") from None
        except OmegaConfBaseException as exc:
            raise ValueError(f"bad config value in {source}: {exc.msg}") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(f"config keys without a value: {', '.join(missing)}")
    _check_values(cfg, key_types(kind, quantizer_type))
    return cfg


def _check_sections_not_null(layer: DictConfig, default_values: Mapping, source: str, prefix: str = "") -> None:
    """A section left empty in YAML (``loss:`` with nothing under it) reads as null and would wipe
    every key of the section: a ValueError naming it instead."""
    for key, default in default_values.items():
        if isinstance(default, Mapping) and key in layer:
            value = layer[key]
            if value is None:
                raise ValueError(f"config section '{prefix}{key}' in {source} is empty (null): give it keys or "
                                 "leave it out")
            if isinstance(value, DictConfig):
                _check_sections_not_null(value, default, source, f"{prefix}{key}.")


def _kind_hint(kind: str, key: str) -> str:
    """Why a key is unknown when it belongs to the other kind of config (a prior's config read as a
    tokenizer's, or the other way round)."""
    other = "prior" if kind == "tokenizer" else "tokenizer"
    section, _, name = key.partition(".")
    if section and name and (other, section) in _REGISTERED:
        cls, exclude = _REGISTERED[(other, section)]
        if name.split(".")[0] in constructor_defaults(cls, exclude):
            return f" (it is a key of a {other}'s config: is this a {other}, not a {kind}?)"
    return ""


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


# ---------------------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = (), kind: str = "tokenizer") -> DictConfig:
    """A ``kind`` config to train from: the defaults, merged with the YAML file at ``path`` (or the
    built-in config of that name, see :func:`kepler.io.config_files.resolve_config`; None: defaults only), then with
    ``overrides`` (``"optim.base_lr=1e-4"`` dotlist strings), checked (:func:`merge_config`) and
    checked for training here: a kernel backend the config names must run on this machine's
    training device, ``train.init_from`` must exist. Raises ValueError naming an unknown key, a bad
    override or a value of the wrong type or range, FileNotFoundError for a missing file."""
    cfg = merge_config(kind, config_layers(path, overrides))
    _check_backend_runs_here(cfg)
    path = cfg.train.init_from
    if path is not None and not os.path.exists(path):
        raise ValueError(f"config key 'train.init_from': {path} does not exist")
    return cfg


def load_prior_config(path: str | os.PathLike | None, overrides: Sequence[str] = (),
                      check_tokenizer: bool = True) -> DictConfig:
    """:func:`load_config` of a prior (``kind="prior"``); ``tokenizer.checkpoint`` must name an
    existing file or folder, unless ``check_tokenizer`` is False (``kepler study`` checks its prior
    settings before the tokenizers exist)."""
    cfg = load_config(path, overrides, kind="prior")
    if not check_tokenizer:
        return cfg
    tokenizer = cfg.tokenizer.checkpoint
    if tokenizer is None:
        raise ValueError("config key 'tokenizer.checkpoint' is not set: a prior needs its tokenizer "
                         "(a run's checkpoints/last.pt or an exported folder)")
    if not os.path.exists(tokenizer):
        raise ValueError(f"config key 'tokenizer.checkpoint': tokenizer {tokenizer} does not exist")
    return cfg


def _check_backend_runs_here(cfg: DictConfig) -> None:
    """A kernel backend named in a training config must run on this machine's training device (a
    saved config is not checked this way: a checkpoint trained on a GPU loads on a CPU)."""
    backend = OmegaConf.select(cfg, "model.quantizer.backend")
    if backend not in (None, "auto"):
        device_type = "cuda" if cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
        reason = _backend._unavailable_reason(backend, device_type)
        if reason is not None:
            raise ValueError(f"config key 'model.quantizer.backend' is {backend!r}, which cannot run here: {reason}")


def model_section(config: object, source: str, kind: str = "tokenizer") -> dict:
    """The ``model`` section of a saved ``kind`` config: :func:`saved_sections` of it alone."""
    return saved_sections(config, source, kind)["model"]


def saved_sections(config: object, source: str, kind: str = "tokenizer",
                   sections: Sequence[str] = ("model",)) -> dict[str, dict]:
    """``sections`` of a saved ``kind`` config (a checkpoint's ``config``, an exported folder's
    ``config.yaml``), checked together as :func:`load_config` checks a file, defaults filled in:
    plain containers to build a model from. ValueError, one line, naming ``source`` otherwise."""
    for section in sections:
        if not isinstance(config, Mapping) or not isinstance(config.get(section), Mapping):
            raise ValueError(f"{source} has no {section} config (its config must map {section!r} to a section)")
    try:
        layer = OmegaConf.create({section: dict(config[section]) for section in sections})
        merged = to_dict(merge_config(kind, [(source, layer)]))
    except OmegaConfBaseException as exc:
        raise ValueError(f"bad config value in {source}: {exc.msg}") from None
    except ValueError as exc:  # a bad value's message names the key; say whose config it is
        raise ValueError(str(exc) if source in str(exc) else f"{source}: {exc}") from None
    return {section: merged[section] for section in sections}


def to_dict(cfg: DictConfig) -> dict:
    """Plain, resolved Python containers (what checkpoints store and models are built from)."""
    return OmegaConf.to_container(cfg, resolve=True)
