"""What the trainer trains for a prior: a :class:`kepler.models.CodeTransformer` over the index maps
of a frozen tokenizer (the second stage; ``kepler prior train``).

The tokenizer (config key ``tokenizer.checkpoint``: a run's checkpoint or an exported folder) encodes
the training images (one crop each: a folder's center crop, the embedded sets' seeded crops; and its
horizontal flip when ``data.flip``) and the held-out
images once; the index maps are cached under the run folder (``codes/<key>.pt``), keyed by the
tokenizer file's SHA-256 and the data settings, so a resumed run or a rerun reads them back and a
changed tokenizer or data section encodes again. Validation is the held-out negative log-likelihood in
bits per token (sub-code) and per position, next to two baselines fitted on the training maps (add-one
smoothed, also in bits per token): one code histogram per codebook (unigram) and one per slot
``(h, w, p)`` of the map (per-position unigram).

A class-conditional prior (``model.num_classes > 0``) needs labelled data (``faces``; see
:func:`kepler.data.dataset_labels`) with exactly that many classes, in ``data.train`` and ``data.val``:
the cache then holds each map's class too (a flip keeps its image's class), and the class is the
start token in training, validation and sampling. An unconditional prior ignores labels.

Each validation also draws ``train.grid_images`` samples (seed 0, so that successive grids compare)
and writes them, decoded by the tokenizer, to ``samples_step<N>.png``, ``samples.png`` and TensorBoard.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset

from kepler.data import build_dataset, collate, dataset_labels, first_items
from kepler.data.images import split_key
from kepler.distributed import barrier, rank_local
from kepler.models import CodeTransformer, VQModel
from kepler.models.code_sequence import CodeLayout
from kepler.models.code_transformer import token_cross_entropy
from kepler.train.checkpoint import load_checkpoint, save_checkpoint
from kepler.train.config import build_optimizer, to_dict
from kepler.train.evaluate import (
    INCEPTION_SCORE_SPLITS,
    load_fid,
    load_inception_score,
    load_model,
    save_image_grid,
    to_unit,
)
from kepler.weights import check_state_dict


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, or of a folder's files (names and contents, in sorted order)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path)).encode() if path.is_dir() else b"")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def tokenizer_layout(tokenizer: VQModel, size: int) -> CodeLayout:
    """The layout of ``tokenizer``'s index maps of ``size x size`` images."""
    factor = tokenizer.downsample_factor
    return CodeLayout.from_quantizer(tokenizer.quantize, (size // factor, size // factor))


@torch.no_grad()
def encode_dataset(tokenizer: VQModel, dataset: Dataset, batch_size: int, device: torch.device,
                   flips: bool = False) -> torch.Tensor:
    """Index maps ``(N, H, W, P)`` int64 of every image of ``dataset`` (then of their horizontal
    flips, ``2N`` maps, when ``flips``)."""
    maps, flipped = [], []
    for images, _ in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        images = images.to(device)
        maps.append(tokenizer.encode_to_indices(images).cpu())
        if flips:
            flipped.append(tokenizer.encode_to_indices(images.flip(-1)).cpu())
    return torch.cat(maps + flipped)


class CodeMaps(Dataset):
    """Index maps as a data set, for :func:`kepler.data.collate`: items ``(map (H, W, P) int64, ())``,
    or ``((map, label 0-d int64), ())`` with ``labels`` (``(N,)``, one per map)."""

    def __init__(self, codes: torch.Tensor, labels: torch.Tensor | None = None):
        self.codes = codes
        self.labels = labels

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, key):
        index, _ = split_key(key)  # SeededSampler's (index, seed): maps take no augmentation
        if self.labels is None:
            return self.codes[index], ()
        return (self.codes[index], self.labels[index]), ()


def class_labels(dataset: Dataset, num_classes: int, where: str) -> torch.Tensor | None:
    """The labels ``(N,)`` int64 of ``dataset`` (the data named by ``where``, e.g. ``"data.train
    'faces'"``) for a prior of ``num_classes`` classes; None for an unconditional prior (0). A
    ValueError naming both counts when the data set has no labels or another number of classes."""
    if num_classes == 0:
        return None
    found, labels = dataset_labels(dataset)
    if found == 0:
        raise ValueError(f"config key 'model.num_classes' is {num_classes}, but {where} has no class labels "
                         "(labelled data: faces); use model.num_classes=0 for an unconditional prior")
    if found != num_classes:
        raise ValueError(f"config key 'model.num_classes' is {num_classes}, but {where} has {found} classes")
    return labels


def slot_counts(codes: torch.Tensor, layout: CodeLayout) -> torch.Tensor:
    """``(H*W*P, K)`` int64: how often each code fills each slot of ``codes (N, H, W, P)``."""
    slots = codes.reshape(len(codes), -1)
    counts = torch.zeros(slots.shape[1], layout.codebook_size, dtype=torch.int64)
    counts.scatter_add_(1, slots.T.contiguous(), torch.ones_like(slots.T))
    return counts


def baseline_bits(train_counts: torch.Tensor, val_codes: torch.Tensor, layout: CodeLayout) -> dict[str, float]:
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
def held_out_bits(model: CodeTransformer, codes: torch.Tensor, batch_size: int, device: torch.device,
                  labels: torch.Tensor | None = None) -> dict:
    """``bits_per_token`` and ``bits_per_position`` of ``codes (N, H, W, P)`` under ``model`` (given
    their classes ``labels (N,)`` for a class-conditional one)."""
    nats = 0.0
    was_training = model.training
    model.eval()
    for start in range(0, len(codes), batch_size):
        batch = slice(start, start + batch_size)
        batch_labels = None if labels is None else labels[batch].to(device)
        nats += float(model.nll(codes[batch].to(device), batch_labels).nats.sum())
    model.train(was_training)
    layout = model.layout
    bits = nats / math.log(2) / len(codes)
    return {"bits_per_token": bits / layout.flat_length, "bits_per_position": bits / layout.positions}


def held_out_set(data) -> Dataset:
    """The held-out images of a ``data`` section (a config section or its dict): the first
    ``val_max_images``."""
    return first_items(build_dataset(data["val"], "val", data["size"], data["resize"]), data["val_max_images"])


def load_tokenizer(path: str, device: torch.device | str = "cpu") -> VQModel:
    """The frozen tokenizer at ``path``; FileNotFoundError, one line, when it is not there."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer {path} does not exist (the prior's tokenizer.checkpoint)")
    tokenizer, _ = load_model(path, device)
    return tokenizer.requires_grad_(False)


class PriorTask:
    """The prior task (see the module docstring); the trainer's interface as
    :class:`~kepler.train.vqgan_task.VQGANTask`'s."""

    def __init__(self, trainer, lr: float, lr_factor):
        cfg = trainer.cfg
        self.trainer = trainer
        device = trainer.device
        self.tokenizer_path = str(cfg.tokenizer.checkpoint)
        self.num_classes = int(cfg.model.num_classes)
        # Loading and encoding must not draw from the seeded RNG: the prior's initial weights are the
        # same whether the codes are encoded now or read from the cache.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            tokenizer = load_tokenizer(self.tokenizer_path, device)
            self.layout = tokenizer_layout(tokenizer, cfg.data.size)
            self.tokenizer_sha256 = file_sha256(self.tokenizer_path)
            cached = self._codes(tokenizer, trainer)
        # Kept where validation draws sample grids (rank 0); else freed.
        self.tokenizer = tokenizer if trainer.dist.is_main and cfg.train.grid_images else None
        del tokenizer
        self.val_codes, self.val_labels = cached["val"], cached.get("val_labels")
        self.train_counts = slot_counts(cached["train"], self.layout)
        self.train_set = CodeMaps(cached["train"], cached.get("train_labels"))

        self.model = CodeTransformer(self.layout, **to_dict(cfg.model)).to(device)
        self.opt = build_optimizer(cfg.optim, self.model.parameters(), lr)  # AdamW unless optim.name says otherwise
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_factor)
        self.model_ddp = self.model

    def _codes(self, tokenizer: VQModel, trainer) -> dict:
        """The cache's entries: training and held-out index maps (``train``, ``val``) and, for a
        class-conditional prior, their classes (``train_labels``, ``val_labels``), read back or encoded
        (by rank 0) and cached."""
        data = trainer.cfg.data
        settings = {key: data[key] for key in ("train", "val", "size", "resize", "flip", "samples_per_epoch",
                                               "val_max_images")}
        if self.num_classes:  # only then: an unconditional prior's cache keeps its key
            settings["num_classes"] = self.num_classes
        key = hashlib.sha256(json.dumps({"tokenizer": self.tokenizer_sha256, **settings}, sort_keys=True,
                                        default=str).encode()).hexdigest()[:16]
        path = trainer.run_dir / "codes" / f"{key}.pt"
        if trainer.dist.is_main and not path.is_file():
            self._encode_and_cache(tokenizer, trainer, settings, path)
        barrier()
        return torch.load(path, map_location="cpu", weights_only=True)

    @rank_local()
    def _encode_and_cache(self, tokenizer: VQModel, trainer, settings: dict, path: Path) -> None:
        """Rank 0 alone: encode the training and held-out images, write them to ``path``."""
        data = trainer.cfg.data
        # Each training image is encoded once (a folder's as its center crop; the embedded sets'
        # crops are seeded per image), its horizontal flip as a map of its own.
        train_set = build_dataset(data.train, "train", data.size, data.resize, random_crop=False,
                                  flip=False, samples_per_epoch=data.samples_per_epoch)
        val_set = held_out_set(data)
        train_labels = class_labels(train_set, self.num_classes, f"data.train {data.train!r}")
        val_labels = class_labels(val_set, self.num_classes, f"data.val {data.val!r}")
        codes = {
            "val": encode_dataset(tokenizer, val_set, data.val_batch_size, trainer.device),
            "train": encode_dataset(tokenizer, train_set, data.val_batch_size, trainer.device, flips=data.flip),
        }
        if self.num_classes:
            # encode_dataset puts the flips after all the maps, in the same order.
            codes.update(train_labels=train_labels.repeat(2 if data.flip else 1), val_labels=val_labels)
        save_checkpoint({**codes, "tokenizer_sha256": self.tokenizer_sha256, "data": settings}, path)

    @property
    def status(self) -> str:
        classes = f", {self.num_classes} classes" if self.num_classes else ""
        return (f"{len(self.train_set)} training maps of {self.layout.height}x{self.layout.width}x"
                f"{self.layout.tokens_per_position} codes (K={self.layout.codebook_size}{classes})")

    def wrap_ddp(self, device_ids) -> None:
        self.model_ddp = DDP(self.model, device_ids=device_ids)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
            "tokenizer": {"checkpoint": self.tokenizer_path, "sha256": self.tokenizer_sha256,
                          "layout": asdict(self.layout)},
            "train_slot_counts": self.train_counts,
        }

    def load_state_dict(self, state: dict, source: str) -> None:
        check_state_dict(self.model, state["model"], source)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])

    def init_from(self, path: str) -> None:
        state = load_checkpoint(path)
        check_state_dict(self.model, state["model"], f"train.init_from checkpoint {path}")
        self.model.load_state_dict(state["model"])

    # ------------------------------------------------------------------ one step

    def train_step(self, batches) -> dict:
        trainer = self.trainer
        accum = int(trainer.cfg.optim.grad_accum)
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        for i in range(accum):
            batch, _ = next(batches)
            codes, labels = batch if self.num_classes else (batch, None)
            codes = codes.to(trainer.device, non_blocking=True)
            if labels is not None:
                labels = labels.to(trainer.device, non_blocking=True)
            sync = i == accum - 1 or not trainer.dist.enabled
            with contextlib.nullcontext() if sync else self.model_ddp.no_sync():
                with trainer.autocast():
                    logits = self.model_ddp(codes, labels)
                loss = token_cross_entropy(logits, codes)
                trainer.scaler.scale(loss / accum).backward()
            total += float(loss.detach()) / accum
        trainer.clip_and_step(self.opt, self.model.parameters())
        trainer.scaler.update()
        return {"loss": total, "bits_per_token": total / math.log(2)}

    def step_schedulers(self) -> None:
        """Advance the learning rate, once the trainer has counted the step (see Trainer.train_step)."""
        self.sched.step()

    def current_lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def progress_fields(self, record: dict) -> dict:
        return {"bits": f"{record['bits_per_token']:.3f}"}

    def after_log(self) -> None:
        pass

    # ------------------------------------------------------------------ eval

    def validate(self) -> dict:
        """Held-out bits and their baselines; rank 0 also writes the sample grid to the run folder."""
        trainer = self.trainer
        if self.tokenizer is not None:
            self._write_samples(trainer.cfg.train.grid_images)
        return {
            **held_out_bits(self.model, self.val_codes, trainer.cfg.data.val_batch_size, trainer.device,
                            self.val_labels),
            **baseline_bits(self.train_counts, self.val_codes, self.layout),
            "val_maps": len(self.val_codes),
        }

    def _write_samples(self, num: int) -> None:
        """``num`` samples (seed 0; a class-conditional prior's cycle through the classes) as
        ``samples_step<N>.png`` and ``samples.png`` in the run folder, and in TensorBoard."""
        trainer = self.trainer
        labels = torch.arange(num, device=trainer.device) % self.num_classes if self.num_classes else None
        _, images = sample_images(self.model, self.tokenizer, num, labels, seed=0)
        path = save_image_grid(images.cpu(), trainer.run_dir / f"samples_step{trainer.step}.png")
        (trainer.run_dir / "samples.png").write_bytes(path.read_bytes())
        trainer.tb.add_images("val/samples", to_unit(images), trainer.step)

    def final_metrics(self) -> dict:
        return {"tokenizer": self.tokenizer_path, "train_maps": len(self.train_set),
                "tokens_per_map": self.layout.flat_length}


