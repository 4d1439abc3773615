"""Evaluation of a tokenizer the way the paper reports it: PSNR, SSIM, L1, codebook utilization and
perplexity, the codebook's packing report, and LPIPS and rFID where their weights are on disk.

Images are compared in [0, 1] (reconstructions clamped). PSNR and SSIM are averaged per image.
``baseline_psnr`` is the PSNR of the trivial reconstruction that paints each image with its own mean
colour: a tokenizer that does not beat it clearly has learned nothing.

rFID uses torchmetrics' ``FrechetInceptionDistance`` with the FID Inception network (the
pytorch-fid / torch-fidelity weights ``pt_inception-2015-12-05-6726825d.pth``, by default looked up
in ``<torch hub dir>/checkpoints``); it is skipped, saying why, when the weights or the
``torch-fidelity`` package are missing, or when the file is not the published one (checked by its
SHA-256 and read with ``weights_only=True`` before torch-fidelity sees it). Nothing is ever downloaded.
The Inception Score of a prior's samples (``kepler prior eval``) runs on the same file, under the
same rules (:func:`load_inception_score`).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import Dataset

from kepler.data import build_dataset, collate, first_items
from kepler.distributed import all_reduce_sum, resolve_device
from kepler.metrics import packing_report
from kepler.models import VQModel, load_lpips
from kepler.models.pretrained import checked_model, load_pretrained
from kepler.train.checkpoint import load_checkpoint
from kepler.weights import load_weights, sha256_prefix_matches

log = logging.getLogger("kepler")

INCEPTION_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
# Start of the published file's SHA-256 (torch hub's naming: <name>-<sha256 prefix>.pth).
INCEPTION_SHA256_PREFIX = "6726825d"
# The Inception Score's usual splits (Salimans et al.; torchmetrics' default): mean and std over them.
INCEPTION_SCORE_SPLITS = 10


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped, float32."""
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of (B, C, H, W) images in [0, 1]: (B,) float32."""
    mse = (x.float() - y.float()).square().flatten(1).mean(dim=1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (11x11 Gaussian window, sigma 1.5) of images in [0, 1]: (B,) float32."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(y.float(), x.float(), data_range=1.0, reduction="none")


def mean_colour(x: torch.Tensor) -> torch.Tensor:
    """The trivial baseline: each image replaced by its per-channel mean colour."""
    return x.mean(dim=(2, 3), keepdim=True).expand_as(x)


def default_inception_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME


def read_inception_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The FID Inception state dict in ``path``, read once into memory and checked before use: its
    SHA-256 must start with :data:`INCEPTION_SHA256_PREFIX` (the published file's, carried by its name)
    and it is unpickled with ``weights_only=True``. ValueError, one line, otherwise."""
    data = Path(path).read_bytes()
    matches, digest = sha256_prefix_matches(data, INCEPTION_SHA256_PREFIX)
    if not matches:
        raise ValueError(
            f"{path} is not the FID Inception weights file {INCEPTION_FILENAME}: its SHA-256 starts with "
            f"{digest[:8]}, not {INCEPTION_SHA256_PREFIX}"
        )
    state = load_weights(data, f"FID Inception weights {path}")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"FID Inception weights {path}: not a state dict of tensors")
    return state


def _checked_inception_weights(weights_path: str | os.PathLike | None) -> tuple[io.BytesIO | None, str | None]:
    """The local FID Inception weights (default :func:`default_inception_path`) as torch-fidelity
    reads them, ``(file object, None)``, or ``(None, reason)``: missing file, missing torch-fidelity,
    or a file refused by :func:`read_inception_weights`."""
    path = Path(weights_path) if weights_path else default_inception_path()
    if not path.is_file():
        return None, f"no weights at {path}"
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if not _TORCH_FIDELITY_AVAILABLE:
        return None, "the torch-fidelity package (FID Inception network) is not installed"
    try:
        state = read_inception_weights(path)
    except ValueError as exc:
        return None, str(exc)
    # torch-fidelity unpickles its weights file with weights_only=False: it is handed our own
    # serialization of the checked tensors, never the file on disk.
    checked = io.BytesIO()
    torch.save(state, checked)
    checked.seek(0)
    return checked, None


def load_fid(weights_path: str | os.PathLike | None = None):
    """torchmetrics ``FrechetInceptionDistance`` on the local FID Inception weights: ``(metric, None)``
    or ``(None, reason)`` (see :func:`_checked_inception_weights`). It takes float images in [0, 1]."""
    checked, reason = _checked_inception_weights(weights_path)
    if checked is None:
        return None, reason
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=checked), None


