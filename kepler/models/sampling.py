"""Images from a prior: index maps drawn by a :class:`~kepler.models.CodeTransformer`, decoded by its
tokenizer (a :class:`~kepler.models.VQModel`), all at once (:func:`sample_images`), a batch at a time
(:func:`sample_batches`, for any number of samples in bounded memory), or by every process of a
``torch.distributed`` group into one ``.npz`` for the field's evaluators (:func:`sample_npz`).

Seeds: batch ``i`` of the samples of seed ``s`` draws from its own generator, seeded with
:func:`batch_seed` ``(s, i)``, so any batch can be drawn alone (by whichever process, in any order,
after a restart) and gives the same samples. The samples are fixed by the seed and the batch size,
whatever the number of processes and whether they are written as PNGs or into an ``.npz``.

Classes of a class-conditional prior's samples: one class for all, one per sample ``(num,)``,
``"balanced"`` (sample ``j`` is of class ``j mod num_classes``: each class equally often, to one) or
``"random"`` (uniform, drawn from the batch's generator: ADM's and LlamaGen's protocol).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from kepler.data.transforms import to_uint8
from kepler.distributed import barrier, is_distributed
from kepler.io.sample_npz import SampleChunks
from kepler.models.code_transformer import CodeTransformer
from kepler.models.vqmodel import VQModel

CLASS_CHOICES = ("balanced", "random")
# classes: None (unconditional), one class, one per sample (num,), or one of CLASS_CHOICES.
Classes = int | torch.Tensor | str | None


@torch.no_grad()
def sample_images(prior: CodeTransformer, tokenizer: VQModel, num: int,
                  class_label: int | torch.Tensor | None = None, *, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, cfg_scale: float | None = None,
                  cfg_schedule: str = "constant", seed: int | torch.Generator = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` samples: ``(index maps (num, H, W, P) int64, images (num, 3, H*f, W*f) float32 in [-1, 1])``,
    the same for the same ``seed`` on one device (a generator on the prior's device: drawn from, so
    that batches drawn one after another differ). ``class_label``: the class of every sample, or one
    per sample ``(num,)``; required by a class-conditional prior and refused by an unconditional one.
    ``cfg_scale``, ``cfg_schedule``: classifier-free guidance (:meth:`CodeTransformer.generate`)."""
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
    codes = prior.generate(num, class_label, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                           cfg_scale=cfg_scale, cfg_schedule=cfg_schedule)
    return codes, tokenizer.decode_indices(codes).float().clamp(-1, 1)


