"""Models for others: a folder that holds only what inference needs, in a format that cannot run code.

A pretrained folder (written by :func:`save_pretrained`, :meth:`VQModel.save_pretrained` or
``kepler export``) holds three files::

    model.safetensors   the state dict (safetensors: tensors and a JSON header, nothing executable)
    config.yaml         format, the weights' file name and SHA-256, training step, the ``model`` config
                        section (as training checkpoints carry it) and the training ``data`` section
    README.md           the model card: architecture, data, steps, held-out metrics

Training checkpoints stay as they are (they carry optimizer states and RNG states to resume); this
folder is what is shared. :func:`load_pretrained` checks, in this order, each with a one-line error
naming the file: the files exist, ``config.yaml`` is a kepler pretrained config, the weights file's
SHA-256 is the one recorded (a changed, truncated or swapped file is refused before it is parsed),
the file parses as safetensors, the config is a valid ``model`` section, the weights match the model
that config describes (checked on a ``meta``-device skeleton: nothing is allocated for a config that
asks for a huge model) and every weight is finite.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from kepler.models.vqmodel import VQModel
from kepler.train.checkpoint import write_atomically
from kepler.weights import check_state_dict, error_line

FORMAT = "kepler-pretrained/1"
CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
# metrics.json entries the model card shows, in this order, with how each is printed.
CARD_METRICS = {
    "psnr": "{:.2f} dB", "baseline_psnr": "{:.2f} dB", "ssim": "{:.4f}", "l1": "{:.4f}",
    "utilization": "{:.3f}", "perplexity": "{:.1f}", "lpips": "{:.4f}", "rfid": "{:.2f}", "images": "{}",
}


def checked_model(config: Any, weights: Any, source: str) -> VQModel:
    """A :class:`VQModel` built from the ``model`` section of a saved config (a checkpoint's
    ``config``, a pretrained folder's ``config.yaml``) and loaded with ``weights`` (a state dict),
    in training mode on the CPU.

    The config is checked as a config file is (:func:`kepler.train.config.model_config`), then the
    model is built on the ``meta`` device and the weights are checked against it
    (:func:`kepler.weights.check_state_dict`) before the real model is allocated. ValueError, one
    line starting with ``source``, otherwise.
    """
    from kepler.train.config import model_config

    model_section = model_config(config, source)
    with torch.device("meta"):
        skeleton = VQModel.from_config(model_section)
    check_state_dict(skeleton, weights, source)
    model = VQModel.from_config(model_section)
    model.load_state_dict(weights)
    return model


def save_pretrained(
    model: VQModel,
    directory: str | os.PathLike,
    *,
    data: Mapping | None = None,
    step: int | None = None,
    metrics: Mapping | None = None,
    name: str | None = None,
) -> Path:
    """Write ``model`` to ``directory`` (created; the three files replaced if there): weights,
    ``config.yaml`` and the model card. Returns the folder.

    Args:
        data: the ``data`` section of the training config (what the card says the model saw, and the
            crop size ``kepler eval`` uses by default); None if unknown.
        step: training steps behind the weights; None if unknown.
        metrics: a run's ``metrics.json`` (held-out PSNR, SSIM, ...) for the card; None for none.
        name: the model's name in the card (default: the folder's name).
    """
    from kepler.train.config import model_config

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model_section = model_config({"model": model.config}, "the model's config")
    # safetensors refuses tensors that share memory; a clone per entry gives each its own.
    weights = {key: value.detach().to("cpu", copy=True).contiguous() for key, value in model.state_dict().items()}
    from safetensors.torch import save

    blob = save(weights, metadata={"format": "pt"})
    write_atomically(directory / WEIGHTS_FILE, lambda f: f.write(blob))
    manifest = {
        "format": FORMAT,
        "weights": {"file": WEIGHTS_FILE, "sha256": hashlib.sha256(blob).hexdigest()},
        "step": None if step is None else int(step),
        "data": None if data is None else dict(data),
        "model": model_section,
    }
    write_atomically(directory / CONFIG_FILE, lambda f: f.write(yaml.safe_dump(manifest, sort_keys=False).encode()))
    card = model_card(model, name or directory.resolve().name, manifest, metrics)
    write_atomically(directory / CARD_FILE, lambda f: f.write(card.encode()))
    return directory


def model_card(model: VQModel, name: str, manifest: Mapping, metrics: Mapping | None) -> str:
    """The README.md of a pretrained folder: what the model is, what it saw, how well it does, how
    to load it."""
    q = model.quantize
    config = manifest["model"]
    data = manifest["data"] or {}
    lines = [
        f"# {name}: a kepler image tokenizer",
        "",
        f"- Model: VQGAN encoder/decoder, downsampling f{model.downsample_factor}, {config['ch']} base channels, "
        f"multipliers {config['ch_mult']}, latent width {config['embed_dim']}",
        f"- Quantizer: {config['quantizer'].get('type', 'kepler')}, {q.tokens_per_position} token(s) per position, "
        f"{q.codebook_size} codes{' (shared)' if q.shared_codebook else ''}",
        f"- Parameters: {sum(p.numel() for p in model.parameters()):,}",
        f"- Training data: {data.get('train', 'unknown')}, {data.get('size', '?')}x{data.get('size', '?')} crops"
        if data else "- Training data: unknown",
        f"- Training steps: {manifest['step'] if manifest['step'] is not None else 'unknown'}",
        "",
    ]
    shown = {key: metrics[key] for key in CARD_METRICS if isinstance((metrics or {}).get(key), (int, float))}
    if shown:
        lines += [f"## Held-out metrics (validation data: {metrics.get('val_data', 'unknown')}, step "
                  f"{metrics.get('step', '?')})", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {CARD_METRICS[key].format(value)} |" for key, value in shown.items()
                  if not (isinstance(value, float) and math.isnan(value))]
        lines.append("")
    else:
        lines += ["No held-out metrics were recorded with this model.", ""]
    lines += [
        "## Files",
        "",
        f"- `{WEIGHTS_FILE}`: the weights (safetensors), SHA-256 `{manifest['weights']['sha256']}`",
        f"- `{CONFIG_FILE}`: the model config and the weights' checksum",
        "",
        "## Use",
        "",
        "Download the whole folder, then point kepler at it:",
        "",
        "```python",
        "from kepler.models import VQModel",
        f'model = VQModel.from_pretrained("path/to/{name}")  # checks the checksum and every weight',
        "```",
        "",
        "```",
        f"kepler reconstruct path/to/{name} photo.jpg --out recon/",
        f"kepler encode path/to/{name} photo.jpg --out codes/",
        "```",
        "",
    ]
    return "\n".join(lines)


def _read_manifest(directory: Path) -> dict:
    """``config.yaml`` of a pretrained folder, checked for the keys :func:`load_pretrained` needs."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"pretrained model {directory}: {CONFIG_FILE} is missing")
    try:
        manifest = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid YAML: {error_line(exc)}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ValueError(f"{path} is not a kepler pretrained config: 'format' must be {FORMAT!r}, got {found!r}")
    weights = manifest.get("weights")
    if not isinstance(weights, dict) or not all(isinstance(weights.get(k), str) for k in ("file", "sha256")):
        raise ValueError(f"{path}: 'weights' must map 'file' and 'sha256' to strings, got {weights!r}")
    if Path(weights["file"]).name != weights["file"]:
        raise ValueError(f"{path}: weights.file must be a file name in the same folder, got {weights['file']!r}")
    return manifest


