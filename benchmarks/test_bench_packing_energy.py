"""Forward + backward of the packing energy: kepler's fused backends vs the plain PyTorch way.

    .venv/bin/pytest benchmarks/test_bench_packing_energy.py --benchmark-json=packing_energy.json
    KEPLER_BENCH_FULL=1 ...   # also the CPU grid points that take minutes on a small machine

* ``plain``: normalize, ``torch.cdist(y, y)**2``, mask the diagonal, ``logsumexp`` over the K x K
  scores, autograd backward. It materializes several K x K float32 matrices (cdist output, its
  square, the scores, the masked copy, and their gradients); where that would not fit in
  ``PLAIN_MEMORY_BUDGET_GIB`` it is skipped with the size it would need, instead of running the
  shared machine out of memory.
* ``cpu`` / ``cuda`` / ``triton``: ``kepler.losses.packing_energy(..., backend=...)``: tiles of
  codeword pairs with an online log-sum-exp; memory is the codebook plus O(K).

Each round is one forward and one backward at t=1 with normalization. ``extra_info`` holds
``gpair_per_s`` (10^9 codeword pairs K^2 per second, forward + backward together) and
``peak_memory_mb``, the peak memory of one step above what was held before it (CUDA: the caching
allocator's peak; CPU, Linux: the resident-set high-water mark, reset by writing 5 to
``/proc/self/clear_refs``, after handing freed heap pages back with ``malloc_trim``).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from devices import DEVICES, device_marks
from memory import peak_step_memory_mb
from timing import record_rate

from kepler.losses import packing_energy
from kepler.reference.packing_energy import normalize_codebook

CODEWORDS = (1024, 8192, 65536)
DIMS = (3, 8, 24, 64)
# K x K float32 matrices alive at the peak of the plain forward + backward (see the docstring).
PLAIN_MATRICES_AT_PEAK = 5
PLAIN_MEMORY_BUDGET_GIB = float(os.environ.get("KEPLER_BENCH_PLAIN_BUDGET_GIB", "4"))
FULL = os.environ.get("KEPLER_BENCH_FULL", "0") == "1"
# One fused forward + backward at K=65536 (4.3e9 pairs) costs ~9 CPU-seconds for d=3 and ~100 for
# d=64 (measured once on 2 shared AMD EPYC cores, AVX2): only d=3 is in the default CPU suite.
CPU_QUICK_LARGE_DIMS = (3,)


def plain_packing_energy(codebook: torch.Tensor, t: float = 1.0) -> torch.Tensor:
    """The plain way: full K x K squared distances via cdist, masked logsumexp."""
    points = normalize_codebook(codebook.unsqueeze(0), True)[0]
    num_codewords = points.shape[0]
    scores = -t * torch.cdist(points, points).square()
    scores = scores.masked_fill(torch.eye(num_codewords, dtype=torch.bool, device=points.device), float("-inf"))
    return torch.logsumexp(scores.flatten(), dim=0) - math.log(num_codewords * (num_codewords - 1))


def plain_memory_gib(num_codewords: int) -> float:
    return PLAIN_MATRICES_AT_PEAK * num_codewords**2 * 4 / 2**30


def _params():
    params = []
    for device in DEVICES:
        implementations = ("plain", "cpu") if device == "cpu" else ("plain", "cuda", "triton")
        for num_codewords in CODEWORDS:
            for dim in DIMS:
                for implementation in implementations:
                    marks = device_marks(device)
                    if implementation == "plain" and plain_memory_gib(num_codewords) > PLAIN_MEMORY_BUDGET_GIB:
                        reason = (
                            f"plain would need {plain_memory_gib(num_codewords):.0f} GiB "
                            f"({PLAIN_MATRICES_AT_PEAK} K x K float32 matrices) > {PLAIN_MEMORY_BUDGET_GIB:g} GiB budget"
                        )
                        marks.append(pytest.mark.skip(reason=reason))
                    if (
                        device == "cpu" and implementation == "cpu" and num_codewords >= 65536
                        and dim not in CPU_QUICK_LARGE_DIMS and not FULL
                    ):  # fmt: skip
                        marks.append(pytest.mark.skip(reason="takes tens of seconds on 2 cores; KEPLER_BENCH_FULL=1"))
                    params.append(
                        pytest.param(
                            device, num_codewords, dim, implementation, marks=marks,
                            id=f"{device}-K{num_codewords}-d{dim}-{implementation}",
                        )  # fmt: skip
                    )
    return params


@pytest.mark.parametrize("device, num_codewords, dim, implementation", _params())
def test_packing_energy_forward_backward(benchmark, device, num_codewords, dim, implementation):
    benchmark.group = f"packing energy fwd+bwd K={num_codewords} d={dim} {device}"
    torch.manual_seed(0)
    codebook = torch.randn(num_codewords, dim, device=device, requires_grad=True)

    def step():
        codebook.grad = None
        if implementation == "plain":
            energy = plain_packing_energy(codebook)
        else:
            energy = packing_energy(codebook, backend=implementation)
        energy.backward()
        if device == "cuda":
            torch.cuda.synchronize()

    # Large CPU points run once: a round is already many seconds.
    rounds = 1 if device == "cpu" and num_codewords >= 65536 else 3
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=0 if rounds == 1 else 1)
    record_rate(benchmark, "gpair_per_s", num_codewords**2 / 1e9)
    benchmark.extra_info["peak_memory_mb"] = peak_step_memory_mb(step, device)
