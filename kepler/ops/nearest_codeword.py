"""Fused nearest-codeword search: op registration, ``NearestCodewordFunction`` and the functional.

Math (the spec is :mod:`kepler.reference.nearest_codeword`): for each row ``z_n: (D,)`` the index
``argmin_k ||z_n - e_k||^2`` over the codebook ``e: (K, D)`` (per group with ``(G, K, D)``),
searched by the score ``||e_k||^2 - 2 z_n . e_k``, and the winner's distance recomputed exactly.
Gradients flow through that distance only: ``grad_z = 2 g (z - e_idx)``, ``grad_e[k] = -sum`` of
the same over the rows assigned to ``k``; indices are not differentiable.

Backends (see ``kepler._backend``):

* ``reference``: ``nearest_codeword_ref`` with plain autograd (the only one taking float64).
* ``cpu`` / ``cuda``: ``torch.ops.kepler.nearest_codeword`` from ``kepler._C``.
* ``triton``: ``torch.ops.kepler.nearest_codeword_triton`` (``kepler.kernels.nearest_codeword``).

Numerics: float32 accumulation (the rules are the reference's). Both registered ops have fake
implementations, so ``torch.compile(fullgraph=True)`` traces through them.
"""

from __future__ import annotations

import torch

from kepler import _backend
from kepler._numerics import accumulation_dtype
from kepler.ops._common import check_input, register_op, registered_op
from kepler.reference.nearest_codeword import nearest_codeword_ref, search_scale, winner_rows


