"""Models for others: :func:`save_pretrained` writes a tokenizer or a prior as an exported folder (the
format is :mod:`kepler.io.pretrained`: safetensors weights, ``config.yaml`` with their SHA-256, a model
card; a prior's folder also holds its tokenizer, exported into ``tokenizer/``); :func:`export_checkpoint`
(``kepler export``) does it for a training checkpoint. Reading any of them back is :func:`kepler.load`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

from kepler.io.config import model_section
from kepler.io.files import file_sha256
from kepler.io.pretrained import CONFIG_FILE, PRIOR_TOKENIZER, WEIGHTS_FILE, write_pretrained
from kepler.models.code_sequence import CodeLayout
from kepler.models.code_transformer import CodeTransformer
from kepler.models.load import LoadedModel, load_model, load_prior_tokenizer_model
from kepler.models.vqmodel import VQModel

# metrics.json entries each kind's model card shows, in this order, with how each is printed.
CARD_METRICS = {
    "tokenizer": {"psnr": "{:.2f} dB", "baseline_psnr": "{:.2f} dB", "ssim": "{:.4f}", "l1": "{:.4f}",
                  "utilization": "{:.3f}", "perplexity": "{:.1f}", "lpips": "{:.4f}", "rfid": "{:.2f}",
                  "images": "{}"},
    "prior": {"bits_per_token": "{:.4f}", "bits_per_position": "{:.3f}", "unigram_bits_per_token": "{:.4f}",
              "position_unigram_bits_per_token": "{:.4f}", "val_maps": "{}"},
}


def save_pretrained(
    model: VQModel | CodeTransformer,
    directory: str | os.PathLike,
    *,
    data: Mapping | None = None,
    step: int | None = None,
    metrics: Mapping | None = None,
    name: str | None = None,
    ema_decay: float | None = None,
    tokenizer: VQModel | None = None,
    tokenizer_card: Mapping | None = None,
) -> Path:
    """Write ``model`` to ``directory`` (created; the files replaced if there): weights,
    ``config.yaml`` and the model card. Returns the folder.

    Args:
        data: the ``data`` section of the training config (what the card says the model saw, and the
            crop size ``kepler eval`` uses by default); None if unknown.
        step: training steps behind the weights; None if unknown.
        metrics: a run's ``metrics.json`` (a tokenizer's held-out PSNR, SSIM, ...; a prior's held-out
            bits) for the card; None for none.
        name: the model's name in the card (default: the folder's name).
        ema_decay: the decay of the moving average ``model``'s weights are (``train.ema_decay``);
            None for trained weights.
        tokenizer: a prior's (and only a prior's) tokenizer: the :class:`VQModel` whose index maps it
            models, written into ``directory/tokenizer/`` (with ``tokenizer_card``: this function's
            keyword arguments for it); the prior's ``config.yaml`` records that folder's SHA-256, so
            that another tokenizer is refused.
    """
    directory = Path(directory)
    name = name or directory.resolve().name
    kind = "prior" if isinstance(model, CodeTransformer) else "tokenizer"
    manifest = {
        "kind": kind,
        "step": None if step is None else int(step),
        "data": None if data is None else dict(data),
        "model": model_section({"model": model.config}, "the model's config", kind),
        **({"ema_decay": float(ema_decay)} if ema_decay is not None else {}),
    }
    if kind == "prior":
        manifest["tokenizer"] = _save_tokenizer(model.layout, tokenizer, directory / PRIOR_TOKENIZER,
                                                {"name": f"{name}'s tokenizer", **{key: value for key, value in
                                                 (tokenizer_card or {}).items() if value is not None}})
    elif tokenizer is not None:
        raise ValueError("tokenizer is a prior's: a tokenizer is saved alone")
    return write_pretrained(directory, model.state_dict(), manifest,
                            lambda full: model_card(model, name, full, metrics))


def _save_tokenizer(layout: CodeLayout, tokenizer: VQModel | None, folder: Path, card: Mapping) -> dict:
    """Write a prior's ``tokenizer`` into ``folder``; returns the prior's record of it."""
    if not isinstance(tokenizer, VQModel):
        raise ValueError("a prior is saved with its tokenizer (the VQModel whose index maps it models), "
                         f"got tokenizer={type(tokenizer).__name__}")
    made = CodeLayout.from_quantizer(tokenizer.quantize, (layout.height, layout.width))
    if made != layout:
        raise ValueError(f"the tokenizer makes index maps of {made}, but the prior models {layout}")
    save_pretrained(tokenizer, folder, **card)
    return {"sha256": file_sha256(folder), "layout": asdict(layout),
            "weights": "trained" if card.get("ema_decay") is None else "ema"}


def _metrics_table(metrics: Mapping | None, formats: Mapping[str, str], what: str) -> list[str]:
    """The card's held-out metrics: a Markdown table of the ``formats`` entries ``metrics`` has."""
    shown = {key: metrics[key] for key in formats if isinstance((metrics or {}).get(key), (int, float))}
    if not shown:
        return [f"No held-out {what} were recorded with this model.", ""]
    lines = [f"## Held-out {what} (validation data: {metrics.get('val_data', 'unknown')}, step "
             f"{metrics.get('step', '?')})", "", "| metric | value |", "|---|---|"]
    lines += [f"| {key} | {formats[key].format(value)} |" for key, value in shown.items()
              if not (isinstance(value, float) and math.isnan(value))]
    return [*lines, ""]


