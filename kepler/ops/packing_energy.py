"""Fused Gaussian-potential packing energy: op registration, ``PackingEnergyFunction``, the functional.

Math (the spec is :mod:`kepler.reference.packing_energy`): for a codebook of K codewords c_i,
``E = log(1/(K(K-1)) sum_{i != j} exp(-t ||c_i - c_j||^2 / s^2))``, with the codebook centred and
``s^2`` its mean squared norm when normalized. The functional centres and scales the codebook in
PyTorch (O(K d), differentiated by autograd) and hands the normalized points y to the fused op,
which computes the raw energy of y; ``PackingEnergyFunction`` supplies the fused backward.

Backends (see ``kepler._backend``):

* ``reference``: ``packing_energy_ref`` with plain autograd (the full K x K matrix; small K only).
* ``cpu`` / ``cuda``: ``torch.ops.kepler.packing_energy`` (+ ``_backward``) from ``kepler._C``;
  they also take float64 (accumulating in float64), which is what gradcheck runs on.
* ``triton``: ``torch.ops.kepler.packing_energy_triton`` (+ ``_backward_triton``) from
  ``kepler.kernels.packing_energy``; float32/bfloat16/float16.

Numerics: the fused ops stream codeword pairs in tiles with an online log-sum-exp (memory: the
codebook plus O(K)), accumulating in float32. Every registered op has a fake implementation, so
``torch.compile(fullgraph=True)`` traces through them.
"""

from __future__ import annotations

import math
import numbers

import torch

from kepler import _backend
from kepler._numerics import accumulation_dtype
from kepler.ops._common import check_input, register_op, registered_op
from kepler.reference.packing_energy import normalize_codebook, packing_energy_ref


def _packing_energy_fake(y: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """energy (G,) and row_lse (G, K), float32 (float64 for float64 y)."""
    groups, num_codewords, _ = y.shape
    dtype = accumulation_dtype(y.dtype)
    return y.new_empty(groups, dtype=dtype), y.new_empty(groups, num_codewords, dtype=dtype)


def _packing_energy_backward_fake(
    grad_energy: torch.Tensor, y: torch.Tensor, t: float, energy: torch.Tensor, row_lse: torch.Tensor
) -> torch.Tensor:
    """grad_y: (G, K, d) contiguous, y's dtype."""
    return y.new_empty(y.shape)


register_op(
    "packing_energy",
    "(Tensor y, float t) -> (Tensor energy, Tensor row_lse)",
    _packing_energy_fake,
)
register_op(
    "packing_energy_backward",
    "(Tensor grad_energy, Tensor y, float t, Tensor energy, Tensor row_lse) -> Tensor",
    _packing_energy_backward_fake,
)


class PackingEnergyFunction(torch.autograd.Function):
    """Raw packing energy of points on a kernel backend, with the fused backward.

    ``forward(y (G, K, d), t, backend) -> energy (G,)`` (float32; float64 for float64 y), where
    ``energy[g] = log(1/(K(K-1)) sum_{i != j} exp(-t ||y_i - y_j||^2))``; ``backend`` is
    ``"cpu"``, ``"cuda"`` or ``"triton"``. Saves y, energy and the per-row log-sum-exps; backward
    is a second tiled pass giving ``dE/dy_i = -4t sum_{j != i} softmax-weight_ij (y_i - y_j)``.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, t: float, backend: str) -> torch.Tensor:
        energy, row_lse = registered_op("packing_energy", backend)(y, t)
        ctx.save_for_backward(y, energy, row_lse)
        ctx.t, ctx.backend = t, backend
        return energy

    @staticmethod
    def backward(ctx, grad_energy: torch.Tensor):
        y, energy, row_lse = ctx.saved_tensors
        backward_op = registered_op("packing_energy_backward", ctx.backend)
        grad_y = backward_op(grad_energy.contiguous(), y, ctx.t, energy, row_lse)
        return grad_y, None, None


def _check_inputs(codebook: torch.Tensor, t: float, normalize: bool) -> None:
    check_input("codebook", codebook)
    if codebook.dim() not in (2, 3):
        raise ValueError(f"codebook must be (K, d) or (G, K, d), got shape {tuple(codebook.shape)}")
    if codebook.shape[-2] < 2:
        raise ValueError(f"codebook needs at least 2 codewords (K >= 2) for pairwise energies, got K={codebook.shape[-2]}")
    if codebook.shape[-1] == 0:
        raise ValueError("codebook must have d >= 1 dimensions, got d=0")
    if isinstance(t, bool) or not isinstance(t, numbers.Real):
        raise TypeError(f"t must be a real number, got {type(t).__name__}")
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"t must be finite and > 0, got {t}")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")


def packing_energy(
    codebook: torch.Tensor, *, t: float = 1.0, normalize: bool = True, backend: str | None = None
) -> torch.Tensor:
    """Gaussian-potential packing energy of a codebook (lower = codewords spread more evenly).

    ``E = log( 1/(K(K-1)) * sum_{i != j} exp(-t ||c_i - c_j||^2 / s^2) )``

    Args:
        codebook: (K, d) or (G, K, d) (G sub-codebooks, one energy each); float32, bfloat16,
            float16 or float64, any strides. K >= 2, d >= 1.
        t: temperature of the Gaussian potential, finite and > 0.
        normalize: centre the codebook (subtract its mean over K) and divide distances by
            s^2 = mean over K of the centred squared norms, so E is invariant to translating and
            scaling the codebook and cannot be lowered by inflating it. s^2 is floored at
            ``kepler.reference.packing_energy.MIN_SPREAD_SQ`` (1e-20): a codebook whose codewords
            all coincide gives E = 0 (every pair at distance 0) with a finite gradient instead of
            0/0. With ``normalize=False`` s^2 = 1 and nothing is centred.
        backend: ``'reference'``, ``'cpu'``, ``'cuda'``, ``'triton'`` or ``'auto'``; default
            ``KEPLER_BACKEND`` or ``'auto'``. ``'auto'`` runs float64 on the compiled kernels when
            built, else on the reference.

    Returns:
        A scalar for (K, d), (G,) for (G, K, d); float32 whatever the input precision (float64
        for float64 input). Differentiable with respect to ``codebook``.

    The fused backends stream codeword pairs in tiles with an online log-sum-exp (never a K x K
    matrix: memory is the codebook plus O(K)), accumulating in float32; the reference builds the
    whole (G, K, K, d) difference tensor and is meant for small K.
    """
    _check_inputs(codebook, t, normalize)
    t = float(t)
    points_dtype = accumulation_dtype(codebook.dtype) if normalize else codebook.dtype
    chosen = _backend.choose_backend(
        "packing_energy", backend, codebook.device, points_dtype, float64_backends=("reference", "cpu", "cuda")
    )
    if chosen == "reference":
        return packing_energy_ref(codebook, t, normalize)
    grouped = codebook.dim() == 3
    points = normalize_codebook(codebook if grouped else codebook.unsqueeze(0), normalize)
    energy = PackingEnergyFunction.apply(points, t, chosen)
    return energy if grouped else energy.squeeze(0)