def load_pretrained(directory: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[VQModel, dict]:
    """``(VQModel in eval mode on device, the folder's config.yaml as a dict)`` from a folder written
    by :func:`save_pretrained`.

    ``directory`` is a local folder; a model shared online is downloaded first (the whole folder:
    ``model.safetensors``, ``config.yaml``, ``README.md``) and that folder is passed. Raises
    FileNotFoundError for a missing folder or file, ValueError (one line naming the file) for a file
    whose SHA-256 is not the recorded one, that is not safetensors, whose weights do not match the
    config (key and both shapes) or are not finite.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"pretrained model folder {directory} does not exist")
    manifest = _read_manifest(directory)
    weights_path = directory / manifest["weights"]["file"]
    if not weights_path.is_file():
        raise FileNotFoundError(f"pretrained model {directory}: {weights_path.name} is missing")
    blob = weights_path.read_bytes()  # hashed and parsed from the same bytes: no window to swap the file
    expected, actual = manifest["weights"]["sha256"].lower(), hashlib.sha256(blob).hexdigest()
    if actual != expected:
        raise ValueError(
            f"{weights_path}: SHA-256 {actual} is not the {expected} recorded in {CONFIG_FILE} "
            "(the file was changed or damaged)"
        )
    from safetensors.torch import load

    try:
        weights = load(blob)
    except Exception as exc:  # safetensors raises its own error type, and others for odd headers
        raise ValueError(f"{weights_path} is not a readable safetensors file: {error_line(exc)}") from None
    model = checked_model(manifest, weights, f"pretrained model {directory}")
    return model.to(device).eval(), manifest


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike) -> tuple[Path, Path | None]:
    """Write the model of a training checkpoint to the pretrained folder ``out``; returns ``(out,
    the metrics.json the card took its metrics from, or None)``.

    The card's metrics come from the run's ``metrics.json`` (``<run>/metrics.json`` for a checkpoint
    at ``<run>/checkpoints/<name>.pt``) when there is one and it describes the checkpoint's step; the
    weights are checked as ``kepler eval`` checks them before anything is written.
    """
    import json

    from kepler.train.checkpoint import load_checkpoint

    checkpoint = Path(checkpoint)
    state = load_checkpoint(checkpoint)
    model = checked_model(state["config"], state["model"], f"checkpoint {checkpoint}")
    step = int(state.get("step", 0))
    metrics_path = checkpoint.resolve().parent.parent / "metrics.json"
    metrics = None
    if metrics_path.is_file():
        try:
            metrics = json.loads(metrics_path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{metrics_path} (the run's metrics for the model card) cannot be read: {exc}") from None
        if not isinstance(metrics, dict) or metrics.get("step") != step:
            metrics = None  # from another step of the run (or not a run's summary): not this model's figures
    save_pretrained(model, out, data=state["config"].get("data"), step=step, metrics=metrics,
                    name=state["config"].get("name"))
    return Path(out), metrics_path if metrics is not None else None