def model_card(model: VQModel | CodeTransformer, name: str, manifest: Mapping, metrics: Mapping | None) -> str:
    """The README.md of a pretrained folder: what the model is, what it saw, how well it does, how
    to load it."""
    data = manifest["data"] or {}
    prior = manifest["kind"] == "prior"
    lines = [f"# {name}: a kepler {'code prior' if prior else 'image tokenizer'}", "",
             *(_prior_lines(model, manifest) if prior else _tokenizer_lines(model, manifest["model"])),
             f"- Parameters: {sum(p.numel() for p in model.parameters()):,}",
             f"- Training data: {data.get('train', 'unknown')}, {data.get('size', '?')}x{data.get('size', '?')} crops"
             if data else "- Training data: unknown",
             f"- Training steps: {manifest['step'] if manifest['step'] is not None else 'unknown'}",
             f"- Weights: the exponential moving average (decay {manifest['ema_decay']}) of the trained weights"
             if manifest.get("ema_decay") is not None else "- Weights: the trained weights", "",
             *_metrics_table(metrics, CARD_METRICS[manifest["kind"]], "bits" if prior else "metrics"),
             "## Files", "",
             f"- `{WEIGHTS_FILE}`: the weights (safetensors), SHA-256 `{manifest['weights']['sha256']}`",
             f"- `{CONFIG_FILE}`: the model config and the weights' checksum"
             + (", the tokenizer's record" if prior else ""),
             *([f"- `{PRIOR_TOKENIZER}/`: the tokenizer (an exported tokenizer folder), SHA-256 "
                f"`{manifest['tokenizer']['sha256']}`"] if prior else []),
             "", "## Use", "", "Download the whole folder, then point kepler at it:", "", "```python"]
    if prior:
        lines += ["from kepler.models import CodeTransformer, VQModel",
                  f'prior = CodeTransformer.from_pretrained("path/to/{name}")  # checks the checksum and every weight',
                  f'tokenizer = VQModel.from_pretrained("path/to/{name}/{PRIOR_TOKENIZER}")', "```", "", "```",
                  f"kepler sample path/to/{name} --num 16 --out samples/"
                  + (" --class 0" + (" --cfg-scale 2" if model.null_class is not None else "")
                     if model.num_classes else ""), "```", ""]
    else:
        lines += ["from kepler.models import VQModel",
                  f'model = VQModel.from_pretrained("path/to/{name}")  # checks the checksum and every weight',
                  "```", "", "```", f"kepler reconstruct path/to/{name} photo.jpg --out recon/",
                  f"kepler encode path/to/{name} photo.jpg --out codes/", "```", ""]
    return "\n".join(lines)


def _tokenizer_lines(model: VQModel, config: Mapping) -> list[str]:
    q = model.quantize
    return [f"- Model: VQGAN encoder/decoder, downsampling f{model.downsample_factor}, {config['ch']} base channels, "
            f"multipliers {config['ch_mult']}, latent width {config['embed_dim']}",
            f"- Quantizer: {config['quantizer'].get('type', 'kepler')}, {q.tokens_per_position} token(s) per position, "
            f"{q.codebook_size} codes{' (shared)' if q.shared_codebook else ''}"]


