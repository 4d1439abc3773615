"""Released Kepler Codebook and taming-transformers checkpoints as kepler :class:`VQModel`\\ s.

The released Kepler Codebook code is taming-transformers with a partitioned quantizer. Both save a
Lightning checkpoint of ``taming.models.vqgan.VQModel``: a dict whose ``state_dict`` holds the
weights under ``encoder.``, ``decoder.``, ``quant_conv.``, ``quantize.`` and ``post_quant_conv.``
(``loss.*``, optimizer states and Lightning's bookkeeping are not the model and are ignored), with a
YAML config whose ``model.params`` describe it. :func:`from_taming` reads both and returns a kepler
model that computes the same thing: the same code indices, quantized latents and reconstructions
(up to float32 rounding).

Config (``model.params``) -> kepler ``model`` section (:func:`taming_config`):

* ``ddconfig`` ``ch, ch_mult, num_res_blocks, attn_resolutions, z_channels, resolution,
  in_channels, out_ch, dropout`` keep their names; ``norm_groups`` is taming's 32. Options kepler's
  architecture does not have (``double_z: true``, ``resamp_with_conv: false``, ...) are an error;
  keys taming itself ignores (``name``, ``semantic_channels``) are ignored.
* ``embed_dim`` as is; ``n_embed``, ``partitions`` and ``scale`` -> ``quantizer.num_codes``,
  ``partitions``, ``scale``; ``partitionconfig.target`` ``...GroupPartition``,
  ``...CustomPartition``, ``...LayerPartition`` -> ``quantizer.partition`` ``group``, ``custom``,
  ``layer`` (:mod:`kepler.partition` follows the released row order exactly);
  ``keplerlossconfig`` (``use``, ``kl_weight``) -> ``quantizer.kepler_kl_weight``.
* taming's own ``VectorQuantizer2`` (a config without ``partitions``): one partition of
  ``n_embed`` codes. Both quantizers hard-code ``beta = 0.25`` and the legacy loss order, and share
  one codebook among partitions.

Parameter names, taming -> kepler (:func:`kepler_state_dict`):

* ``...nin_shortcut.*`` -> ``...shortcut.*``;
* attention ``q``, ``k``, ``v`` (``(C, C, 1, 1)`` each) -> one ``qkv`` ``(3C, C, 1, 1)``, in that order;
* ``encoder.down.<i>.downsample.*`` -> ``encoder.down.<i>.resample.*``;
* ``decoder.up.<i>.*`` -> ``decoder.up.<L-1-i>.*`` (taming numbers the decoder's levels from the
  highest resolution, kepler in the order they run), ``upsample`` -> ``resample``;
* ``quantize.embedding.weight`` -> ``quantize.codebook``.

Kepler's own buffers (code counts, the KL prior) start as a new model's. The released KL prior was
drawn from numpy's global RNG and never saved, so no seed reproduces it: with ``use: true`` the
converted model's prior is kepler's grid prior with ``kl_prior_seed: 0`` (this changes the training
loss only; indices, latents and reconstructions do not depend on it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kepler.io.config import model_section, to_dict
from kepler.io.config_files import read_yaml
from kepler.io.weights import RefusedGlobals, check_state_dict, load_weights
from kepler.models.load import meta_skeleton
from kepler.models.vqmodel import VQModel

log = logging.getLogger("kepler")

MODEL_TARGET = "taming.models.vqgan.VQModel"
PARTITION_CLASSES = {"GroupPartition": "group", "CustomPartition": "custom", "LayerPartition": "layer"}
# The weights' prefixes in a Lightning checkpoint that belong to the model (``loss.*`` does not).
MODEL_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "quantize.", "post_quant_conv.")
# Both released quantizers are built with these (taming.models.vqgan.VQModel passes beta=0.25).
RELEASED_QUANTIZER = {"shared_codebook": True, "beta": 0.25, "legacy": True, "init": "uniform"}

_DDCONFIG_REQUIRED = ("ch", "out_ch", "num_res_blocks", "attn_resolutions", "in_channels", "resolution", "z_channels")
_DDCONFIG_DEFAULTS = {"ch_mult": [1, 2, 4, 8], "dropout": 0.0}  # taming's Encoder/Decoder defaults
# ddconfig options that change what taming computes, and the one value kepler's architecture has.
_DDCONFIG_FIXED = {"double_z": False, "resamp_with_conv": True, "give_pre_end": False, "tanh_out": False,
                   "use_linear_attn": False, "attn_type": "vanilla"}
# taming's VQLPIPSWithDiscriminator arguments -> kepler's VQGANLoss, with taming's defaults.
_LOSS_TARGET = "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"
_LOSS_KEYS = {"disc_start": ("disc_start", None), "codebook_weight": ("codebook_weight", 1.0),
              "pixelloss_weight": ("pixel_weight", 1.0), "perceptual_weight": ("perceptual_weight", 1.0),
              "disc_weight": ("disc_weight", 1.0), "disc_factor": ("disc_factor", 1.0),
              "disc_num_layers": ("disc_num_layers", 3), "disc_ndf": ("disc_ndf", 64),
              "disc_in_channels": ("disc_in_channels", 3), "disc_loss": ("disc_loss", "hinge")}
_LOSS_UNSUPPORTED = {"disc_conditional": False, "use_actnorm": False}


def _section(parent: Mapping, key: str, where: str, source: str) -> Mapping:
    value = parent.get(key)
    if not isinstance(value, Mapping):
        raise ValueError(f"{source}: {where}{key} must be a mapping, got {value!r}")
    return value


def _class_name(target: Any, where: str, source: str) -> str:
    if not isinstance(target, str) or not target:
        raise ValueError(f"{source}: {where} must name a class, got {target!r}")
    return target.rpartition(".")[2]


def _architecture(params: Mapping, source: str) -> dict:
    """``model.params.ddconfig`` -> kepler's architecture keys."""
    dd = _section(params, "ddconfig", "model.params.", source)
    missing = [key for key in _DDCONFIG_REQUIRED if key not in dd]
    if missing:
        raise ValueError(f"{source}: model.params.ddconfig.{missing[0]} is missing")
    for key, only in _DDCONFIG_FIXED.items():
        if key in dd and dd[key] != only:
            raise ValueError(
                f"{source}: model.params.ddconfig.{key} is {dd[key]!r}; kepler's VQModel has only {key}={only!r}"
            )
    dd = {**_DDCONFIG_DEFAULTS, **dd}
    return {
        "ch": dd["ch"],
        "ch_mult": list(dd["ch_mult"]),
        "num_res_blocks": dd["num_res_blocks"],
        "attn_resolutions": list(dd["attn_resolutions"]),
        "z_channels": dd["z_channels"],
        "resolution": dd["resolution"],
        "in_channels": dd["in_channels"],
        "out_ch": dd["out_ch"],
        "dropout": dd["dropout"],
        "norm_groups": 32,  # taming's Normalize: GroupNorm(32, C)
        "zero_init_residual": False,
    }