def load_inception_score(weights_path: str | os.PathLike | None = None):
    """torchmetrics ``InceptionScore`` (:data:`INCEPTION_SCORE_SPLITS` splits) on the local FID
    Inception weights: ``(metric, None)`` or ``(None, reason)``, as :func:`load_fid`. It takes float
    images in [0, 1]; ``compute()`` is ``(mean, std)`` over the splits."""
    checked, reason = _checked_inception_weights(weights_path)
    if checked is None:
        return None, reason
    from torchmetrics.image.fid import NoTrainInceptionV3
    from torchmetrics.image.inception import InceptionScore

    # InceptionScore takes no weights path: it is handed the network its default would build
    # (the logits_unbiased output), built on the checked weights.
    network = NoTrainInceptionV3(name="inception-v3-compat", features_list=["logits_unbiased"],
                                 feature_extractor_weights_path=checked)
    with warnings.catch_warnings():
        # It keeps every sample's 1008 logits (4 KB): 200 MB at 50k samples, not worth a warning per run.
        warnings.filterwarnings("ignore", message="Metric `InceptionScore` will save all extracted features")
        return InceptionScore(feature=network, splits=INCEPTION_SCORE_SPLITS, normalize=True), None


class _Sums:
    """Running sums of per-image metrics, reduced over ranks at the end."""

    def __init__(self, names: Sequence[str], device: torch.device):
        self.names = list(names)
        self.values = torch.zeros(len(self.names) + 1, dtype=torch.float64, device=device)

    def add(self, weight: torch.Tensor, **metrics: torch.Tensor) -> None:
        self.values[-1] += weight.sum()
        for i, name in enumerate(self.names):
            self.values[i] += (metrics[name].double() * weight).sum()

    def means(self) -> dict[str, float]:
        all_reduce_sum(self.values)
        count = self.values[-1].item()
        out = {name: self.values[i].item() / max(count, 1.0) for i, name in enumerate(self.names)}
        out["images"] = int(round(count))
        return out


def _shard(n: int, batch_size: int, rank: int, world_size: int) -> list[list[tuple[int, bool]]]:
    """This rank's batches of ``(index, counted)``; every rank gets the same number of batches (the
    quantizer all-reduces its statistics in each forward), padded with uncounted repeats."""
    mine = list(range(rank, n, world_size))
    per_rank = math.ceil(n / world_size)
    items = [(i, True) for i in mine] + [(mine[0] if mine else 0, False)] * (per_rank - len(mine))
    return [items[i : i + batch_size] for i in range(0, len(items), batch_size)]


class Validation(NamedTuple):
    """What :func:`run_validation` measured.

    metrics: per-image means (``psnr``, ``ssim``, ``l1``, ``baseline_psnr``, ``lpips``), ``images``,
        ``rfid``, and the code statistics of this pass (``utilization``, ``perplexity``,
        ``codebook_entries``).
    grid: ``(originals, reconstructions)`` in [-1, 1], this rank's first images, or None.
    code_counts: ``(P, K)`` int64, how often each token took each code over the data (all ranks).
    """

    metrics: dict
    grid: tuple[torch.Tensor, torch.Tensor] | None
    code_counts: torch.Tensor


