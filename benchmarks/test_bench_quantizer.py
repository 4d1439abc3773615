"""Forward + backward of a Kepler quantizer: KeplerQuantizer vs the released plain-PyTorch way vs
vector_quantize_pytorch, at the paper's setting (B=32, 16x16 latents, C=256, P=4 partitions of a
shared codebook) for K=1024 and K=16384.

    .venv/bin/pytest benchmarks/test_bench_quantizer.py --benchmark-json=quantizer.json

* ``kepler``: ``KeplerQuantizer(partition="group", shared_codebook=True, legacy=True)`` on the
  default backend (``cpu`` on CPU tensors, ``cuda`` on GPU tensors).
* ``plain``: the released ``VectorQuantizer_kepler.forward`` transcribed in plain PyTorch (the
  oracle of ``tests/test_quantizer.py``): full ``(rows, K)`` distance matrix, argmin, gather.
* ``vqp``: ``vector_quantize_pytorch.VectorQuantize`` with 4 heads sharing one learnable codebook
  of 64-dimensional codes (no projection, no EMA, no k-means), commitment weight 0.25.

Each round is one forward and one backward of ``loss + mean(z_q)``. ``extra_info`` holds the
peak memory of one step above what the inputs and the module already hold (CUDA: the caching
allocator's peak; CPU: the peak resident set of a fresh process running the step) and the
throughput of the search in GFLOP/s (``2 * rows * K * d`` for the forward's distances).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_quantizer import released_forward  # noqa: E402  (the transcription the tests trust)

from kepler.nn import KeplerQuantizer  # noqa: E402

BATCH, CHANNELS, SIDE, PARTITIONS, BETA = 32, 256, 16, 4, 0.25
SUB_DIM = CHANNELS // PARTITIONS
CODEBOOK_SIZES = (1024, 16384)
IMPLEMENTATIONS = ("kepler", "plain", "vqp")
ROUNDS = 3

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")],
    ),
]


def build_step(implementation: str, num_codes: int, device: str):
    """A closure running one forward + backward, with its inputs and module already built."""
    torch.manual_seed(0)
    z = torch.randn(BATCH, CHANNELS, SIDE, SIDE, device=device, requires_grad=True)
    if implementation == "kepler":
        quantizer = KeplerQuantizer(num_codes, CHANNELS, PARTITIONS, beta=BETA).to(device)

        def step():
            z_q, loss, _ = quantizer(z)
            (loss + z_q.mean()).backward()

    elif implementation == "plain":
        weight = torch.empty(num_codes, SUB_DIM, device=device).uniform_(-1 / num_codes, 1 / num_codes)
        weight.requires_grad_(True)

        def step():
            z_q, loss, _, _ = released_forward(z, weight, "group", PARTITIONS, BETA, legacy=True)
            (loss + z_q.mean()).backward()

    elif implementation == "vqp":
        from vector_quantize_pytorch import VectorQuantize

        quantizer = VectorQuantize(
            dim=CHANNELS,
            codebook_size=num_codes,
            codebook_dim=SUB_DIM,
            heads=PARTITIONS,
            separate_codebook_per_head=False,
            accept_image_fmap=True,
            commitment_weight=BETA,
            learnable_codebook=True,
            ema_update=False,
            kmeans_init=False,
        ).to(device)

        def step():
            z_q, _, loss = quantizer(z)
            (loss.sum() + z_q.mean()).backward()

    else:
        raise ValueError(f"unknown implementation {implementation!r}")
    return step


def peak_step_memory_mb(implementation: str, num_codes: int, device: str) -> float:
    """Peak memory of one step above the inputs and module, in MiB (see the module docstring)."""
    if device == "cuda":
        step = build_step(implementation, num_codes, device)
        step()  # allocator warm-up, lazy initializations
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - baseline) / 2**20
    # The resident-set peak only grows within a process: measure in a fresh one.
    command = [sys.executable, __file__, "--peak-rss", implementation, str(num_codes)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mb"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_codes", CODEBOOK_SIZES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_quantizer_forward_backward(benchmark, implementation, num_codes, device):
    benchmark.group = f"quantizer fwd+bwd K={num_codes} {device}"
    step = build_step(implementation, num_codes, device)
    if device == "cuda":
        def timed():
            step()
            torch.cuda.synchronize()
    else:
        timed = step
    benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=1)
    rows = BATCH * SIDE * SIDE * PARTITIONS
    search_gflop = 2 * rows * num_codes * SUB_DIM / 1e9
    benchmark.extra_info["search_gflop_per_s"] = search_gflop / benchmark.stats.stats.median
    benchmark.extra_info["peak_memory_mb"] = peak_step_memory_mb(implementation, num_codes, device)


def _report_peak_rss(implementation: str, num_codes: int) -> None:
    step = build_step(implementation, num_codes, "cpu")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    step()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mb": (after - before) / 1024}))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--peak-rss":
        _report_peak_rss(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(f"usage: {sys.argv[0]} --peak-rss IMPLEMENTATION NUM_CODES")