# ---------------------------------------------------------------------- trained priors


def _layout_text(layout: CodeLayout) -> str:
    shared = "shared" if layout.shared_codebook else "separate"
    return (f"{layout.height}x{layout.width}x{layout.tokens_per_position} codes of K={layout.codebook_size} "
            f"({shared} codebook)")


def load_prior(checkpoint: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[CodeTransformer, dict]:
    """``(CodeTransformer in eval mode, checkpoint dict)`` from a ``kepler prior train`` checkpoint."""
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"prior checkpoint {checkpoint} does not exist")
    state = load_checkpoint(checkpoint)
    if "tokenizer" not in state:
        raise ValueError(f"{checkpoint} is not a prior checkpoint (it names no tokenizer; kepler prior train writes one)")
    model = CodeTransformer(CodeLayout(**state["tokenizer"]["layout"]), **state["config"]["model"])
    check_state_dict(model, state["model"], f"prior checkpoint {checkpoint}")
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state


def prior_tokenizer(prior: CodeTransformer, state: dict, device: torch.device | str = "cpu") -> VQModel:
    """The tokenizer a prior checkpoint names, checked to make the index maps the prior models."""
    path = state["tokenizer"]["checkpoint"]
    tokenizer = load_tokenizer(path, device)
    layout = tokenizer_layout(tokenizer, int(state["config"]["data"]["size"]))
    if layout != prior.layout:
        raise ValueError(f"mismatched vocabulary: the prior models {_layout_text(prior.layout)}, "
                         f"tokenizer {path} makes {_layout_text(layout)}")
    return tokenizer