def _quantizer(params: Mapping, source: str) -> dict:
    """``n_embed``, ``partitions``, ``scale``, ``partitionconfig``, ``keplerlossconfig`` -> kepler's quantizer."""
    if params.get("remap") is not None:
        raise ValueError(f"{source}: model.params.remap is {params['remap']!r}; kepler has no index remapping")
    if "n_embed" not in params:
        raise ValueError(f"{source}: model.params.n_embed is missing")
    quantizer = {"type": "kepler", "num_codes": params["n_embed"], **RELEASED_QUANTIZER}
    released = "partitions" in params or "partitionconfig" in params
    if not released:  # taming's VectorQuantizer2: every latent vector is one codeword
        return {**quantizer, "partitions": 1, "partition": "group", "scale": 1.0}
    for key in ("partitions", "scale", "partitionconfig"):
        if key not in params:
            raise ValueError(f"{source}: model.params.{key} is missing (the released VQModel needs it)")
    partition_cfg = _section(params, "partitionconfig", "model.params.", source)
    cls = _class_name(partition_cfg.get("target"), "model.params.partitionconfig.target", source)
    if cls not in PARTITION_CLASSES:
        raise ValueError(
            f"{source}: model.params.partitionconfig.target {partition_cfg.get('target')!r} is not a released "
            f"partition; kepler converts {', '.join(PARTITION_CLASSES)}"
        )
    partition_parts = (partition_cfg.get("params") or {}).get("partitions", params["partitions"])
    if partition_parts != params["partitions"]:
        # The released quantizer cuts rows of embed_dim / partitions, the partition class rows of
        # C / its own partitions: with two numbers the released model cannot run.
        raise ValueError(
            f"{source}: model.params.partitionconfig.params.partitions={partition_parts} differs from "
            f"model.params.partitions={params['partitions']}"
        )
    quantizer.update(partitions=params["partitions"], partition=PARTITION_CLASSES[cls], scale=params["scale"])
    kl_cfg = params.get("keplerlossconfig")
    kl_params = (kl_cfg.get("params") or {}) if isinstance(kl_cfg, Mapping) else {}
    if kl_params.get("use"):
        rows = kl_params.get("n_e", params["n_embed"])
        if rows != params["n_embed"]:
            raise ValueError(
                f"{source}: model.params.keplerlossconfig.params.n_e={rows} differs from n_embed="
                f"{params['n_embed']}; kepler's KL prior has n_embed rows"
            )
        quantizer.update(kepler_kl_weight=float(kl_params.get("kl_weight", 0.0)), kl_prior="grid", kl_prior_seed=0)
    return quantizer


