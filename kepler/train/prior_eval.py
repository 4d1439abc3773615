"""How good a prior is: held-out bits per token and per position of a frozen tokenizer's index maps,
next to two baselines fitted on the training maps (add-one smoothed, also in bits per token): one
code histogram per codebook (unigram) and one per slot ``(h, w, p)`` of the map (per-position
unigram); and the FID and Inception Score of its samples where the Inception weights are on disk,
computed as ``kepler fid`` computes them (:mod:`kepler.metrics.generative`, the ADM evaluator's).
``kepler prior eval`` is :func:`evaluate_prior`; training validates with the same functions.
"""

from __future__ import annotations

import math
import os

import torch
from torch.utils.data import DataLoader, Dataset

from kepler.data import collate, held_out_set, to_uint8
from kepler.metrics.generative import (
    INCEPTION_SCORE_SPLITS,
    feature_statistics,
    frechet_distance,
    split_inception_scores,
)
from kepler.metrics.inception import inception_features, load_inception_network
from kepler.models import CodeTransformer, VQModel
from kepler.models.code_sequence import CodeLayout
from kepler.models.load import load_model, load_prior_tokenizer
from kepler.models.sampling import sample_batches
from kepler.progress import Progress
from kepler.train.codes import ShardedArray, class_labels, encode_dataset


def slot_counts(codes: torch.Tensor | ShardedArray, layout: CodeLayout, chunk: int = 1024) -> torch.Tensor:
    """``(H*W*P, K)`` int64: how often each code fills each slot of ``codes (N, H, W, P)``, read
    ``chunk`` maps at a time (so that codes kept in a narrower dtype or on disk are never all in
    memory as int64)."""
    counts = torch.zeros(layout.flat_length, layout.codebook_size, dtype=torch.int64)
    for start in range(0, len(codes), chunk):
        slots = codes[start:start + chunk].reshape(-1, layout.flat_length).T.contiguous()
        counts.scatter_add_(1, slots, torch.ones_like(slots))
    return counts


def baseline_bits(train_counts: torch.Tensor, val_codes: torch.Tensor | ShardedArray,
                  layout: CodeLayout) -> dict[str, float]:
    """Held-out bits per token of ``val_codes`` under the two baselines fitted on ``train_counts``
    (:func:`slot_counts` of the training maps), add-one smoothed."""
    val_counts = slot_counts(val_codes, layout).double()
    per_slot = train_counts.double().view(layout.positions, layout.tokens_per_position, -1)
    # Unigram: one histogram per codebook (one in all when the P sub-codes share it).
    unigram = per_slot.sum(0, keepdim=True)
    if layout.shared_codebook:
        unigram = unigram.sum(1, keepdim=True)
    tokens = val_counts.sum()

    def bits(counts: torch.Tensor) -> float:
        log_probs = torch.log2((counts + 1) / (counts + 1).sum(-1, keepdim=True))
        return float(-(val_counts.view_as(per_slot) * log_probs.expand_as(per_slot)).sum() / tokens)

    return {"unigram_bits_per_token": bits(unigram), "position_unigram_bits_per_token": bits(per_slot)}


@torch.no_grad()
def held_out_bits(model: CodeTransformer, codes: torch.Tensor | ShardedArray, batch_size: int, device: torch.device,
                  labels: torch.Tensor | ShardedArray | None = None) -> dict:
    """``bits_per_token`` and ``bits_per_position`` of ``codes (N, H, W, P)`` under ``model`` (given
    their classes ``labels (N,)`` for a class-conditional one), ``batch_size`` maps at a time."""
    nats = 0.0
    was_training = model.training
    model.eval()
    for start in range(0, len(codes), batch_size):
        batch = slice(start, start + batch_size)
        batch_labels = None if labels is None else labels[batch].to(device)
        nats += float(model.nll(codes[batch].to(device), batch_labels).sum())
    model.train(was_training)
    layout = model.layout
    bits = nats / math.log(2) / len(codes)
    return {"bits_per_token": bits / layout.flat_length, "bits_per_position": bits / layout.positions}


def _uint8(images: torch.Tensor) -> torch.Tensor:
    """Images ``(B, 3, H, W)`` in [-1, 1] as the uint8 ``(B, H, W, 3)`` they are saved as (PNG, .npz)."""
    return torch.from_numpy(to_uint8(images))