@torch.no_grad()
def run_validation(
    model: torch.nn.Module,
    dataset: Dataset,
    *,
    batch_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    lpips: torch.nn.Module | None = None,
    fid=None,
    grid_images: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Validation:
    """Metrics of ``model`` (a :class:`kepler.models.VQModel`, unwrapped) over ``dataset``, sharded
    over ranks and reduced (see :class:`Validation`).

    The quantizer's code counts are saved and restored around the pass, so evaluating does not
    disturb the training statistics; utilization and perplexity here are over this data set.
    """
    was_training = model.training
    model.eval()
    quantizer = model.quantize
    saved_counts = quantizer.code_counts.clone()
    quantizer.reset_usage()
    names = ["psnr", "ssim", "l1", "baseline_psnr"] + (["lpips"] if lpips is not None else [])
    sums = _Sums(names, device)
    originals, recons = [], []
    try:
        for batch in _shard(len(dataset), batch_size, rank, world_size):
            images, _ = collate([dataset[i] for i, _ in batch])
            weight = torch.tensor([float(c) for _, c in batch], device=device, dtype=torch.float64)
            x = images.to(device)
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                x_rec, _, _ = model(x)
            x_rec = x_rec.float()
            xu, ru = to_unit(x), to_unit(x_rec)
            metrics = {
                "psnr": psnr(xu, ru),
                "ssim": ssim(xu, ru),
                "l1": (x - x_rec.clamp(-1, 1)).abs().flatten(1).mean(dim=1),
                "baseline_psnr": psnr(xu, mean_colour(xu)),
            }
            if lpips is not None:
                metrics["lpips"] = lpips(x, x_rec.clamp(-1, 1)).flatten()
            sums.add(weight, **metrics)
            if fid is not None:
                counted = weight.bool()
                fid.update(xu[counted], real=True)
                fid.update(ru[counted], real=False)
            if sum(len(o) for o in originals) < grid_images:
                originals.append(x.cpu())
                recons.append(x_rec.clamp(-1, 1).cpu())
        out = sums.means()
        out["utilization"] = quantizer.codebook_utilization().item()
        out["perplexity"] = quantizer.usage_perplexity().float().mean().item()
        out["codebook_entries"] = quantizer.codebook_entries
        code_counts = quantizer.code_counts.clone()
        if fid is not None:
            out["rfid"] = float(fid.compute())
            fid.reset()
    finally:
        quantizer.code_counts.copy_(saved_counts)
        model.train(was_training)
    grid = None
    if grid_images > 0 and originals:
        grid = (torch.cat(originals)[:grid_images], torch.cat(recons)[:grid_images])
    return Validation(out, grid, code_counts)


def save_grid(originals: torch.Tensor, reconstructions: torch.Tensor, path: str | os.PathLike, columns: int = 4) -> Path:
    """PNG grid: pairs (original | reconstruction) side by side, ``columns`` pairs per row."""
    pairs = torch.stack([originals, reconstructions], dim=1).flatten(0, 1)
    return save_image_grid(pairs, path, columns=2 * min(columns, len(originals)))


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, columns: int = 8) -> Path:
    """PNG grid of ``images (N, 3, H, W)`` in [-1, 1], ``columns`` per row."""
    from PIL import Image
    from torchvision.utils import make_grid

    grid = make_grid(to_unit(images), nrow=columns, padding=2, pad_value=1.0)
    array = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@torch.no_grad()
def quantizer_inputs(model: VQModel, dataset: Dataset, device: torch.device, max_rows: int = 8192,
                     batch_size: int = 16) -> torch.Tensor | None:
    """The vectors the quantizer matches against its codewords for the first images of ``dataset``:
    ``(G, N, d)`` float32 on the CPU with ``N <= max_rows`` (see ``Quantizer.sub_vectors``), or None
    for a quantizer without explicit codewords."""
    parts = []
    rows = 0
    for start in range(0, len(dataset), batch_size):
        images, _ = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        vectors = model.quantize.sub_vectors(model.latents(images.to(device)))
        if vectors is None:
            return None
        parts.append(vectors.float().cpu())
        rows += vectors.shape[1]
        if rows >= max_rows:
            break
    return torch.cat(parts, dim=1)[:, :max_rows].contiguous()


def packing_stats(model: VQModel, data: torch.Tensor | None = None) -> dict | str:
    """:func:`kepler.metrics.packing_report` of the quantizer's codewords (and how they cover ``data``,
    ``(G, N, d)``, when given), or why there is none. A shared codebook is reported as one ``(K, d)``."""
    codewords = model.quantize.codewords()
    if codewords is None:
        return f"unavailable: the {type(model.quantize).__name__} has no explicit codewords"
    codewords = codewords.detach().float().cpu()
    if codewords.shape[0] == 1:
        codewords, data = codewords[0], None if data is None else data[0]
    return packing_report(codewords, data).to_dict()