def batch_seed(seed: int, index: int) -> int:
    """The seed of batch ``index`` of the samples of ``seed``: numpy's ``SeedSequence`` of the pair,
    so that the batches' streams are independent (``seed + index`` would make the batches of seeds
    ``s`` and ``s + 1`` overlap)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


def _check_classes(prior: CodeTransformer, classes: Classes) -> None:
    if isinstance(classes, str):
        if classes not in CLASS_CHOICES:
            raise ValueError(f"classes must be a class, one per sample, {' or '.join(map(repr, CLASS_CHOICES))}, "
                             f"got {classes!r}")
        if not prior.num_classes:
            raise ValueError(f"{classes} classes were asked of an unconditional prior (model.num_classes=0)")


def _batch_classes(classes: Classes, num_classes: int, start: int, count: int,
                   generator: torch.Generator) -> int | torch.Tensor | None:
    """The classes of samples ``start .. start + count - 1`` (``classes`` as the module docstring says)."""
    if isinstance(classes, torch.Tensor):
        return classes[start : start + count]
    if classes == "balanced":
        return torch.arange(start, start + count, device=generator.device) % num_classes
    if classes == "random":
        return torch.randint(num_classes, (count,), generator=generator, device=generator.device)
    return classes


def sample_batch(prior: CodeTransformer, tokenizer: VQModel, index: int, num: int, classes: Classes = None, *,
                 batch_size: int = 64, seed: int = 0,
                 **sampling) -> tuple[torch.Tensor, torch.Tensor, int | torch.Tensor | None]:
    """Batch ``index`` of ``num`` samples drawn ``batch_size`` at a time: samples ``index * batch_size``
    on, from the generator of :func:`batch_seed` ``(seed, index)`` on the prior's device. Returns
    ``(index maps, images, classes)`` as :func:`sample_images` (classes as given to it).
    ``sampling``: :func:`sample_images`' ``temperature``, ``top_k``, ``top_p``, ``cfg_scale``,
    ``cfg_schedule``."""
    start = index * batch_size
    if not 0 <= start < num:
        raise ValueError(f"batch {index} of {batch_size} is not among the {num} samples")
    generator = torch.Generator(next(prior.parameters()).device).manual_seed(batch_seed(seed, index))
    labels = _batch_classes(classes, prior.num_classes, start, min(batch_size, num - start), generator)
    codes, images = sample_images(prior, tokenizer, min(batch_size, num - start), labels, seed=generator, **sampling)
    return codes, images, labels


def sample_batches(prior: CodeTransformer, tokenizer: VQModel, num: int, classes: Classes = None, *,
                   batch_size: int = 64, seed: int = 0, **sampling) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``num`` samples a batch at a time (:func:`sample_batch` of each), so memory does not grow with
    ``num``: yields ``(index maps, images)`` of each batch. ``classes``: see the module docstring."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    _check_classes(prior, classes)
    for index in range(math.ceil(num / batch_size)):
        yield sample_batch(prior, tokenizer, index, num, classes, batch_size=batch_size, seed=seed, **sampling)[:2]


def sample_npz(prior: CodeTransformer, tokenizer: VQModel, out: str | os.PathLike, num: int, classes: Classes = None,
               *, batch_size: int = 64, seed: int = 0, run: Mapping | None = None,
               progress: Callable[[int, int], object] | None = None, **sampling) -> Path | None:
    """``num`` samples into the ``.npz`` ``out`` (:mod:`kepler.io.sample_npz`: ``arr_0`` the images,
    ``arr_1`` their classes for a class-conditional prior), by every rank of the ``torch.distributed``
    group (or this process alone).

    The samples are :func:`sample_batch`'s batches, one chunk each: rank ``r`` of ``R`` draws batches
    ``r, r + R, ...`` and saves each as it is done (:class:`~kepler.io.sample_npz.SampleChunks`, beside
    ``out``); a run that finds finished chunks of the same settings skips them. When every rank is
    done, rank 0 writes ``out`` and removes the chunks; returns ``out`` there, None on other ranks.

    ``run``: what else decides the samples, checked against the chunks found (the prior's and the
    tokenizer's identities: a resumed run must draw from the same models). ``progress(done, share)``:
    called with this rank's finished samples and its share, first after counting the chunks found,
    then after each chunk. ``classes``, ``sampling``: as :func:`sample_batch` takes them."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be an int >= 1, got {num!r}")
    _check_classes(prior, classes)
    if isinstance(classes, torch.Tensor):
        classes = classes.tolist()  # a list in run.json; a tensor again below
    settings = {"num": num, "batch_size": batch_size, "seed": seed, "classes": classes, **sampling, **(run or {})}
    chunks = SampleChunks(out, settings)
    if isinstance(classes, list):
        classes = torch.tensor(classes, device=next(prior.parameters()).device)
    rank, ranks = (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)
    count = math.ceil(num / batch_size)
    mine = range(rank, count, ranks)
    sizes = {index: min(batch_size, num - index * batch_size) for index in mine}
    done = sum(sizes[index] for index in mine if chunks.done(index))
    if progress is not None:
        progress(done, sum(sizes.values()))
    for index in mine:
        if chunks.done(index):
            continue
        _, images, labels = sample_batch(prior, tokenizer, index, num, classes, batch_size=batch_size, seed=seed,
                                         **sampling)
        if isinstance(labels, int):
            labels = torch.full((sizes[index],), labels)
        chunks.save(index, to_uint8(images), None if labels is None else labels.cpu().numpy())
        done += sizes[index]
        if progress is not None:
            progress(done, sum(sizes.values()))
    barrier()
    if rank != 0:
        return None
    factor = tokenizer.downsample_factor
    return chunks.assemble(count, num, (prior.layout.height * factor, prior.layout.width * factor))
