"""The released Kepler KL regularizer as a fused op: registration, ``KeplerKLFunction``, the functional.

Math (the spec is :mod:`kepler.reference.kepler_kl`): for each row ``x_b: (M,)``

* ``s = (x - mean) / var`` (``mode="official"``, as released: the unbiased *variance*) or
  ``s = (x - mean) / std`` (``mode="std"``, unbiased standard deviation);
* ``p = softmax(s)``, ``q = softmax(standardized prior)``;
* ``loss_b = sum_i p_i * log(p_i / q_i + eps)``; the result is the batch mean. ``eps = 0`` is the
  plain KL(p || q); the released code uses ``eps = 1e-5``.

Degenerate rows: ``M == 1`` (unbiased variance undefined) and rows with all elements equal
standardize to zeros: ``p`` is uniform, the loss is ``sum_i (1/M) log((1/M) / q_i + eps)``
(``log(1 + eps)`` for ``M == 1``) and the gradient is zero. NaN in a row makes the loss NaN.

Kernels (``cpu``, ``cuda``, ``triton``) read each row a few times and write only the gradient:
forward passes (1) mean/variance/max, (2) logsumexp of ``u = s - max s`` (never of ``s`` itself,
whose size ~1/variance in official mode would swamp the O(1) log-probabilities), (3) the loss;
backward passes, with ``s`` taken relative to a pivot (the sums below are shift-invariant),
(1) ``sum p``, ``sum p g``, ``sum p s``, ``sum p s g`` with ``g_i = dL/dp_i = log(r_i + eps) +
r_i / (r_i + eps)``, ``r_i = p_i / q_i``, then (2) the gradient through the softmax
(``dL/ds_i = p_i (g_i - sum_j p_j g_j)``) and the standardization:

* official: ``dx_k = d_k / var - 2 S s_k / (M - 1)``
* std:      ``dx_k = (d_k - S s_k / (M - 1)) / std``

with ``d = dL/ds`` and ``S = sum_i d_i s_i``. All math is fp32 (fp64 across blocks of a row).
The prior enters as ``prior_logq = log q`` in float32, computed once in float64 by
:func:`kepler_kl_prior_logq` (a module can cache it in a buffer); no gradient flows to the prior.

Backends (see ``kepler._backend``):

* ``reference``: ``kepler_kl_ref`` (``kepler_kl_rows_ref`` given ``prior_logq``) with plain autograd
  (the only one taking float64).
* ``cpu`` / ``cuda``: ``torch.ops.kepler.kepler_kl`` (+ ``_backward``) from ``kepler._C``.
* ``triton``: ``torch.ops.kepler.kepler_kl_triton`` (+ ``_backward_triton``) from
  ``kepler.kernels.kepler_kl``.

Every registered op has a fake implementation, so ``torch.compile(fullgraph=True)`` traces through
them.
"""

from __future__ import annotations

import math

import torch

from kepler import _backend
from kepler.ops._common import check_input, register_op, registered_op
from kepler.reference.kepler_kl import MODES, kepler_kl_prior_logq_ref, kepler_kl_ref, kepler_kl_rows_ref


def _kepler_kl_fake(x: torch.Tensor, prior_logq: torch.Tensor, use_std: bool, eps: float):
    """loss (B,) and stats (B, 3), float32."""
    rows = x.shape[0]
    return x.new_empty((rows,), dtype=torch.float32), x.new_empty((rows, 3), dtype=torch.float32)


def _kepler_kl_backward_fake(grad_loss, x, prior_logq, stats, use_std: bool, eps: float) -> torch.Tensor:
    """grad_x: (B, M) contiguous, x's dtype."""
    return x.new_empty(x.shape)


register_op(
    "kepler_kl",
    "(Tensor x, Tensor prior_logq, bool use_std, float eps) -> (Tensor loss, Tensor stats)",
    _kepler_kl_fake,
)
register_op(
    "kepler_kl_backward",
    "(Tensor grad_loss, Tensor x, Tensor prior_logq, Tensor stats, bool use_std, float eps) -> Tensor",
    _kepler_kl_backward_fake,
)


class KeplerKLFunction(torch.autograd.Function):
    """Per-row Kepler KL ``(B,)`` of ``x: (B, M)`` against ``prior_logq: (1 | B, M)`` on a kernel backend.

    Differentiable in ``x`` only; ``backend`` is ``"cpu"``, ``"cuda"`` or ``"triton"``.
    """

    @staticmethod
    def forward(ctx, x, prior_logq, use_std: bool, eps: float, backend: str):
        loss, stats = registered_op("kepler_kl", backend)(x, prior_logq, use_std, eps)
        ctx.save_for_backward(x, prior_logq, stats)
        ctx.use_std, ctx.eps, ctx.backend = use_std, eps, backend
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        x, prior_logq, stats = ctx.saved_tensors
        backward_op = registered_op("kepler_kl_backward", ctx.backend)
        grad_x = backward_op(grad_loss.contiguous(), x, prior_logq, stats, ctx.use_std, ctx.eps)
        return grad_x, None, None, None, None


