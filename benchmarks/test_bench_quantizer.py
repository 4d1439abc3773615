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
peak memory of one step above what the inputs, the module and the gradients already hold
(CUDA: the caching allocator's peak; CPU: the resident-set peak, Linux only) and the
throughput of the search in GFLOP/s (``2 * rows * K * d`` for the forward's distances).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from devices import GPU_MARKS
from memory import peak_step_memory_mb
from timing import record_rate, synchronized

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
        marks=GPU_MARKS,
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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_codes", CODEBOOK_SIZES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_quantizer_forward_backward(benchmark, implementation, num_codes, device):
    benchmark.group = f"quantizer fwd+bwd K={num_codes} {device}"
    step = build_step(implementation, num_codes, device)
    benchmark.pedantic(synchronized(step, device), rounds=ROUNDS, warmup_rounds=1)
    rows = BATCH * SIDE * SIDE * PARTITIONS
    search_gflop = 2 * rows * num_codes * SUB_DIM / 1e9
    record_rate(benchmark, "search_gflop_per_s", search_gflop)
    benchmark.extra_info["peak_memory_mb"] = peak_step_memory_mb(step, device)
