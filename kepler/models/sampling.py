"""Images from a prior: index maps drawn by a :class:`~kepler.models.CodeTransformer`, decoded by its
tokenizer (a :class:`~kepler.models.VQModel`)."""

from __future__ import annotations

import torch

from kepler.models.code_transformer import CodeTransformer
from kepler.models.vqmodel import VQModel


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