def _check_inputs(x, prior, prior_logq, mode: str, eps: float) -> None:
    check_input("x", x)
    if x.ndim != 2:
        raise ValueError(f"x must be a 2-D tensor (B, M), one flattened latent per row, got shape {tuple(x.shape)}")
    rows, cols = x.shape
    if rows == 0:
        raise ValueError("x has no rows (B == 0): the batch mean of the Kepler KL is undefined")
    if cols == 0:
        raise ValueError("x has no columns (M == 0): each row needs at least one element")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if (prior is None) == (prior_logq is None):
        raise ValueError("pass exactly one of prior and prior_logq")
    given = prior if prior is not None else prior_logq
    name = "prior" if prior is not None else "prior_logq"
    check_input(name, given)
    if given.device != x.device:
        raise ValueError(f"{name} is on {given.device} but x is on {x.device}; put them on the same device")
    if given.shape not in ((cols,), (1, cols), (rows, cols)):
        raise ValueError(
            f"{name} must have shape ({cols},), (1, {cols}) or ({rows}, {cols}) "
            f"for x of shape {tuple(x.shape)}, got {tuple(given.shape)}"
        )
    if prior_logq is not None and prior_logq.dtype != torch.float32:
        raise TypeError(f"prior_logq must be float32 (from kepler_kl_prior_logq), got {prior_logq.dtype}")


def kepler_kl(
    x: torch.Tensor,
    prior: torch.Tensor | None = None,
    *,
    prior_logq: torch.Tensor | None = None,
    mode: str = "official",
    eps: float = 1e-5,
    backend: str | None = None,
) -> torch.Tensor:
    """The released Kepler KL regularizer: ``mean_b sum_i p_bi * log(p_bi / q_bi + eps)``.

    Args:
        x: ``(B, M)`` float32/bfloat16/float16 (float64 on the reference backend), one flattened
            quantized latent per row; differentiable.
        prior: ``(M,)`` or ``(B, M)`` float prior (the released hypercube grid, flattened); a
            constant: no gradient flows to it.
        prior_logq: instead of ``prior``, its cached :func:`kepler_kl_prior_logq` (``(1, M)`` or
            ``(B, M)`` float32, same ``mode``). Give exactly one of ``prior`` and ``prior_logq``.
        mode: ``"official"`` divides by the unbiased variance (as released), ``"std"`` by the
            unbiased standard deviation.
        eps: ``>= 0`` added to ``p / q`` inside the log (released: ``1e-5``; ``0`` = plain KL).
        backend: ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``None``/``"auto"``.

    Returns:
        Scalar loss, float32 (float64 for float64 ``x``). ``B == 0`` raises: the batch mean of no
        rows is undefined. Rows with one element or all elements equal have a uniform ``p`` and a
        zero gradient; NaN in ``x`` gives a NaN loss.

    Note:
        The released code standardizes the whole prior and then keeps its first ``M`` entries when
        the prior is longer than the latent; pass that slice (or a prior of exactly ``M``) here.
    """
    _check_inputs(x, prior, prior_logq, mode, eps)
    chosen = _backend.choose_backend("kepler_kl", backend, x.device, x.dtype)

    if chosen == "reference":
        if prior is not None:
            return kepler_kl_ref(x, prior.detach(), mode, float(eps))
        return kepler_kl_rows_ref(x, prior_logq.detach(), mode, float(eps)).mean()
    if prior_logq is None:
        prior_logq = kepler_kl_prior_logq(prior, mode)
    prior_logq = prior_logq.detach().reshape(-1, x.shape[1])
    return KeplerKLFunction.apply(x, prior_logq, mode == "std", float(eps), chosen).mean()


def kepler_kl_prior_logq(prior: torch.Tensor, mode: str = "official") -> torch.Tensor:
    """``log q`` for the kernels: log-softmax of the standardized prior, float32, no grad.

    ``prior: (M,)`` gives ``(1, M)``; ``prior: (B, M)`` gives ``(B, M)``. Computed in float64
    (then rounded once) with the same standardization and degenerate-row rule as the loss.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_input("prior", prior)
    if prior.ndim not in (1, 2) or prior.shape[-1] == 0:
        raise ValueError(f"prior must be (M,) or (B, M) with M >= 1, got shape {tuple(prior.shape)}")
    rows = prior.detach().reshape(-1, prior.shape[-1]).to(torch.float64)
    return kepler_kl_prior_logq_ref(rows, mode).to(torch.float32)