@torch.no_grad()
def sample_metrics(prior: CodeTransformer, tokenizer: VQModel, held_out: Dataset, held_out_labels: torch.Tensor | None,
                   num_samples: int, inception_path: str | os.PathLike | None, batch_size: int, seed: int) -> dict:
    """FID of ``num_samples`` samples (:func:`kepler.models.sampling.sample_batches` of ``batch_size``
    seeded with ``seed``) against the ``held_out`` images, and their Inception Score ``[mean, std]``
    over :data:`~kepler.metrics.generative.INCEPTION_SCORE_SPLITS` contiguous splits, as ``kepler fid``
    computes them: on the local FID Inception network
    (:func:`kepler.metrics.inception.load_inception_network`), of the images as uint8, as they are
    saved. A class-conditional prior's samples take the held-out classes in turn (the same
    proportions). ``fid_off_reason`` / ``is_off_reason`` instead where a metric cannot run."""
    if num_samples < 2:
        fid_reason = f"num_samples is {num_samples}; FID needs at least 2 samples"
    elif len(held_out) < 2:
        fid_reason = f"the held-out set has {len(held_out)} image(s); FID needs at least 2"
    else:
        fid_reason = None
    is_reason = None
    if num_samples < INCEPTION_SCORE_SPLITS:
        is_reason = (f"num_samples is {num_samples}; the Inception Score needs at least {INCEPTION_SCORE_SPLITS} "
                     "(one per split)")
    network = None
    # The weights are looked at only where the counts allow a metric (reading them takes seconds).
    if fid_reason is None or is_reason is None:
        network, reason = load_inception_network(inception_path)
        fid_reason, is_reason = fid_reason or reason, is_reason or reason
    out = {key: reason for key, reason in (("fid_off_reason", fid_reason), ("is_off_reason", is_reason)) if reason}
    if network is None:
        return out
    device = next(prior.parameters()).device
    network.to(device)
    if fid_reason is None:
        held_out_batches = DataLoader(held_out, batch_size=batch_size, collate_fn=collate)
        real = inception_features(network, (_uint8(images) for images, _ in held_out_batches
                                            if images is not None), device)  # None: a batch of unreadable files
    labels = None
    if held_out_labels is not None:
        labels = held_out_labels[torch.arange(num_samples) % len(held_out_labels)].to(device)
    samples = sample_batches(prior, tokenizer, num_samples, labels, batch_size=batch_size, seed=seed)
    # Sampling is what takes long: a bar, or about ten lines in a log file.
    progress = Progress(num_samples, "prior eval: samples for FID and IS", "sample", lines=10,
                        enabled=num_samples > batch_size)
    fake = inception_features(network, progress.track((_uint8(images) for _, images in samples), len), device)
    if fid_reason is None:
        out["fid"] = frechet_distance(*feature_statistics(fake.pool), *feature_statistics(real.pool))
    if is_reason is None:
        scores = split_inception_scores(fake.logits, INCEPTION_SCORE_SPLITS)
        # The spread over splits unbiased, as torchmetrics' score (kepler's before this) gave it.
        out["inception_score"] = [float(scores.mean()), float(scores.std(ddof=1))]
    return out


def evaluate_prior(checkpoint: str | os.PathLike, device: torch.device | str = "cpu", batch_size: int = 16, *,
                   num_samples: int = 0, inception_path: str | os.PathLike | None = None, seed: int = 0,
                   tokenizer_path: str | os.PathLike | None = None, raw_weights: bool = False) -> dict:
    """Held-out bits per token and per position of a prior, on its config's validation data encoded by
    its tokenizer, and the two baselines (fitted on its training maps) in bits per token; with
    ``num_samples``, the FID and Inception Score of that many samples (seeded by ``seed``) against the
    held-out images, where the Inception weights are on disk (:func:`sample_metrics`).
    ``tokenizer_path``: the prior's tokenizer at another path (:func:`kepler.models.load.load_prior_tokenizer`).
    ``raw_weights``: the prior's trained weights when it has EMA ones (``weights`` says which; its
    tokenizer's, ``tokenizer_weights``, are always those the prior was trained on)."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
        raise ValueError(f"num_samples must be an int >= 0, got {num_samples!r}")
    loaded = load_model(checkpoint, device, kind="prior", raw_weights=raw_weights)
    if "train_slot_counts" not in loaded.checkpoint:  # the baselines are fitted on the training maps' codes
        raise ValueError(f"{loaded.source} is an exported prior: kepler prior eval takes the training checkpoint "
                         "it was exported from (its baselines need the training maps' code counts)")
    prior = loaded.model
    tokenizer = load_prior_tokenizer(loaded, device, tokenizer_path)
    data = loaded.config["data"]
    val_set = held_out_set(data)
    val_labels = class_labels(val_set, prior.num_classes, f"data.val {data['val']!r}")
    val_codes, encoded = encode_dataset(tokenizer, val_set, batch_size, torch.device(device))
    val_labels = None if val_labels is None else val_labels[encoded]
    return {
        "checkpoint": str(checkpoint),
        "step": loaded.step,
        "weights": loaded.weights,
        "tokenizer_weights": loaded.checkpoint["tokenizer"].get("weights", "trained"),
        "tokenizer": str(tokenizer_path or loaded.checkpoint["tokenizer"]["checkpoint"]),
        "val_data": str(data["val"]),
        "val_maps": len(val_codes),
        **held_out_bits(prior, val_codes, batch_size, torch.device(device), val_labels),
        **baseline_bits(loaded.checkpoint["train_slot_counts"], val_codes, prior.layout),
        "num_samples": num_samples,
        "seed": seed,
        **sample_metrics(prior, tokenizer, val_set, val_labels, num_samples, inception_path, batch_size, seed),
    }