def _loss(params: Mapping, source: str) -> dict:
    """``model.params.lossconfig`` -> kepler's ``loss`` section (empty: kepler's defaults)."""
    loss_cfg = params.get("lossconfig")
    if not isinstance(loss_cfg, Mapping) or loss_cfg.get("target") != _LOSS_TARGET:
        target = loss_cfg.get("target") if isinstance(loss_cfg, Mapping) else None
        log.warning("%s: lossconfig %r is not %s; the loss section keeps kepler's defaults", source, target,
                    _LOSS_TARGET)
        return {}
    loss_params = loss_cfg.get("params") or {}
    for key, only in _LOSS_UNSUPPORTED.items():
        if loss_params.get(key, only) != only:
            log.warning("%s: lossconfig.params.%s=%r has no kepler equivalent; fine-tuning uses %s=%r",
                        source, key, loss_params[key], key, only)
    loss = {}
    for key, (kepler_key, default) in _LOSS_KEYS.items():
        value = loss_params.get(key, default)
        if value is not None:
            loss[kepler_key] = value
    return loss


def taming_config(config: Mapping, source: str = "taming config") -> dict:
    """A released (or taming) YAML config, loaded as plain containers -> a kepler training config.

    Returns ``{"model", "loss", "data", "optim"}`` sections (``data.size`` is the training
    resolution, ``optim`` taming's learning-rate rule); ``["model"]`` builds the model with
    :meth:`VQModel.from_config`. Raises ValueError, one line starting with ``source``, for a config
    that kepler cannot express.
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"{source}: expected a mapping with a 'model' section, got {type(config).__name__}")
    model = _section(config, "model", "", source)
    target = model.get("target", MODEL_TARGET)
    if target != MODEL_TARGET:
        raise ValueError(f"{source}: model.target {target!r} is not {MODEL_TARGET}, the model kepler converts")
    params = _section(model, "params", "model.", source)
    if "embed_dim" not in params:
        raise ValueError(f"{source}: model.params.embed_dim is missing")
    arch = _architecture(params, source)
    kepler = {
        "model": {**arch, "embed_dim": params["embed_dim"], "quantizer": _quantizer(params, source)},
        "loss": _loss(params, source),
        "data": {"size": arch["resolution"]},
        "optim": {"scale_lr": True, "betas": [0.5, 0.9]},
    }
    if "base_learning_rate" in model:
        kepler["optim"]["base_lr"] = float(model["base_learning_rate"])
    return kepler


def read_taming_config(config: str | os.PathLike | Mapping) -> tuple[dict, str]:
    """``(plain containers, source)`` of a YAML file path or an already-loaded mapping.

    Read with OmegaConf, as taming does (so ``1e-8`` is a number, not YAML 1.1's string).
    """
    if isinstance(config, Mapping):
        return dict(config), "taming config"
    return to_dict(read_yaml(config)), f"config file {config}"


def load_taming_checkpoint(
    checkpoint: str | os.PathLike, trusted_globals: Sequence[str] = (), stubbed_globals: Sequence[str] = ()
) -> dict:
    """A Lightning checkpoint read with ``weights_only=True``, checked to hold a ``state_dict`` of
    named tensors.

    ``trusted_globals``, ``stubbed_globals``: see :func:`kepler.io.weights.load_weights`. A checkpoint
    that asks for more (Lightning 1.x keys its ``callbacks`` by class, later versions keep
    ``hyper_parameters`` as OmegaConf containers) is a one-line ValueError naming the globals and the
    deliberate ways to allow them; it is never loaded unsafely.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    source = f"checkpoint {path}"
    try:
        state = load_weights(path, source, trusted_globals=trusted_globals, stubbed_globals=stubbed_globals)
    except RefusedGlobals as exc:
        flags = " ".join(f"--stub-global {name}" for name in exc.names)
        raise ValueError(
            f"{exc}. To read it, name them deliberately: `kepler convert ... {flags}` reads them as inert "
            f"placeholders (nothing of theirs runs; the weights must still be tensors), --trust-global NAME "
            f"imports NAME and lets it run (only for a file you trust); in Python, stubbed_globals=[...] or "
            f"trusted_globals=[...] (or torch.serialization.add_safe_globals)"
        ) from None
    if not isinstance(state, Mapping) or not isinstance(state.get("state_dict"), Mapping):
        found = ", ".join(repr(k) for k in list(state)[:5]) if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(
            f"{source} has no 'state_dict' mapping (a Lightning checkpoint keeps the weights there); it holds {found}"
        )
    bad = next((k for k, v in state["state_dict"].items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)),
               None)
    if bad is not None:
        raise ValueError(f"{source}: state_dict entry {bad!r} is not a named tensor")
    return dict(state)


