"""Forward + backward of the code entropy: kepler's fused backends vs the plain PyTorch way, and
LFQ's entropy loss from vector-quantize-pytorch vs the same loss from kepler's op.

    .venv/bin/pytest benchmarks/test_bench_code_entropy.py --benchmark-json=code_entropy.json

* ``plain``: ``torch.cdist(z, codebook)**2 / T``, ``softmax``, both entropies, autograd backward.
  It holds several N x K float32 matrices (scores, probabilities, their logs and gradients); where
  that would not fit in ``PLAIN_MEMORY_BUDGET_GIB`` it is skipped with the size it would need.
* ``cpu`` / ``cuda`` / ``triton``: ``kepler.losses.code_entropy(..., backend=...)``: scores tile by
  tile, never N x K; memory beyond the inputs and gradients is O(N + K).
* ``two_gemms`` (GPU only): two ``z @ codebook.T`` products of the same size, the yardstick of the
  GPU target (forward + backward within 2x of it).
* ``lfq_library`` / ``lfq_kepler``: ``LFQQuantizer`` (vector-quantize-pytorch's LFQ) at 65536 codes
  in training mode, forward + backward, with the library's exact entropy loss (``entropy:
  library``, every position) or the same loss from the op (``entropy: kepler``).

Each round is one forward and one backward of ``per_sample - batch`` at T = 0.1. ``extra_info``
holds ``gscore_per_s`` (10^9 scores N K per second, forward + backward together) and
``peak_memory_mb`` (benchmarks/memory.py: the peak above what was held before the step).
"""

from __future__ import annotations

import os

import pytest
import torch
from devices import DEVICES, device_marks
from memory import peak_step_memory_mb
from timing import record_rate

from kepler.losses import code_entropy
from kepler.nn.adapters import LFQQuantizer

ROWS = 16384
SHAPES = [(4096, 8), (4096, 16), (4096, 64), (65536, 8), (65536, 16)]  # (K, D)
TEMPERATURE = 0.1
# N x K float32 matrices alive at the peak of the plain forward + backward.
PLAIN_MATRICES_AT_PEAK = 6
PLAIN_MEMORY_BUDGET_GIB = float(os.environ.get("KEPLER_BENCH_PLAIN_BUDGET_GIB", "12"))
LFQ_CODES, LFQ_BATCH, LFQ_SIDE = 65536, 8, 16  # 2048 positions of 16 sign bits


def plain_code_entropy(z: torch.Tensor, codebook: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain way: the whole N x K softmax."""
    log_p = torch.log_softmax(-torch.cdist(z, codebook).square() / temperature, dim=-1)
    p = log_p.exp()
    per_sample = -(p * log_p).sum(-1).mean()
    q = p.mean(0)
    batch = -(q * q.clamp_min(1e-30).log()).sum()
    return per_sample, batch


def plain_memory_gib(codes: int) -> float:
    return PLAIN_MATRICES_AT_PEAK * ROWS * codes * 4 / 2**30


def _params():
    params = []
    for device in DEVICES:
        implementations = ("plain", "cpu") if device == "cpu" else ("plain", "cuda", "triton", "two_gemms")
        for codes, dim in SHAPES:
            for implementation in implementations:
                marks = device_marks(device)
                if implementation == "plain" and plain_memory_gib(codes) > PLAIN_MEMORY_BUDGET_GIB:
                    reason = (f"plain would need {plain_memory_gib(codes):.0f} GiB ({PLAIN_MATRICES_AT_PEAK} N x K "
                              f"float32 matrices) > {PLAIN_MEMORY_BUDGET_GIB:g} GiB budget")
                    marks.append(pytest.mark.skip(reason=reason))
                params.append(pytest.param(device, codes, dim, implementation, marks=marks,
                                           id=f"{device}-N{ROWS}-K{codes}-D{dim}-{implementation}"))
    return params


@pytest.mark.parametrize("device, codes, dim, implementation", _params())
def test_code_entropy_forward_backward(benchmark, device, codes, dim, implementation):
    benchmark.group = f"code entropy fwd+bwd N={ROWS} K={codes} D={dim} {device}"
    torch.manual_seed(0)
    codebook = (torch.randn(codes, dim, device=device) / dim**0.5).requires_grad_(True)
    z = (torch.randn(ROWS, dim, device=device) / dim**0.5).requires_grad_(True)

    def step():
        z.grad = codebook.grad = None
        if implementation == "two_gemms":
            with torch.no_grad():
                torch.mm(z, codebook.T)
                torch.mm(z, codebook.T)
            torch.cuda.synchronize()
            return
        if implementation == "plain":
            per_sample, batch = plain_code_entropy(z, codebook, TEMPERATURE)
        else:
            per_sample, batch = code_entropy(z, codebook, TEMPERATURE, backend=implementation)
        (per_sample - batch).backward()
        if device == "cuda":
            torch.cuda.synchronize()

    rounds = 1 if device == "cpu" and codes >= 65536 else 3
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=0 if rounds == 1 else 1)
    record_rate(benchmark, "gscore_per_s", ROWS * codes / 1e9)
    benchmark.extra_info["peak_memory_mb"] = peak_step_memory_mb(step, device)


@pytest.mark.parametrize("entropy", ["library", "kepler"])
def test_lfq_entropy_loss_at_65536_codes(benchmark, entropy):
    """LFQ at 65536 codes, training forward + backward with the exact entropy loss over every position."""
    benchmark.group = f"LFQ entropy loss K={LFQ_CODES} N={LFQ_BATCH * LFQ_SIDE**2} cpu"
    torch.manual_seed(0)
    quantizer = LFQQuantizer(dim=16, codebook_size=LFQ_CODES, entropy=entropy).train()
    z = torch.randn(LFQ_BATCH, 16, LFQ_SIDE, LFQ_SIDE, requires_grad=True)

    def step():
        z.grad = None
        out = quantizer(z)
        (out.loss + out.z_q.mean()).backward()

    benchmark.pedantic(step, rounds=1, warmup_rounds=0)
    record_rate(benchmark, "gscore_per_s", LFQ_BATCH * LFQ_SIDE**2 * LFQ_CODES / 1e9)
    benchmark.extra_info["peak_memory_mb"] = peak_step_memory_mb(step, "cpu")
