"""The one loader: every form a model arrives in, as the model (``kepler.load``).

Forms (:func:`load_model` tells them apart by what the path holds):

* a training checkpoint (``kepler train``'s ``checkpoints/*.pt``): a :class:`~kepler.models.VQModel`;
* a prior's checkpoint (``kepler prior train``): a :class:`~kepler.models.CodeTransformer`;
* an exported folder (``kepler export``, ``save_pretrained``): a ``VQModel`` or a ``CodeTransformer``
  (its ``config.yaml`` says which), a prior's with its tokenizer inside;
* a converted released checkpoint (``kepler convert``'s ``OUT/model.pt``, or the folder ``OUT``):
  a ``VQModel``.

Every form is read without running code (``weights_only`` pickles, safetensors) and checked before
memory is spent on it: the saved config is checked as a config file is
(:func:`kepler.io.config.saved_sections`), the model is built on the ``meta`` device and the weights
are compared with it (:func:`kepler.io.weights.check_state_dict`: keys, shapes, finite values), and
only then is the real model allocated. Every problem is a one-line error naming the file.

A training checkpoint with an ``"ema"`` entry (``train.ema_decay``: the moving averages of the
parameters) loads the averaged weights (parameters from ``"ema"``, buffers from ``"model"``; both
checked) unless ``raw_weights`` asks for the trained ones; :attr:`LoadedModel.weights` says which. An
exported folder holds one set, the one it was exported with (its ``config.yaml`` says ``ema_decay``
for averaged weights).

A quantizer backend saved in the config that cannot run where the model is loaded (a model trained
with ``backend: cuda`` loaded on a CPU machine) is re-chosen for the device (``auto``), with a
warning saying so. A prior's tokenizer is loaded through the same loader and must be the file the
prior was trained on: :func:`load_prior_tokenizer` compares SHA-256s.

A prior saved before ``model.class_dropout`` existed was trained without class dropout and has no
null class: its config's missing key reads as 0, not as today's default (which would want a null
class row its weights do not have).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from kepler import _backend
from kepler.io.checkpoint import checkpoint_kind, load_checkpoint
from kepler.io.config import saved_sections
from kepler.io.files import file_sha256
from kepler.io.pretrained import PRIOR_TOKENIZER, WEIGHTS_FILE, read_manifest, read_pretrained
from kepler.io.weights import check_ema_weights, check_state_dict, error_line
from kepler.models.code_sequence import CodeLayout
from kepler.models.code_transformer import CodeTransformer
from kepler.models.vqmodel import VQModel

log = logging.getLogger("kepler")

# The checkpoint ``kepler convert`` writes into its output folder.
CONVERTED_CHECKPOINT = "model.pt"
MODEL_CLASSES = {"tokenizer": VQModel, "prior": CodeTransformer}


class LoadedModel(NamedTuple):
    """What :func:`load_model` read.

    model: the :class:`VQModel` or :class:`CodeTransformer`, in eval mode on the device.
    kind: ``"tokenizer"`` or ``"prior"``.
    source: how errors name it, e.g. ``"checkpoint runs/sample/checkpoints/last.pt"``.
    step: training steps behind the weights (0 where unknown).
    config: the saved config; at least ``model`` and ``data`` (an exported tokenizer saved without its
        training data says its architecture's resolution as ``data.size``, an exported prior nothing).
    checkpoint: the checkpoint's entries besides the weights (a prior's ``tokenizer`` record and
        ``train_slot_counts``); an exported prior's ``tokenizer`` record (its path: the folder's
        ``tokenizer/``); empty for an exported tokenizer.
    weights: ``"ema"`` (the moving average of the trained weights) or ``"trained"``.
    """

    model: nn.Module
    kind: str
    source: str
    step: int
    config: dict
    checkpoint: dict
    weights: str = "trained"


def load(path: str | os.PathLike, device: torch.device | str | None = None, raw_weights: bool = False) -> nn.Module:
    """The model at ``path`` (any form of the module docstring) in eval mode on ``device`` (default:
    the CPU): a :class:`VQModel` or a :class:`CodeTransformer`; the EMA weights of a checkpoint that
    has them unless ``raw_weights``. FileNotFoundError or ValueError, one line naming the file, for
    anything else."""
    return load_model(path, device, raw_weights=raw_weights).model


def load_model(path: str | os.PathLike, device: torch.device | str | None = None,
               kind: str | None = None, raw_weights: bool = False) -> LoadedModel:
    """:func:`load` with what was read beside the model (:class:`LoadedModel`). ``kind``: the kind the
    caller needs (``"tokenizer"`` or ``"prior"``); a model of the other kind is a ValueError saying
    what it is. ``raw_weights``: the trained weights of a checkpoint with EMA weights (an exported
    folder of EMA weights has no others: a ValueError)."""
    device = torch.device(device or "cpu")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model {path} does not exist (a model is a checkpoint file or an exported folder)")
    if path.is_dir():
        if (path / CONVERTED_CHECKPOINT).is_file() and not (path / WEIGHTS_FILE).is_file():
            return load_model(path / CONVERTED_CHECKPOINT, device, kind, raw_weights)
        _check_kind(read_manifest(path)["kind"], kind, f"pretrained model {path}")
        return _load_pretrained(path, device, raw_weights)
    state = load_checkpoint(path)
    source = f"checkpoint {path}"
    found = checkpoint_kind(state)
    _check_kind(found, kind, source)
    weights, config = state.pop("model"), state.pop("config")
    ema = state.pop("ema", None)
    ema = None if raw_weights else ema
    if found == "prior":
        config = _with_class_dropout_of_its_time(config)
    sections = saved_sections(config, source, found, ("model", "data"))
    if found == "prior":
        model = build_prior(state.get("tokenizer"), sections["model"], weights, source, ema)
    else:
        model = build_tokenizer(sections["model"], weights, source, device, ema)
    config = {**config, "data": sections["data"]}
    return LoadedModel(model.to(device).eval(), found, source, int(state.get("step", 0)), config, state,
                       "trained" if ema is None else "ema")


def _check_kind(found: str, wanted: str | None, source: str) -> None:
    if wanted is not None and found != wanted:
        takes = {"tokenizer": "kepler eval, reconstruct, encode, decode, export and a prior's tokenizer.checkpoint",
                 "prior": "kepler sample and kepler prior eval"}[found]
        raise ValueError(f"{source} is a {found} ({MODEL_CLASSES[found].__name__}), not a {wanted}; "
                         f"a {found} is for {takes}")


def _with_class_dropout_of_its_time(config: object) -> object:
    """A prior's saved ``config`` with ``model.class_dropout: 0`` where it has no such key (see the
    module docstring)."""
    model = config.get("model") if isinstance(config, Mapping) else None
    if isinstance(model, Mapping) and "class_dropout" not in model:
        return {**config, "model": {**model, "class_dropout": 0.0}}
    return config


def _load_pretrained(directory: Path, device: torch.device, raw_weights: bool = False) -> LoadedModel:
    manifest, weights = read_pretrained(directory)
    source = f"pretrained model {directory}"
    kind = manifest["kind"]
    averaged = manifest.get("ema_decay") is not None
    if raw_weights and averaged:
        raise ValueError(f"{source} holds only the EMA weights it was exported with; the trained ones "
                         "(raw weights) are in the training checkpoint it was exported from")
    # A tokenizer saved without its training data section is evaluated at its architecture's resolution.
    has_data = manifest.get("data") is not None
    sections = saved_sections(manifest, source, kind, ("model", "data") if has_data else ("model",))
    record = {}
    if kind == "prior":
        record = {"tokenizer": _exported_tokenizer_record(manifest.get("tokenizer"), directory, source)}
        model = build_prior(record["tokenizer"], sections["model"], weights, source)
        config = {"model": sections["model"], "data": sections["data"] if has_data else {}}
    else:
        model = build_tokenizer(sections["model"], weights, source, device)
        config = {"model": model.config, "data": sections["data"] if has_data else {"size": model.config["resolution"]}}
    if averaged:  # where a checkpoint's config says it: what an export of this model writes again
        config["train"] = {"ema_decay": manifest["ema_decay"]}
    return LoadedModel(model.to(device).eval(), kind, source, int(manifest.get("step") or 0), config, record,
                       "ema" if averaged else "trained")


def _exported_tokenizer_record(record: object, directory: Path, source: str) -> dict:
    """An exported prior's tokenizer record, checked, its tokenizer at the folder's ``tokenizer/``."""
    if not isinstance(record, Mapping) or not isinstance(record.get("sha256"), str) or (
            record.get("weights") not in ("ema", "trained")):
        raise ValueError(f"{source}: config.yaml's 'tokenizer' must record the tokenizer's sha256, layout and "
                         f"weights (ema or trained), got {record!r}")
    return {**record, "checkpoint": str(directory / PRIOR_TOKENIZER)}


def build_tokenizer(section: dict, weights: Mapping, source: str, device: torch.device | str = "cpu",
                    ema: object = None) -> VQModel:
    """A :class:`VQModel` of a checked ``model`` config section (:func:`kepler.io.config.saved_sections`)
    loaded with ``weights`` (a state dict; with ``ema``, a checkpoint's ``"ema"`` entry, its
    parameters replaced by the averages), in training mode on the CPU, checked as the module
    docstring says; a saved quantizer backend that cannot run on ``device`` is re-chosen there.
    ValueError, one line starting with ``source``."""
    section = {**section, "quantizer": _backend_for(section["quantizer"], torch.device(device), source)}
    return _checked_build(lambda: VQModel.from_config(section), weights, source, ema)


def build_prior(record: object, section: dict, weights: Mapping, source: str, ema: object = None) -> CodeTransformer:
    """A :class:`CodeTransformer` of a prior checkpoint's tokenizer ``record`` (its code layout) and
    checked ``model`` section, loaded with ``weights`` (and ``ema``), checked as
    :func:`build_tokenizer` checks a tokenizer."""
    layout = record.get("layout") if isinstance(record, Mapping) else None
    if not isinstance(layout, Mapping):
        raise ValueError(f"{source}: its tokenizer record has no code layout")
    try:
        layout = CodeLayout(**layout)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: bad code layout {dict(layout)}: {exc}") from None
    return _checked_build(lambda: CodeTransformer(layout, **section), weights, source, ema)


def _checked_build(build: Callable[[], nn.Module], weights: Mapping, source: str, ema: object = None) -> nn.Module:
    """``build()`` loaded with ``weights``, after they are checked against a ``meta`` skeleton of it
    (nothing is allocated for weights that do not fit); with ``ema`` (not None), the trained weights
    are checked, then loaded with the averaged parameters in their place, checked too. A value a
    module refuses on loading (a quantizer's negative code counts) is a ValueError naming ``source``
    too."""
    skeleton = meta_skeleton(build, source)
    check_state_dict(skeleton, weights, source)
    if ema is not None:
        weights = check_ema_weights(skeleton, ema, f"{source} (EMA weights)", weights)
    model = build()
    try:
        model.load_state_dict(weights)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None
    return model


def meta_skeleton(build: Callable[[], nn.Module], source: str) -> nn.Module:
    """``build()`` on the ``meta`` device: the model's parameter shapes, without their memory. A
    config whose sizes overflow what a tensor can be (``ch: 2**31``) is a ValueError naming ``source``."""
    try:
        with torch.device("meta"):
            return build()
    except RuntimeError as exc:
        raise ValueError(f"{source}: the model config describes a model too large to build ({error_line(exc)})") from None


def _backend_for(quantizer: dict, device: torch.device, source: str) -> dict:
    """``quantizer`` (a config section) with its ``backend`` replaced by ``auto`` where the saved one
    cannot run on ``device``, said in a warning."""
    backend = quantizer.get("backend")
    if backend in (None, "auto"):
        return quantizer
    reason = _backend._unavailable_reason(backend, device.type)
    if reason is None:
        return quantizer
    log.warning("%s: its quantizer backend %r cannot run on %s (%s); using backend auto", source, backend,
                device, reason)
    return {**quantizer, "backend": "auto"}


def tokenizer_layout(tokenizer: VQModel, size: int) -> CodeLayout:
    """The layout of ``tokenizer``'s index maps of ``size x size`` images."""
    factor = tokenizer.downsample_factor
    return CodeLayout.from_quantizer(tokenizer.quantize, (size // factor, size // factor))


def load_prior_tokenizer(prior: LoadedModel, device: torch.device | str | None = None,
                         path: str | os.PathLike | None = None) -> VQModel:
    """The model of :func:`load_prior_tokenizer_model`, without grads."""
    return load_prior_tokenizer_model(prior, device, path).model.requires_grad_(False)


def load_prior_tokenizer_model(prior: LoadedModel, device: torch.device | str | None = None,
                               path: str | os.PathLike | None = None) -> LoadedModel:
    """The tokenizer of a loaded prior (:func:`load_model` with ``kind="prior"``), checked to
    be the very file the prior was trained on (its SHA-256, recorded in the checkpoint: so it makes
    the index maps the prior models), in eval mode on ``device``, with what was read beside it.

    The tokenizer's weights are the ones the prior was trained on (``weights`` in its record: its
    EMA weights, or the trained ones), whatever ``raw_weights`` the prior was loaded with.

    ``path``: the tokenizer at another path (the prior's records where it was; a moved or copied
    tokenizer is accepted when its SHA-256 is the recorded one). ValueError, one line naming both
    hashes, for another file; FileNotFoundError when it is not there.
    """
    record = prior.checkpoint["tokenizer"]
    path = Path(path if path is not None else record["checkpoint"])
    if not path.exists():
        raise FileNotFoundError(f"tokenizer {path} of {prior.source} does not exist (moved? give its new path "
                                "with --tokenizer)")
    recorded, actual = record["sha256"], file_sha256(path)
    if actual != recorded:
        raise ValueError(f"tokenizer {path} has SHA-256 {actual}, but {prior.source} was trained on a tokenizer "
                         f"with SHA-256 {recorded}: its codes would be decoded by another model")
    # The weights whose codes the prior learned (its record says; priors from before EMA: the default).
    raw = record.get("weights") == "trained"
    return load_model(path, device, kind="tokenizer", raw_weights=raw)