def _taming_names(key: str, levels: int) -> list[str] | None:
    """The taming weight(s) that make kepler's ``key`` (three for a fused ``qkv``); None for a buffer
    that only kepler has."""
    if key == "quantize.codebook":
        return ["quantize.embedding.weight"]
    if key.startswith("quantize."):
        return None
    parts = key.split(".")
    if parts[:2] == ["decoder", "up"]:
        parts[2] = str(levels - 1 - int(parts[2]))
    renames = {"shortcut": "nin_shortcut", "resample": "downsample" if parts[0] == "encoder" else "upsample"}
    parts = [renames.get(p, p) for p in parts]
    if "qkv" in parts:
        at = parts.index("qkv")
        return [".".join(parts[:at] + [name] + parts[at + 1 :]) for name in ("q", "k", "v")]
    return [".".join(parts)]


def kepler_state_dict(taming_state: Mapping[str, torch.Tensor], model: VQModel, source: str) -> dict:
    """Taming's weights laid out as ``model``'s state dict (see the module docs for the names), without
    the buffers only kepler has; ``model`` may be a ``meta``-device skeleton.

    Raises ValueError, one line starting with ``source``: a weight the config needs is missing, has
    another shape (the key and both shapes are named), or the checkpoint has weights the config does
    not describe.
    """
    levels = len(model.decoder.up)
    converted, used = {}, set()
    for key, target in model.state_dict().items():
        names = _taming_names(key, levels)
        if names is None:
            continue
        expected = (target.shape[0] // len(names), *target.shape[1:])
        pieces = []
        for name in names:
            if name not in taming_state:
                raise ValueError(f"{source}: {name!r} is missing (the config needs it, of shape {expected})")
            tensor = taming_state[name]
            if tuple(tensor.shape) != expected:
                raise ValueError(
                    f"{source}: {name!r} has shape {tuple(tensor.shape)} in the checkpoint, the config needs {expected}"
                )
            pieces.append(tensor.to(target.dtype))
            used.add(name)
        converted[key] = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    unexpected = [k for k in taming_state if k.startswith(MODEL_PREFIXES) and k not in used]
    unexpected += [k for k in taming_state if not k.startswith(MODEL_PREFIXES + ("loss.",))]
    if unexpected:
        hint = ""
        if any(".gn." in k for k in unexpected):
            hint = "; '.gn.' weights come from the released taming/bn.py myGroupNorm, which kepler does not implement"
        raise ValueError(
            f"{source}: {len(unexpected)} weight(s) the config does not describe, the first {unexpected[0]!r} "
            f"of shape {tuple(taming_state[unexpected[0]].shape)}{hint}"
        )
    return converted


def taming_model(taming_state: Mapping[str, torch.Tensor], model_cfg: Mapping, source: str) -> VQModel:
    """The kepler model of ``model_cfg`` (:func:`taming_config`'s ``"model"``) holding taming's
    weights ``taming_state`` (a checkpoint's ``state_dict``), in eval mode.

    The config is checked as a config file is, and the weights' names and shapes against a ``meta``
    skeleton, before the model is allocated: a config describing a huge model is refused, not built."""
    section = model_section({"model": dict(model_cfg)}, source)
    skeleton = meta_skeleton(lambda: VQModel.from_config(section), source)
    converted = kepler_state_dict(taming_state, skeleton, source)
    model = VQModel.from_config(section)
    weights = {**model.state_dict(), **converted}  # kepler's own buffers start as a new model's
    check_state_dict(model, weights, source)
    model.load_state_dict(weights)
    return model.eval()


def from_taming(
    checkpoint: str | os.PathLike,
    config: str | os.PathLike | Mapping,
    trusted_globals: Sequence[str] = (),
    stubbed_globals: Sequence[str] = (),
) -> VQModel:
    """A kepler :class:`VQModel` (eval mode, CPU) from a released Lightning checkpoint and its YAML config.

    Args:
        checkpoint: the ``.ckpt`` file (read with ``weights_only=True``).
        config: its YAML config (a path, or the loaded mapping) with ``model.params``.
        trusted_globals, stubbed_globals: globals to allow while unpickling, imported or as inert
            placeholders (see :func:`load_taming_checkpoint`).

    The model maps images ``(B, in_channels, H, W)`` float32 in [-1, 1] to the released model's
    indices as ``(B, H/f, W/f, P)`` int64 (flattened, the released flat order), its quantized
    latents and its reconstructions. Raises ValueError (one line) for a config kepler cannot
    express or weights that do not match it.
    """
    return load_taming(checkpoint, config, trusted_globals, stubbed_globals)[3]


def load_taming(
    checkpoint: str | os.PathLike,
    config: str | os.PathLike | Mapping,
    trusted_globals: Sequence[str] = (),
    stubbed_globals: Sequence[str] = (),
) -> tuple[str, dict, dict, VQModel]:
    """What :func:`from_taming` and ``kepler convert`` read: the config's source name, its kepler
    config sections, the released checkpoint dict and the model."""
    plain, config_source = read_taming_config(config)
    sections = taming_config(plain, config_source)
    released = load_taming_checkpoint(checkpoint, trusted_globals, stubbed_globals)
    model = taming_model(released["state_dict"], sections["model"], f"checkpoint {checkpoint}")
    return config_source, sections, released, model
