"""Fused nearest-codeword search: op registration, ``NearestCodewordFunction`` and the functional.

Backends (see ``kepler._backend``), all following the numerics of
``kepler.reference.nearest_codeword``:

* ``reference``: ``nearest_codeword_ref`` (plain PyTorch; also the only one taking float64).
* ``cpu`` / ``cuda``: ``torch.ops.kepler.nearest_codeword`` from ``kepler._C``.
* ``triton``: ``torch.ops.kepler.nearest_codeword_triton`` (``kepler.kernels.nearest_codeword``).

Both registered ops (custom ops) have fake implementations, so ``torch.compile(fullgraph=True)`` traces through
them. Gradients flow through the recomputed distance only; indices are not differentiable.
"""

from __future__ import annotations

import torch

from kepler import _backend, _ext
from kepler.reference.nearest_codeword import nearest_codeword_ref


def _nearest_codeword_fake(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes and dtypes of both registered ops' outputs: indices (G, N) int64, sq_dist (G, N) float32."""
    groups, rows, _ = z.shape
    return z.new_empty(groups, rows, dtype=torch.int64), z.new_empty(groups, rows, dtype=torch.float32)


if _ext.HAS_CPU_EXT:
    torch.library.register_fake("kepler::nearest_codeword", _nearest_codeword_fake)


if _backend._triton_importable():
    from kepler.kernels.nearest_codeword import nearest_codeword_triton

    # custom_op rather than triton_op: triton_op uses the launcher as its own fake implementation,
    # and under TRITON_INTERPRET=1 (how CPU-only CI runs this kernel) wrap_triton hands back the
    # interpreted kernel, which would then run on fake tensors and fail.
    _nearest_codeword_triton_op = torch.library.custom_op(
        "kepler::nearest_codeword_triton",
        nearest_codeword_triton,
        mutates_args=(),
        schema="(Tensor z, Tensor codebook) -> (Tensor indices, Tensor sq_dist)",
    )
    _nearest_codeword_triton_op.register_fake(_nearest_codeword_fake)


def _run_backend(backend: str, z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, N, D), (Gc, K, D) -> indices (G, N), sq_dist (G, N) on ``backend``."""
    if backend == "reference":
        return nearest_codeword_ref(z, codebook)
    if backend == "triton":
        return torch.ops.kepler.nearest_codeword_triton(z, codebook)
    return torch.ops.kepler.nearest_codeword(z, codebook)


class NearestCodewordFunction(torch.autograd.Function):
    """Search on a chosen backend; backward of the recomputed distance ``||z - e_idx||^2``.

    ``forward(z (G, N, D), codebook (Gc, K, D), backend) -> (indices (G, N), sq_dist (G, N))``.
    ``grad_z = 2 g (z - e_idx)``; ``grad_codebook[k] = -sum over rows assigned to k of 2 g (z - e_k)``,
    summed over every group when the codebook is shared (Gc == 1).
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, codebook: torch.Tensor, backend: str):
        indices, sq_dist = _run_backend(backend, z, codebook)
        ctx.save_for_backward(z, codebook, indices)
        ctx.mark_non_differentiable(indices)
        return indices, sq_dist

    @staticmethod
    def backward(ctx, grad_indices: torch.Tensor | None, grad_sq_dist: torch.Tensor):
        z, codebook, indices = ctx.saved_tensors
        groups, rows, dim = z.shape
        code_groups, num_codes, _ = codebook.shape
        acc_dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
        flat_codes = codebook.reshape(code_groups * num_codes, dim)
        flat_index = indices
        if code_groups > 1:
            flat_index = indices + torch.arange(groups, device=z.device).unsqueeze(1) * num_codes
        flat_index = flat_index.reshape(-1)
        winners = flat_codes[flat_index].view(groups, rows, dim)
        grad_residual = 2.0 * grad_sq_dist.to(acc_dtype).unsqueeze(-1) * (z.to(acc_dtype) - winners.to(acc_dtype))

        grad_z = grad_residual.to(z.dtype) if ctx.needs_input_grad[0] else None
        grad_codebook = None
        if ctx.needs_input_grad[1]:
            grad_flat = torch.zeros(code_groups * num_codes, dim, dtype=acc_dtype, device=z.device)
            # index_add_ is deterministic on the CPU, and on CUDA switches to a deterministic
            # (sorted) accumulation under torch.use_deterministic_algorithms(True).
            grad_flat.index_add_(0, flat_index, grad_residual.reshape(-1, dim), alpha=-1)
            grad_codebook = grad_flat.view(code_groups, num_codes, dim).to(codebook.dtype)
        return grad_z, grad_codebook, None


def _check_inputs(z: torch.Tensor, codebook: torch.Tensor) -> None:
    for name, tensor in (("z", z), ("codebook", codebook)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype not in _backend.INPUT_DTYPES:
            raise TypeError(
                f"{name} must be float32, bfloat16 or float16 (float64 on backend='reference'), got {tensor.dtype}"
            )
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


def nearest_codeword(
    z: torch.Tensor, codebook: torch.Tensor, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codeword of every row of ``z``, and its exact squared distance.

    Args:
        z: (N, D) or (G, N, D), float32, bfloat16 or float16 (float64 on the reference backend).
            Any strides.
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
    is not ``"highest"``, the rule ``torch.matmul`` follows). Ties go to the lowest index. Non-finite scores never
    win; a row with no finite score (e.g. holding NaN) gets index 0 and a NaN/inf ``sq_dist``.
    ``N == 0`` gives empty results.
    """
    _check_inputs(z, codebook)
    chosen = _backend.choose_backend("nearest_codeword", backend, z.device, z.dtype)
    grouped = z.dim() == 3
    z3 = z if grouped else z.unsqueeze(0)
    codebook3 = codebook if codebook.dim() == 3 else codebook.unsqueeze(0)
    indices, sq_dist = NearestCodewordFunction.apply(z3, codebook3, chosen)
    if grouped:
        return indices, sq_dist
    return indices.squeeze(0), sq_dist.squeeze(0)