def _nearest_codeword_fake(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes and dtypes of the op's outputs: indices (G, N) int64, sq_dist (G, N) float32."""
    groups, rows, _ = z.shape
    return z.new_empty(groups, rows, dtype=torch.int64), z.new_empty(groups, rows, dtype=torch.float32)


register_op(
    "nearest_codeword",
    "(Tensor z, Tensor codebook) -> (Tensor indices, Tensor sq_dist)",
    _nearest_codeword_fake,
)


class NearestCodewordFunction(torch.autograd.Function):
    """Search on a kernel backend; backward of the recomputed distance ``||z - e_idx||^2``.

    ``forward(z (G, N, D), codebook (Gc, K, D), backend) -> (indices (G, N), sq_dist (G, N))``,
    ``backend`` one of ``"cpu"``, ``"cuda"``, ``"triton"``.
    ``grad_z = 2 g (z - e_idx)``; ``grad_codebook[k] = -sum over rows assigned to k of 2 g (z - e_k)``,
    summed over every group when the codebook is shared (Gc == 1).
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, codebook: torch.Tensor, backend: str):
        # Searched at the reference's overflow-safe scale (a power of two, 1 for |values| < 2**32).
        scale = search_scale(z, codebook)
        scale_in_z_dtype = scale.to(z.dtype)
        indices, sq_dist = registered_op("nearest_codeword", backend)(z * scale_in_z_dtype, codebook * scale_in_z_dtype)
        # Back to z's scale by two factors: 1 / scale**2 overflows float32 where sq_dist may not.
        unscale = scale.reciprocal().to(sq_dist.dtype)
        sq_dist = sq_dist * unscale * unscale
        ctx.save_for_backward(z, codebook, indices)
        ctx.mark_non_differentiable(indices)
        return indices, sq_dist

    @staticmethod
    def backward(ctx, grad_indices: torch.Tensor | None, grad_sq_dist: torch.Tensor):
        z, codebook, indices = ctx.saved_tensors
        acc_dtype = accumulation_dtype(z.dtype)
        flat_index, winners = winner_rows(codebook, indices)
        grad_residual = 2.0 * grad_sq_dist.to(acc_dtype).unsqueeze(-1) * (z.to(acc_dtype) - winners.to(acc_dtype))

        grad_z = grad_residual.to(z.dtype) if ctx.needs_input_grad[0] else None
        grad_codebook = None
        if ctx.needs_input_grad[1]:
            dim = z.shape[-1]
            grad_sum = torch.zeros(codebook.shape, dtype=acc_dtype, device=z.device)
            # index_add_ is deterministic on the CPU, and on CUDA switches to a deterministic
            # (sorted) accumulation under torch.use_deterministic_algorithms(True).
            grad_sum.view(-1, dim).index_add_(0, flat_index, grad_residual.reshape(-1, dim), alpha=-1)
            grad_codebook = grad_sum.to(codebook.dtype)
        return grad_z, grad_codebook, None


def check_search_inputs(z: torch.Tensor, codebook: torch.Tensor) -> None:
    """The shape, dtype and device checks of rows ``z`` searched against ``codebook``, shared by
    the ops that score every row against every codeword (``nearest_codeword``, ``code_entropy``):
    (N, D) or (G, N, D) rows, a (K, D) or (G, K, D) codebook, K >= 1, D >= 1, one dtype, one device."""
    if z.dim() not in (2, 3):
        raise ValueError(f"z must be (N, D) or (G, N, D), got shape {tuple(z.shape)}")
    if codebook.dim() not in (2, 3):
        raise ValueError(f"codebook must be (K, D) or (G, K, D), got shape {tuple(codebook.shape)}")
    if codebook.dtype != z.dtype:
        raise TypeError(f"z and codebook must have the same dtype, got {z.dtype} and {codebook.dtype}")
    if codebook.device != z.device:
        raise ValueError(f"z and codebook must be on the same device, got {z.device} and {codebook.device}")
    if z.shape[-1] == 0:
        raise ValueError("z must have D >= 1 features, got D=0")
    if codebook.shape[-1] != z.shape[-1]:
        raise ValueError(f"codebook has D={codebook.shape[-1]} features but z has D={z.shape[-1]}")
    if codebook.shape[-2] == 0:
        raise ValueError("codebook must hold at least one codeword, got K=0")
    if codebook.dim() == 3:
        if z.dim() != 3:
            raise ValueError(
                f"a per-group codebook {tuple(codebook.shape)} needs grouped z (G, N, D), got shape {tuple(z.shape)}"
            )
        if codebook.shape[0] != z.shape[0]:
            raise ValueError(f"codebook has G={codebook.shape[0]} groups but z has G={z.shape[0]}")


def _check_inputs(z: torch.Tensor, codebook: torch.Tensor) -> None:
    check_input("z", z)
    check_input("codebook", codebook)
    check_search_inputs(z, codebook)


def nearest_codeword(
    z: torch.Tensor, codebook: torch.Tensor, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codeword of every row of ``z``, and its exact squared distance.

    Args:
        z: (N, D) or (G, N, D), float32, bfloat16 or float16 (float64 runs on the reference
            backend only). Any strides.
        codebook: (K, D), shared by all groups, or (G, K, D), one codebook per group; same dtype
            and device as ``z`` (no promotion); K >= 1.
        backend: ``'reference'``, ``'cpu'``, ``'cuda'``, ``'triton'`` or ``'auto'``; default
            ``KEPLER_BACKEND`` or ``'auto'`` (see ``kepler.available_backends``). ``'auto'`` runs
            float64 inputs on the reference backend.

    Returns:
        indices: (N,) or (G, N) int64 in ``[0, K)``; not differentiable.
        sq_dist: same shape, float32 (float64 for float64 inputs): ``||z - codebook[indices]||^2``
            recomputed exactly (a sum of squared differences, accumulated in float32). It is
            differentiable with respect to ``z`` and ``codebook``.

    The search minimizes ``||e||^2 - 2 z . e`` with float32 accumulation (the Triton kernel takes
    TF32 dot products for float32 inputs only on a GPU where ``torch.get_float32_matmul_precision()``
    is not ``"highest"``, the rule ``torch.matmul`` follows), with ``z`` and ``codebook`` first
    scaled by an exact power of two when a ``|value|`` reaches ``2**32``, so that the score cannot
    overflow (``sq_dist`` is reported at the inputs' scale: inf only where it does not fit
    float32). Ties go to the lowest index. Non-finite scores never
    win; a row with no finite score (e.g. holding NaN) gets index 0 and a NaN/inf ``sq_dist``.
    ``N == 0`` gives empty results.
    """
    _check_inputs(z, codebook)
    chosen = _backend.choose_backend("nearest_codeword", backend, z.device, z.dtype)
    if chosen == "reference":
        return nearest_codeword_ref(z, codebook)
    grouped = z.dim() == 3
    z3 = z if grouped else z.unsqueeze(0)
    codebook3 = codebook if codebook.dim() == 3 else codebook.unsqueeze(0)
    indices, sq_dist = NearestCodewordFunction.apply(z3, codebook3, chosen)
    if grouped:
        return indices, sq_dist
    return indices.squeeze(0), sq_dist.squeeze(0)