def _prior_lines(model: CodeTransformer, manifest: Mapping) -> list[str]:
    config, layout = manifest["model"], model.layout
    classes = "unconditional"
    if model.num_classes:
        guidance = (f"class dropout {model.class_dropout} to a learned null class: classifier-free guidance "
                    "with --cfg-scale") if model.null_class is not None else "no null class: no guidance"
        classes = f"{model.num_classes} classes ({guidance})"
    weights = "its EMA weights" if manifest["tokenizer"]["weights"] == "ema" else "its trained weights"
    return [f"- Model: autoregressive transformer over code indices, {config['order']} order, {config['num_layers']} "
            f"layers, width {config['d_model']}, {config['num_heads']} heads",
            f"- Codes: {layout.height}x{layout.width} positions of {layout.tokens_per_position} sub-code(s), "
            f"{layout.codebook_size} codes{' (shared)' if layout.shared_codebook else ''}: {layout.flat_length} "
            "tokens an image",
            f"- Classes: {classes}",
            f"- Tokenizer: `{PRIOR_TOKENIZER}/` ({weights})"]


def _run_metrics(checkpoint: Path, loaded: LoadedModel) -> tuple[Path | None, dict | None]:
    """The run's ``metrics.json`` (``<run>/metrics.json`` for a checkpoint at
    ``<run>/checkpoints/<name>.pt``) and its contents, when there is one and it describes the
    checkpoint's step and weights; ``(None, None)`` otherwise."""
    path = checkpoint.resolve().parent.parent / "metrics.json"
    if not path.is_file():
        return None, None
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} (the run's metrics for the model card) cannot be read: {exc}") from None
    if not isinstance(metrics, dict) or metrics.get("step") != loaded.step or (
            metrics.get("weights", "trained") != loaded.weights):
        return None, None  # from another step of the run (or not a run's summary): not this model's figures
    return path, metrics


def _card_of(loaded: LoadedModel) -> dict:
    """:func:`save_pretrained`'s ``data``, ``step``, ``name`` and ``ema_decay`` of a loaded checkpoint."""
    ema_decay = (loaded.config.get("train") or {}).get("ema_decay") if loaded.weights == "ema" else None
    return {"data": loaded.config.get("data"), "step": loaded.step, "name": loaded.config.get("name"),
            "ema_decay": ema_decay}


class Exported(NamedTuple):
    """What :func:`export_checkpoint` wrote: the ``folder``, the ``metrics`` file (``metrics.json``) the
    card took its figures from (None: none), which ``weights`` (``"ema"`` or ``"trained"``), the
    model's ``kind`` (``"tokenizer"`` or ``"prior"``)."""

    folder: Path
    metrics: Path | None
    weights: str
    kind: str


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, raw_weights: bool = False) -> Exported:
    """Write the model of a training checkpoint (a tokenizer's or a prior's) to the pretrained folder
    ``out`` (:class:`Exported` says what was written). A checkpoint with EMA weights exports them (``config.yaml`` and the card
    say so) unless ``raw_weights``. A prior's tokenizer is exported with it (the weights the prior
    was trained on), after it is checked to be the file the prior recorded (its SHA-256).

    The card's metrics come from the run's ``metrics.json`` when it describes the checkpoint's step;
    the checkpoint is read by :func:`kepler.load`, checked, before anything is written.
    """
    checkpoint = Path(checkpoint)
    loaded = load_model(checkpoint, raw_weights=raw_weights)
    metrics_path, metrics = _run_metrics(checkpoint, loaded)
    tokenizer = {}
    if loaded.kind == "prior":
        trained_on = load_prior_tokenizer_model(loaded)
        _, tokenizer_metrics = _run_metrics(Path(loaded.checkpoint["tokenizer"]["checkpoint"]), trained_on)
        tokenizer = {"tokenizer": trained_on.model,
                     "tokenizer_card": {**_card_of(trained_on), "metrics": tokenizer_metrics}}
    save_pretrained(loaded.model, out, metrics=metrics, **_card_of(loaded), **tokenizer)
    return Exported(Path(out), metrics_path, loaded.weights, loaded.kind)
