"""Fused code entropy: op registration, ``CodeEntropyFunction`` and the functional.

Math (the spec is :mod:`kepler.reference.code_entropy`): the soft assignment of each row ``z_n`` to
the codewords, ``p[n] = softmax_k(-||z_n - e_k||^2 / T)``, and two entropies of it: the mean
per-row entropy ``per_sample`` and the entropy of the mean assignment ``batch``. The entropy loss
of LFQ / MAGVIT-v2 / IBQ minimizes ``per_sample - gamma * batch``.

Backends (see ``kepler._backend``):

* ``reference``: ``code_entropy_ref`` with plain autograd (the whole N x K matrix; small sizes, and
  the only one taking float64).
* ``cpu`` / ``cuda``: ``torch.ops.kepler.code_entropy`` (+ ``_backward``) from ``kepler._C``.
* ``triton``: ``torch.ops.kepler.code_entropy_triton`` (+ ``_backward_triton``) from
  ``kepler.kernels.code_entropy``.

The kernel op returns what the backward needs, per row (``c_min``, ``log l``, ``H``) and per code
(``code_mass = sum_n p[n, k]``), computed in two tiled passes over the scores (an online
log-sum-exp over the codes per row, then the column sums of ``p``); the two entropies are O(N + K)
PyTorch on those (``kepler.reference.code_entropy.entropies``). The backward op recomputes the
scores tile by tile. No backend but the reference holds an N x K tensor, forward or backward.
"""

from __future__ import annotations

import math
import numbers

import torch

from kepler import _backend
from kepler.ops._common import check_input, register_op, registered_op
from kepler.ops.nearest_codeword import check_search_inputs
from kepler.reference.code_entropy import code_entropy_ref, entropies
from kepler.reference.nearest_codeword import search_scale


def _code_entropy_fake(
    z: torch.Tensor, codebook: torch.Tensor, scale: torch.Tensor, inv_temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """row_stats (G, N, 3) and code_mass (G, K), float32."""
    groups, rows, _ = z.shape
    return z.new_empty(groups, rows, 3, dtype=torch.float32), z.new_empty(groups, codebook.shape[1], dtype=torch.float32)


def _code_entropy_backward_fake(
    grad_per_sample: torch.Tensor,
    grad_batch: torch.Tensor,
    z: torch.Tensor,
    codebook: torch.Tensor,
    scale: torch.Tensor,
    inv_temperature: float,
    row_stats: torch.Tensor,
    code_mass: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_z (G, N, D) in z's dtype and grad_codebook (Gc, K, D) in the codebook's, contiguous."""
    return z.new_empty(z.shape), codebook.new_empty(codebook.shape)


register_op(
    "code_entropy",
    "(Tensor z, Tensor codebook, Tensor scale, float inv_temperature) -> (Tensor row_stats, Tensor code_mass)",
    _code_entropy_fake,
)
register_op(
    "code_entropy_backward",
    "(Tensor grad_per_sample, Tensor grad_batch, Tensor z, Tensor codebook, Tensor scale, float inv_temperature, "
    "Tensor row_stats, Tensor code_mass) -> (Tensor grad_z, Tensor grad_codebook)",
    _code_entropy_backward_fake,
)


class CodeEntropyFunction(torch.autograd.Function):
    """Code entropy on a kernel backend, with the fused backward.

    ``forward(z (G, N, D), codebook (Gc, K, D), inv_temperature, backend) -> (per_sample (G,),
    batch (G,))``, float32; ``backend`` one of ``"cpu"``, ``"cuda"``, ``"triton"``. The scores are
    taken at the overflow-safe ``search_scale`` of ``nearest_codeword`` (a power of two, 1 for
    ``|values| < 2**32``), which the kernels apply as they load the inputs (no scaled copy). Saves
    the inputs, the scale and the op's O(N + K) statistics; the backward recomputes the scores.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, codebook: torch.Tensor, inv_temperature: float, backend: str):
        scale = search_scale(z, codebook)
        row_stats, code_mass = registered_op("code_entropy", backend)(z, codebook, scale, inv_temperature)
        ctx.save_for_backward(z, codebook, scale, row_stats, code_mass)
        ctx.inv_temperature, ctx.backend = inv_temperature, backend
        return entropies(row_stats, code_mass)

    @staticmethod
    def backward(ctx, grad_per_sample: torch.Tensor, grad_batch: torch.Tensor):
        z, codebook, scale, row_stats, code_mass = ctx.saved_tensors
        backward_op = registered_op("code_entropy_backward", ctx.backend)
        grad_z, grad_codebook = backward_op(
            grad_per_sample.to(torch.float32).contiguous(),
            grad_batch.to(torch.float32).contiguous(),
            z,
            codebook,
            scale,
            ctx.inv_temperature,
            row_stats,
            code_mass,
        )
        return grad_z, grad_codebook, None, None


def _check_inputs(z: torch.Tensor, codebook: torch.Tensor, temperature: float) -> None:
    check_input("z", z)
    check_input("codebook", codebook)
    check_search_inputs(z, codebook)
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0 and math.isfinite(1.0 / temperature)):
        raise ValueError(f"temperature must be finite and > 0 with 1 / temperature finite, got {temperature}")


def code_entropy(
    z: torch.Tensor, codebook: torch.Tensor, temperature: float = 1.0, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropies of the soft assignment of rows to codewords, without an N x K matrix.

    With scores ``s[n, k] = -||z[n] - codebook[k]||^2 / temperature`` and ``p[n] = softmax(s[n])``:
    ``per_sample = mean_n H(p[n])`` (low: each row confidently assigned) and
    ``batch = H(mean_n p[n])`` (high: codes used uniformly), natural log. The entropy loss of
    LFQ / MAGVIT-v2 minimizes ``per_sample - gamma * batch``.

    Args:
        z: (N, D) or (G, N, D); float32, bfloat16, float16 or float64 (float64 runs on the
            reference backend only); any strides.
        codebook: (K, D), shared by every group, or (G, K, D), one per group; z's dtype and device.
            K >= 1.
        temperature: T, finite and > 0 with 1 / T finite.
        backend: ``'reference'``, ``'cpu'``, ``'cuda'``, ``'triton'`` or ``'auto'``; default
            ``KEPLER_BACKEND`` or ``'auto'``.

    Returns:
        per_sample, batch: 0-d for (N, D) ``z``, (G,) (one pair per group) for grouped ``z``;
        float32 (float64 for float64 inputs); differentiable with respect to ``z`` and
        ``codebook``.

    Numerics (the reference's, on every backend): float32 accumulation; the scores of
    ``nearest_codeword`` at its overflow-safe scale, so inputs of any magnitude work; a saturated
    row (one code far ahead) has entropy exactly 0 and a zero gradient, never NaN; NaN or inf in a
    row of ``z`` or in the codebook gives NaN results; ``N == 0`` gives 0 and 0. The kernel
    backends never hold an N x K tensor: memory beyond the inputs and gradients is O(N + K).
    """
    _check_inputs(z, codebook, temperature)
    chosen = _backend.choose_backend("code_entropy", backend, z.device, z.dtype)
    if chosen == "reference":
        return code_entropy_ref(z, codebook, float(temperature))
    grouped = z.dim() == 3
    z3 = z if grouped else z.unsqueeze(0)
    codebook3 = codebook if codebook.dim() == 3 else codebook.unsqueeze(0)
    per_sample, batch = CodeEntropyFunction.apply(z3, codebook3, 1.0 / float(temperature), chosen)
    if grouped:
        return per_sample, batch
    return per_sample.squeeze(0), batch.squeeze(0)