def format_table(results: dict) -> str:
    """The per-resolution metrics as an aligned text table."""
    columns = ["psnr", "baseline_psnr", "ssim", "l1", "utilization", "perplexity", "lpips", "rfid", "images"]
    rows = [["resolution"] + columns]
    for res, m in results["resolutions"].items():
        row = [res]
        for c in columns:
            v = m.get(c)
            row.append("-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in rows)


def load_model(checkpoint: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[VQModel, dict]:
    """``(VQModel in eval mode, checkpoint dict)`` from a training checkpoint (``weights_only``) or a
    pretrained folder (:mod:`kepler.models.pretrained`; its dict has the checkpoint's ``step`` and
    ``config`` entries, ``config`` holding the folder's ``model`` and ``data`` sections).

    The model is first built from the saved config on the ``meta`` device and the weights are
    checked against it (:func:`kepler.weights.check_state_dict`): a config that does not describe the
    weights, however large the model it asks for, is a one-line ValueError before anything is allocated.
    """
    if Path(checkpoint).is_dir():
        model, manifest = load_pretrained(checkpoint, device)
        # A model saved without its training data section is evaluated at its architecture's resolution.
        data = manifest.get("data") or {"size": model.config["resolution"]}
        return model, {"step": manifest.get("step") or 0, "config": {"model": model.config, "data": data}}
    state = load_checkpoint(checkpoint)
    model = checked_model(state["config"], state["model"], f"checkpoint {checkpoint}")
    return model.to(device).eval(), state


def evaluate_model(
    model: VQModel,
    checkpoint_state: Mapping,
    data: str = "sample",
    resolutions: Sequence[int | None] = (None,),
    *,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    lpips_vgg_path: str | None = None,
    lpips_lin_path: str | None = None,
    inception_path: str | None = None,
    max_images: int | None = None,
) -> dict:
    """Evaluate ``model`` (on ``device``) on the validation split of ``data`` at each resolution.

    Args:
        checkpoint_state: the model's checkpoint (:func:`load_model`'s second value): its ``step``, and
            the ``data`` section of its training config (the crop ``size`` and ``resize``).
        data: ``"sample"``, ``"faces"``, a folder of images or a list file (validation split:
            centre crops, no flips; held-out photos for ``sample``).
        resolutions: crop sides to evaluate at; None is the training crop size. For the embedded
            ``sample`` the photos are resized in proportion, so the content of a crop is the same
            at every resolution.

    Returns:
        ``{"step", "data", "lpips", "rfid", "resolutions": {res: metrics + "code_counts" (P x K lists)},
        "packing"}`` (the packing report on the first resolution's latents).
    """
    device = torch.device(device)
    train_data = checkpoint_state["config"]["data"]
    train_size = train_data["size"]
    lpips_model, lpips_reason = load_lpips(lpips_vgg_path, lpips_lin_path)
    fid, fid_reason = load_fid(inception_path)
    if lpips_model is not None:
        lpips_model = lpips_model.to(device)
    if fid is not None:
        fid = fid.to(device)
    results: dict = {
        "step": int(checkpoint_state.get("step", 0)),
        "data": str(data),
        "lpips": "on" if lpips_model is not None else f"off: {lpips_reason}",
        "rfid": "on" if fid is not None else f"off: {fid_reason}",
        "resolutions": {},
    }
    for res in resolutions:
        size = int(res) if res is not None else train_size
        if size % model.downsample_factor:
            raise ValueError(f"resolution {size} is not a multiple of the downsampling factor {model.downsample_factor}")
        resize = train_data.get("resize")
        if resize is not None:
            resize = round(resize * size / train_size)
        dataset = first_items(build_dataset(data, "val", size, resize), max_images)
        validation = run_validation(model, dataset, batch_size=batch_size, device=device, lpips=lpips_model, fid=fid)
        results["resolutions"][str(size)] = {**validation.metrics, "code_counts": validation.code_counts.tolist()}
        if res == resolutions[0]:
            rows = quantizer_inputs(model, dataset, device)
    results["packing"] = packing_stats(model, rows)
    return results


def save_evaluation(results: Mapping, out: str | os.PathLike) -> Path:
    """``results`` as ``<out>/eval.json``; returns its path."""
    path = Path(out) / "eval.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    return path


def evaluate(
    checkpoint: str | os.PathLike,
    data: str = "sample",
    resolutions: Sequence[int | None] = (None,),
    out: str | os.PathLike | None = None,
    *,
    device: str = "auto",
    **options,
) -> dict:
    """:func:`evaluate_model` of a checkpoint written by :func:`kepler.train.trainer.train`, with its
    ``checkpoint`` path; written to ``<out>/eval.json`` when ``out`` is given.

    ``device``: ``auto`` (the GPU when there is one), ``cpu``, ``cuda``, ...; ``options``: the keyword
    arguments of :func:`evaluate_model`.
    """
    dev = resolve_device(device)
    model, state = load_model(checkpoint, dev)
    results = {"checkpoint": str(checkpoint), **evaluate_model(model, state, data, resolutions, device=dev, **options)}
    if out is not None:
        save_evaluation(results, out)
    return results
