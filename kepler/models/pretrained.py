"""Models for others: :func:`save_pretrained` writes a model as an exported folder (the format is
:mod:`kepler.io.pretrained`: safetensors weights, ``config.yaml`` with their SHA-256, a model card);
:func:`export_checkpoint` (``kepler export``) does it for a training checkpoint. Reading any of them
back is :func:`kepler.load`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

from kepler.io.config import model_section
from kepler.io.pretrained import CONFIG_FILE, WEIGHTS_FILE, write_pretrained
from kepler.models.load import load_model
from kepler.models.vqmodel import VQModel

# metrics.json entries the model card shows, in this order, with how each is printed.
CARD_METRICS = {
    "psnr": "{:.2f} dB", "baseline_psnr": "{:.2f} dB", "ssim": "{:.4f}", "l1": "{:.4f}",
    "utilization": "{:.3f}", "perplexity": "{:.1f}", "lpips": "{:.4f}", "rfid": "{:.2f}", "images": "{}",
}


def save_pretrained(
    model: VQModel,
    directory: str | os.PathLike,
    *,
    data: Mapping | None = None,
    step: int | None = None,
    metrics: Mapping | None = None,
    name: str | None = None,
    ema_decay: float | None = None,
) -> Path:
    """Write ``model`` to ``directory`` (created; the three files replaced if there): weights,
    ``config.yaml`` and the model card. Returns the folder.

    Args:
        data: the ``data`` section of the training config (what the card says the model saw, and the
            crop size ``kepler eval`` uses by default); None if unknown.
        step: training steps behind the weights; None if unknown.
        metrics: a run's ``metrics.json`` (held-out PSNR, SSIM, ...) for the card; None for none.
        name: the model's name in the card (default: the folder's name).
        ema_decay: the decay of the moving average ``model``'s weights are (``train.ema_decay``);
            None for trained weights.
    """
    directory = Path(directory)
    manifest = {
        "step": None if step is None else int(step),
        "data": None if data is None else dict(data),
        "model": model_section({"model": model.config}, "the model's config"),
        **({"ema_decay": float(ema_decay)} if ema_decay is not None else {}),
    }
    name = name or directory.resolve().name
    return write_pretrained(directory, model.state_dict(), manifest,
                            lambda full: model_card(model, name, full, metrics))


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
        f"- Weights: the exponential moving average (decay {manifest['ema_decay']}) of the trained weights"
        if manifest.get("ema_decay") is not None else "- Weights: the trained weights",
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


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike,
                      raw_weights: bool = False) -> tuple[Path, Path | None, str]:
    """Write the model of a training checkpoint to the pretrained folder ``out``; returns ``(out,
    the metrics.json the card took its metrics from, or None, which weights: "ema" or "trained")``. A
    checkpoint with EMA weights exports them (``config.yaml`` and the card say so) unless
    ``raw_weights``.

    The card's metrics come from the run's ``metrics.json`` (``<run>/metrics.json`` for a checkpoint
    at ``<run>/checkpoints/<name>.pt``) when there is one and it describes the checkpoint's step; the
    checkpoint is read by :func:`kepler.load`, checked, before anything is written.
    """
    checkpoint = Path(checkpoint)
    loaded = load_model(checkpoint, kind="tokenizer", raw_weights=raw_weights)
    step = loaded.step
    metrics_path = checkpoint.resolve().parent.parent / "metrics.json"
    metrics = None
    if metrics_path.is_file():
        try:
            metrics = json.loads(metrics_path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{metrics_path} (the run's metrics for the model card) cannot be read: {exc}") from None
        if not isinstance(metrics, dict) or metrics.get("step") != step or (
                metrics.get("weights", "trained") != loaded.weights):
            metrics = None  # from another step of the run (or not a run's summary): not this model's figures
    ema_decay = (loaded.config.get("train") or {}).get("ema_decay") if loaded.weights == "ema" else None
    save_pretrained(loaded.model, out, data=loaded.config.get("data"), step=step, metrics=metrics,
                    name=loaded.config.get("name"), ema_decay=ema_decay)
    return Path(out), metrics_path if metrics is not None else None, loaded.weights
