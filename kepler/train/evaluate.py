"""Evaluation of a tokenizer the way the paper reports it: PSNR, SSIM, L1, codebook utilization and
perplexity, the codebook's packing report, and LPIPS and rFID where their weights are on disk.

The metrics themselves are :mod:`kepler.metrics` (images compared in [0, 1], reconstructions
clamped; PSNR and SSIM averaged per image; ``baseline_psnr`` is the mean-colour baseline's); rFID
runs on the local FID Inception weights (:mod:`kepler.metrics.inception`, never downloaded). Here:
the validation pass (sharded over ranks, as training validates) and :func:`evaluate` (``kepler
eval``) of any model :func:`kepler.load` reads.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import Dataset

from kepler.data import build_dataset, collate, first_items, to_unit
from kepler.distributed import all_reduce_sum, resolve_device
from kepler.metrics import mean_colour, packing_report, psnr, ssim
from kepler.metrics.inception import load_fid
from kepler.models import VQModel, load_lpips
from kepler.models.load import LoadedModel, load_model
from kepler.nn import ResidualQuantizer


class _Sums:
    """Running sums of per-image metrics and the counts of images and unreadable files, reduced over
    ranks at the end (one all-reduce)."""

    def __init__(self, names: Sequence[str], device: torch.device):
        self.names = list(names)
        self.values = torch.zeros(len(self.names) + 2, dtype=torch.float64, device=device)

    def add(self, weight: torch.Tensor, **metrics: torch.Tensor) -> None:
        self.values[-2] += weight.sum()
        for i, name in enumerate(self.names):
            self.values[i] += (metrics[name].double() * weight).sum()

    def unreadable(self, count: int) -> None:
        self.values[-1] += count

    def means(self) -> dict[str, float]:
        all_reduce_sum(self.values)
        count = self.values[-2].item()
        out = {name: self.values[i].item() / max(count, 1.0) for i, name in enumerate(self.names)}
        out["images"] = int(round(count))
        out["unreadable_images"] = int(round(self.values[-1].item()))
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

    metrics: per-image means (``psnr``, ``ssim``, ``l1``, ``baseline_psnr``, ``lpips``, and the
        quantizer's regularizer values of each image's batch, ``Quantizer.loss_term_names()``), ``images``
        (the readable images, each counted once), ``unreadable_images`` (left out, with a warning
        naming each), ``rfid``, and the code statistics of this pass (``utilization``,
        ``perplexity``, ``codebook_entries``) over the counted images.
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
    An unreadable file of a held-out set (an item ``(None, (path,))``) is left out and counted
    in ``unreadable_images``.
    """
    was_training = model.training
    model.eval()
    quantizer = model.quantize
    saved_counts = quantizer.code_counts.clone()
    counts = torch.zeros_like(saved_counts)
    loss_terms = quantizer.loss_term_names()
    names = ["psnr", "ssim", "l1", "baseline_psnr"] + (["lpips"] if lpips is not None else []) + list(loss_terms)
    sums = _Sums(names, device)
    originals, recons = [], []
    autocast = dict(device_type=device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None)
    try:
        for batch in _shard(len(dataset), batch_size, rank, world_size):
            items = [(dataset[i], counted) for i, counted in batch]
            sums.unreadable(sum(counted for (image, _), counted in items if image is None))
            kept = [(item, counted) for item, counted in items if item[0] is not None]
            if not kept:
                if world_size > 1:  # the quantizer sums its statistics over ranks in every forward
                    factor = model.downsample_factor
                    with torch.autocast(**autocast):
                        model(torch.zeros(1, model.config["in_channels"], factor, factor, device=device))
                continue
            images, _ = collate([item for item, _ in kept])
            weight = torch.tensor([float(c) for _, c in kept], device=device, dtype=torch.float64)
            x = images.to(device)
            with torch.autocast(**autocast):
                x_rec, _, info = model(x)
            counts += quantizer.token_counts(info.indices[weight.bool()])
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
            for name in loss_terms:  # a value of the batch, given to each of its images
                metrics[name] = quantizer.loss_terms[name].to(device).expand(len(x))
            sums.add(weight, **metrics)
            if fid is not None:
                counted = weight.bool()
                fid.update(xu[counted], real=True)
                fid.update(ru[counted], real=False)
            if sum(len(o) for o in originals) < grid_images:
                originals.append(x.cpu())
                recons.append(x_rec.clamp(-1, 1).cpu())
        out = sums.means()
        all_reduce_sum(counts)
        quantizer.code_counts.copy_(counts)
        out["utilization"] = quantizer.codebook_utilization().item()
        out["perplexity"] = quantizer.usage_perplexity().float().mean().item()
        out["codebook_entries"] = quantizer.codebook_entries
        code_counts = counts
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
        if images is None:  # unreadable files only
            continue
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


def evaluate_model(
    loaded: LoadedModel,
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
    """Evaluate a tokenizer (:func:`kepler.models.load.load_model`'s result, on ``device``) on the
    validation split of ``data`` at each resolution.

    Args:
        loaded: the tokenizer, its ``step`` and the ``data`` section of its training config (the
            crop ``size`` and ``resize``).
        data: a data source (:mod:`kepler.data`: ``"sample"``, ``"faces"``, a folder of images or a
            list file); its validation split: centre crops, no flips, held-out photos for ``sample``.
        resolutions: crop sides to evaluate at; None is the training crop size. For the embedded
            ``sample`` the photos are resized in proportion, so the content of a crop is the same
            at every resolution.

    Returns:
        ``{"step", "weights" (``"ema"`` or ``"trained"``), "data", "lpips", "rfid", "resolutions": {res: metrics + "code_counts" (P x K lists)},
        "packing"}`` (the packing report on the first resolution's latents).
    """
    device = torch.device(device)
    model = loaded.model
    train_data = loaded.config["data"]
    train_size = train_data["size"]
    lpips_model, lpips_reason = load_lpips(lpips_vgg_path, lpips_lin_path)
    fid, fid_reason = load_fid(inception_path)
    if lpips_model is not None:
        lpips_model = lpips_model.to(device)
    if fid is not None:
        fid = fid.to(device)
    results: dict = {
        "step": loaded.step,
        "weights": loaded.weights,
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
        dataset = first_items(build_dataset({"size": size, "resize": resize}, "val", spec=data), max_images)
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
    raw_weights: bool = False,
    stages: int | None = None,
    **options,
) -> dict:
    """:func:`evaluate_model` of the tokenizer at ``checkpoint`` (any form :func:`kepler.load` reads),
    with its path; written to ``<out>/eval.json`` when ``out`` is given.

    ``device``: ``auto`` (the GPU when there is one), ``cpu``, ``cuda``, ...; ``raw_weights``: the
    trained weights of a checkpoint with EMA weights (default: the EMA ones); ``stages``: a residual
    tokenizer reconstructs from its first ``stages`` stages only (None: all); ``options``: the keyword
    arguments of :func:`evaluate_model`.
    """
    dev = resolve_device(device)
    loaded = load_model(checkpoint, dev, kind="tokenizer", raw_weights=raw_weights)
    if stages is not None:
        quantizer = loaded.model.quantize
        if not isinstance(quantizer, ResidualQuantizer):
            raise ValueError(f"stages needs a residual tokenizer (type: residual); this one's quantizer is "
                             f"{quantizer.type_name!r}")
        quantizer.set_eval_stages(stages)
    results = {"checkpoint": str(checkpoint), "stages": stages,
               **evaluate_model(loaded, data, resolutions, device=dev, **options)}
    if out is not None:
        save_evaluation(results, out)
    return results
