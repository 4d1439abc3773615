"""The released Kepler KL regularizer as a fused op: registration, autograd and the functional.

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
forward passes (1) mean/variance/max, (2) logsumexp of ``s``, (3) the loss; backward passes
(1) ``sum p``, ``sum p g``, ``sum p s``, ``sum p s g`` with ``g_i = dL/dp_i = log(r_i + eps) +
r_i / (r_i + eps)``, ``r_i = p_i / q_i``, then (2) the gradient through the softmax
(``dL/ds_i = p_i (g_i - sum_j p_j g_j)``) and the standardization:

* official: ``dx_k = d_k / var - 2 S s_k / (M - 1)``
* std:      ``dx_k = (d_k - S s_k / (M - 1)) / std``

with ``d = dL/ds`` and ``S = sum_i d_i s_i``. All math is fp32 (fp64 across blocks of a row).
The prior enters as ``prior_logq = log q`` in float32, computed once in float64 by
:func:`kepler_kl_prior_logq` (a module can cache it in a buffer); no gradient flows to the prior.
"""

from __future__ import annotations

import math

import torch

from kepler import _backend, _ext
from kepler.reference.kepler_kl import MODES, kepler_kl_prior_logq_ref, kepler_kl_rows_ref


def kepler_kl_prior_logq(prior: torch.Tensor, mode: str = "official") -> torch.Tensor:
    """``log q`` for the kernels: log-softmax of the standardized prior, float32, no grad.

    ``prior: (M,)`` gives ``(1, M)``; ``prior: (B, M)`` gives ``(B, M)``. Computed in float64
    (then rounded once) with the same standardization and degenerate-row rule as the loss.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(prior, torch.Tensor) or prior.dtype not in _backend.INPUT_DTYPES:
        raise TypeError(f"prior must be a floating-point tensor, got {_describe(prior)}")
    if prior.ndim not in (1, 2) or prior.shape[-1] == 0:
        raise ValueError(f"prior must be (M,) or (B, M) with M >= 1, got shape {tuple(prior.shape)}")
    rows = prior.detach().reshape(-1, prior.shape[-1]).to(torch.float64)
    return kepler_kl_prior_logq_ref(rows, mode).to(torch.float32)


# ---- registration -------------------------------------------------------------------------------

if _ext.HAS_CPU_EXT:

    @torch.library.register_fake("kepler::kepler_kl")
    def _kepler_kl_fake(x, prior_logq, use_std, eps):
        num_rows = x.shape[0]
        return x.new_empty((num_rows,), dtype=torch.float32), x.new_empty((num_rows, 3), dtype=torch.float32)

    @torch.library.register_fake("kepler::kepler_kl_backward")
    def _kepler_kl_backward_fake(grad_loss, x, prior_logq, stats, use_std, eps):
        return x.new_empty(x.shape)


@torch.library.custom_op("kepler::kepler_kl_triton", mutates_args=())
def _kepler_kl_triton_op(
    x: torch.Tensor, prior_logq: torch.Tensor, use_std: bool, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    # custom_op rather than triton_op: wrap_triton cannot trace interpreter-mode kernels
    # (TRITON_INTERPRET=1), which is how CPU-only machines run this backend.
    from kepler.kernels.kepler_kl import kepler_kl_triton

    return kepler_kl_triton(x, prior_logq, use_std, eps)


@_kepler_kl_triton_op.register_fake
def _(x, prior_logq, use_std, eps):
    num_rows = x.shape[0]
    return x.new_empty((num_rows,), dtype=torch.float32), x.new_empty((num_rows, 3), dtype=torch.float32)


@torch.library.custom_op("kepler::kepler_kl_backward_triton", mutates_args=())
def _kepler_kl_backward_triton_op(
    grad_loss: torch.Tensor,
    x: torch.Tensor,
    prior_logq: torch.Tensor,
    stats: torch.Tensor,
    use_std: bool,
    eps: float,
) -> torch.Tensor:
    from kepler.kernels.kepler_kl import kepler_kl_backward_triton

    return kepler_kl_backward_triton(grad_loss, x, prior_logq, stats, use_std, eps)


@_kepler_kl_backward_triton_op.register_fake
def _(grad_loss, x, prior_logq, stats, use_std, eps):
    return x.new_empty(x.shape)


def _ops_for(backend: str):
    """(forward op, backward op) of a kernel backend; the dispatcher routes cpu/cuda by device."""
    if backend == "triton":
        return torch.ops.kepler.kepler_kl_triton, torch.ops.kepler.kepler_kl_backward_triton
    return torch.ops.kepler.kepler_kl, torch.ops.kepler.kepler_kl_backward


class KeplerKLFunction(torch.autograd.Function):
    """Per-row Kepler KL ``(B,)`` float32 of ``x: (B, M)`` given ``prior_logq: (1 | B, M)`` float32.

    Differentiable in ``x`` only; ``backend`` is ``"cpu"``, ``"cuda"`` or ``"triton"``.
    """

    @staticmethod
    def forward(ctx, x, prior_logq, use_std: bool, eps: float, backend: str):
        forward_op, _ = _ops_for(backend)
        loss, stats = forward_op(x, prior_logq, use_std, eps)
        ctx.save_for_backward(x, prior_logq, stats)
        ctx.use_std, ctx.eps, ctx.backend = use_std, eps, backend
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        x, prior_logq, stats = ctx.saved_tensors
        _, backward_op = _ops_for(ctx.backend)
        grad_x = backward_op(grad_loss.contiguous(), x, prior_logq, stats, ctx.use_std, ctx.eps)
        return grad_x, None, None, None, None


# ---- functional ---------------------------------------------------------------------------------


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


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
    if not isinstance(x, torch.Tensor) or x.dtype not in _backend.INPUT_DTYPES:
        raise TypeError(f"x must be a float32, bfloat16, float16 or float64 tensor, got {_describe(x)}")
    if x.ndim != 2:
        raise ValueError(f"x must be a 2-D tensor (B, M), one flattened latent per row, got shape {tuple(x.shape)}")
    num_rows, num_cols = x.shape
    if num_rows == 0:
        raise ValueError("x has no rows (B == 0): the batch mean of the Kepler KL is undefined")
    if num_cols == 0:
        raise ValueError("x has no columns (M == 0): each row needs at least one element")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if (prior is None) == (prior_logq is None):
        raise ValueError("pass exactly one of prior and prior_logq")
    given = prior if prior is not None else prior_logq
    name = "prior" if prior is not None else "prior_logq"
    if not isinstance(given, torch.Tensor) or given.dtype not in _backend.INPUT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got {_describe(given)}")
    if given.device != x.device:
        raise ValueError(f"{name} is on {given.device} but x is on {x.device}; put them on the same device")
    if given.shape not in ((num_cols,), (1, num_cols), (num_rows, num_cols)):
        raise ValueError(
            f"{name} must have shape ({num_cols},), (1, {num_cols}) or ({num_rows}, {num_cols}) "
            f"for x of shape {tuple(x.shape)}, got {tuple(given.shape)}"
        )
    if prior_logq is not None and prior_logq.dtype != torch.float32:
        raise TypeError(f"prior_logq must be float32 (from kepler_kl_prior_logq), got {prior_logq.dtype}")

    chosen = _backend.choose_backend("kepler_kl", backend, x.device, x.dtype)

    if chosen == "reference":
        compute_dtype = torch.promote_types(x.dtype, torch.float32)
        if prior_logq is None:
            prior_logq = kepler_kl_prior_logq_ref(prior.detach().to(compute_dtype), mode)
        return kepler_kl_rows_ref(x, prior_logq.detach(), mode, float(eps)).mean()

    if prior_logq is None:
        prior_logq = kepler_kl_prior_logq(prior, mode)
    prior_logq = prior_logq.detach().reshape(-1, num_cols)
    return KeplerKLFunction.apply(x, prior_logq, mode == "std", float(eps), chosen).mean()
