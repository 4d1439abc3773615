"""The rotation trick (Fifty et al. 2024, "Restructuring vector quantization with the rotation trick").

A quantizer's output ``q`` replaces its input ``e``; the straight-through estimator hands the output's
gradient to ``e`` unchanged. The rotation trick writes the output as ``q = sg(lambda R) e`` with
``lambda = ||q|| / ||e||`` and ``R`` the rotation that takes ``e / ||e||`` to ``q / ||q||``:

    R = I - 2 r r^T + 2 q_hat e_hat^T,    r = (e_hat + q_hat) / ||e_hat + q_hat||,

and treats ``lambda R`` as a constant, so the gradient reaching ``e`` is ``lambda R^T g``: it keeps the
angle between the gradient and the input that the output had with its codeword, and scales with the
codeword's norm. ``R`` is applied as two rank-one updates, never as a ``(d, d)`` matrix.

The forward value is ``q`` itself (exactly, as the quantizer protocol asks), not ``lambda R e`` rounded.
Where ``e`` or ``q`` is zero there is no rotation to take and the gradient passes unchanged
(straight-through); where ``e_hat = -q_hat``, ``r`` is 0 and ``R = I + 2 q_hat e_hat^T``, which still
maps ``e_hat`` to ``q_hat``.
"""

from __future__ import annotations

import torch

__all__ = ["rotation_trick"]

# Below this norm a vector counts as zero (no direction to rotate from or to).
_TINY = 1e-12


class _RotationTrick(torch.autograd.Function):
    """Forward ``q`` exactly; backward ``lambda R^T g`` per row of the last dimension."""

    @staticmethod
    def forward(ctx, e: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(e, q)
        return q.contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        e, q = ctx.saved_tensors
        dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
        e, q, g = e.to(dtype), q.to(dtype), grad.to(dtype)
        e_norm = e.norm(dim=-1, keepdim=True)
        q_norm = q.norm(dim=-1, keepdim=True)
        rotates = (e_norm > _TINY) & (q_norm > _TINY)
        e_hat = e / e_norm.clamp_min(_TINY)
        q_hat = q / q_norm.clamp_min(_TINY)
        bisector = e_hat + q_hat
        r = bisector / bisector.norm(dim=-1, keepdim=True).clamp_min(_TINY)
        # R^T g = g - 2 r (r . g) + 2 e_hat (q_hat . g)
        rotated = g - 2 * r * (r * g).sum(-1, keepdim=True) + 2 * e_hat * (q_hat * g).sum(-1, keepdim=True)
        scaled = rotated * (q_norm / e_norm.clamp_min(_TINY))
        return torch.where(rotates, scaled, g).to(grad.dtype), None


def rotation_trick(e: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The codewords ``q`` (value, exactly, in ``e``'s dtype) with the rotation trick's gradient to ``e``.

    Args:
        e: ``(..., d)`` quantizer inputs, any float dtype; the rotation acts on the last dimension.
        q: ``(..., d)`` their codewords (same shape); detached here, so no gradient reaches them
            through this function.

    Returns:
        ``(..., d)`` contiguous, ``e``'s dtype: ``q``, differentiable with respect to ``e`` by
        ``grad_e = (||q|| / ||e||) R^T grad`` (see the module docstring), computed in float32
        (float64 for float64 gradients).
    """
    if e.shape != q.shape:
        raise ValueError(f"e and q must have the same shape, got {tuple(e.shape)} and {tuple(q.shape)}")
    return _RotationTrick.apply(e, q.detach().to(e.dtype))
