"""Images from a prior: index maps drawn by a :class:`~kepler.models.CodeTransformer`, decoded by its
tokenizer (a :class:`~kepler.models.VQModel`), all at once (:func:`sample_images`) or a batch at a
time (:func:`sample_batches`, for any number of samples in bounded memory)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from kepler.models.code_transformer import CodeTransformer
from kepler.models.vqmodel import VQModel


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


def sample_batches(prior: CodeTransformer, tokenizer: VQModel, num: int,
                   class_label: int | torch.Tensor | None = None, *, batch_size: int = 64, seed: int = 0,
                   **sampling) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`sample_images` of ``num`` samples drawn ``batch_size`` at a time from one generator
    seeded with ``seed``: yields ``(index maps, images)`` of each batch, so memory does not grow
    with ``num``. The same ``seed`` and ``batch_size`` give the same samples on one device.
    ``class_label``: one class, or one per sample ``(num,)``; ``sampling``: ``temperature``,
    ``top_k``, ``top_p``, ``cfg_scale``, ``cfg_schedule``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    generator = torch.Generator(next(prior.parameters()).device).manual_seed(seed)
    for start in range(0, num, batch_size):
        count = min(batch_size, num - start)
        labels = class_label[start : start + count] if isinstance(class_label, torch.Tensor) else class_label
        yield sample_images(prior, tokenizer, count, labels, seed=generator, **sampling)