@torch.no_grad()
def sample_images(prior: CodeTransformer, tokenizer: VQModel, num: int,
                  class_label: int | torch.Tensor | None = None, *, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None,
                  seed: int | torch.Generator = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` samples: ``(index maps (num, H, W, P) int64, images (num, 3, H*f, W*f) float32 in [-1, 1])``,
    the same for the same ``seed`` on one device (a generator on the prior's device: drawn from, so
    that batches drawn one after another differ). ``class_label``: the class of every sample, or one
    per sample ``(num,)``; required by a class-conditional prior and refused by an unconditional one."""
    num_classes = prior.num_classes
    if class_label is not None and num_classes == 0:
        raise ValueError(f"a class ({class_label}) was given, but the prior is unconditional (model.num_classes=0)")
    if class_label is None and num_classes:
        raise ValueError(f"the prior is class-conditional (model.num_classes={num_classes}): give a class "
                         f"from 0 to {num_classes - 1}")
    if isinstance(class_label, int) and not 0 <= class_label < num_classes:
        raise ValueError(f"class {class_label} is out of range: the prior has {num_classes} classes, "
                         f"0 to {num_classes - 1}")
    device = next(prior.parameters()).device
    generator = seed if isinstance(seed, torch.Generator) else torch.Generator(device).manual_seed(seed)
    codes = prior.generate(num, class_label, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    return codes, tokenizer.decode_indices(codes).float().clamp(-1, 1)


@torch.no_grad()
def sample_metrics(prior: CodeTransformer, tokenizer: VQModel, held_out: Dataset, held_out_labels: torch.Tensor | None,
                   num_samples: int, inception_path: str | os.PathLike | None, batch_size: int, seed: int) -> dict:
    """FID of ``num_samples`` samples (:func:`sample_images` in batches of ``batch_size``, one
    generator seeded with ``seed``) against the ``held_out`` images, and their Inception Score
    ``[mean, std]``, on the local FID Inception weights (:func:`kepler.train.evaluate.load_fid`); a
    class-conditional prior's samples take the held-out classes in turn (the same proportions).
    ``fid_off_reason`` / ``is_off_reason`` instead where a metric cannot run."""
    # The weights are looked at only where the counts allow a metric (reading them takes seconds).
    if num_samples < 2:
        fid, fid_reason = None, f"num_samples is {num_samples}; FID needs at least 2 samples"
    elif len(held_out) < 2:
        fid, fid_reason = None, f"the held-out set has {len(held_out)} image(s); FID needs at least 2"
    else:
        fid, fid_reason = load_fid(inception_path)
    if num_samples < INCEPTION_SCORE_SPLITS:
        score, is_reason = None, (f"num_samples is {num_samples}; the Inception Score needs at least "
                                  f"{INCEPTION_SCORE_SPLITS} (one per split)")
    else:
        score, is_reason = load_inception_score(inception_path)
    out = {}
    if fid is None:
        out["fid_off_reason"] = fid_reason
    if score is None:
        out["is_off_reason"] = is_reason
    if fid is None and score is None:
        return out
    device = next(prior.parameters()).device
    if fid is not None:
        fid = fid.to(device)
        for images, _ in DataLoader(held_out, batch_size=batch_size, collate_fn=collate):
            fid.update(to_unit(images.to(device)), real=True)
    if score is not None:
        score = score.to(device)
    labels = None
    if held_out_labels is not None:
        labels = held_out_labels[torch.arange(num_samples) % len(held_out_labels)].to(device)
    generator = torch.Generator(device).manual_seed(seed)
    for start in range(0, num_samples, batch_size):
        count = min(batch_size, num_samples - start)
        batch_labels = None if labels is None else labels[start : start + count]
        _, images = sample_images(prior, tokenizer, count, batch_labels, seed=generator)
        images = to_unit(images)  # (count, 3, H, W) float32 in [0, 1], what both metrics take
        if fid is not None:
            fid.update(images, real=False)
        if score is not None:
            score.update(images)
    if fid is not None:
        out["fid"] = float(fid.compute())
    if score is not None:
        # The score shuffles the samples into its splits with the global RNG: seeded, so one seed
        # gives one score.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            mean, std = score.compute()
        out["inception_score"] = [float(mean), float(std)]
    return out


def evaluate_prior(checkpoint: str | os.PathLike, device: torch.device | str = "cpu", batch_size: int = 16, *,
                   num_samples: int = 0, inception_path: str | os.PathLike | None = None, seed: int = 0) -> dict:
    """Held-out bits per token and per position of a prior, on its config's validation data encoded by
    its tokenizer, and the two baselines (fitted on its training maps) in bits per token; with
    ``num_samples``, the FID and Inception Score of that many samples (seeded by ``seed``) against the
    held-out images, where the Inception weights are on disk (:func:`sample_metrics`)."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
        raise ValueError(f"num_samples must be an int >= 0, got {num_samples!r}")
    prior, state = load_prior(checkpoint, device)
    tokenizer = prior_tokenizer(prior, state, device)
    data = state["config"]["data"]
    val_set = held_out_set(data)
    val_labels = class_labels(val_set, prior.num_classes, f"data.val {data['val']!r}")
    val_codes = encode_dataset(tokenizer, val_set, batch_size, torch.device(device))
    return {
        "checkpoint": str(checkpoint),
        "step": int(state["step"]),
        "tokenizer": state["tokenizer"]["checkpoint"],
        "val_data": str(data["val"]),
        "val_maps": len(val_codes),
        **held_out_bits(prior, val_codes, batch_size, torch.device(device), val_labels),
        **baseline_bits(state["train_slot_counts"], val_codes, prior.layout),
        "num_samples": num_samples,
        "seed": seed,
        **sample_metrics(prior, tokenizer, val_set, val_labels, num_samples, inception_path, batch_size, seed),
    }
