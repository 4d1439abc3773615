"""Forward + backward of residual quantization: kepler's ResidualQuantizer vs vector-quantize-pytorch's
ResidualVQ vs the plain PyTorch way, configured the same: 8 stages of 1024 codes over the whole latent
(D = 64 and 256), B = 32 latents of 16 x 16, EMA codebooks (decay 0.8, the library's default), no
k-means, commitment weight 0.25.

    .venv/bin/pytest benchmarks/test_bench_residual.py --benchmark-json=residual.json

* ``kepler``: ``ResidualQuantizer(num_quantizers=8, num_codes=1024, ema_decay=0.8, init="uniform")``
  on the default backend: one fused ``nearest_codeword`` search a stage, never a ``(rows, K)`` matrix.
* ``vqp``: ``vector_quantize_pytorch.ResidualVQ(num_quantizers=8, codebook_size=1024, decay=0.8,
  commitment_weight=0.25)`` on the latents as ``(B, H*W, D)`` rows (its ``accept_image_fmap`` path
  fails with 8 stages in version 1.32.0: its residual history is concatenated in the wrong layout).
* ``plain``: a stage as ``torch.cdist``-style distances (``||r||^2 - 2 r E^T + ||e||^2``), ``argmin``,
  gather, commitment MSE, with EMA codebook updates by ``index_add_``: what one writes without a
  library.

Each round is one forward and one backward of ``loss + mean(z_q)``. ``extra_info`` holds
``search_gflop_per_s`` (``2 * rows * K * D`` per stage, 8 stages) and ``peak_memory_mb`` (the peak
above what is held before the step; benchmarks/memory.py).
"""

from __future__ import annotations

import pytest
import torch
from devices import DEVICES, device_marks
from memory import peak_step_memory_mb
from timing import record_rate, synchronized

from kepler.nn import ResidualQuantizer

BATCH, SIDE, STAGES, CODES, BETA, DECAY = 32, 16, 8, 1024, 0.25, 0.8
DIMS = (64, 256)
IMPLEMENTATIONS = ("kepler", "vqp", "plain")
ROUNDS = 3


class PlainResidualVQ(torch.nn.Module):
    """Residual VQ the plain way: full distance matrix, argmin, gather, EMA by ``index_add_``."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("codebooks", torch.randn(STAGES, CODES, dim))
        self.register_buffer("cluster_size", torch.ones(STAGES, CODES))
        self.register_buffer("embed_sum", self.codebooks.clone())

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        residual, total, loss = rows, torch.zeros_like(rows), rows.new_zeros(())
        for stage in range(STAGES):
            codebook = self.codebooks[stage]
            distances = (residual.detach().square().sum(1, keepdim=True) - 2 * residual.detach() @ codebook.T
                         + codebook.square().sum(1))
            index = distances.argmin(dim=1)
            codes = codebook[index]
            loss = loss + BETA * (residual - codes).square().mean()
            with torch.no_grad():
                counts = torch.zeros(CODES, device=index.device).index_add_(0, index, torch.ones_like(index, dtype=torch.float32))
                sums = torch.zeros_like(codebook).index_add_(0, index, residual.detach())
                self.cluster_size[stage].mul_(DECAY).add_(counts, alpha=1 - DECAY)
                self.embed_sum[stage].mul_(DECAY).add_(sums, alpha=1 - DECAY)
                self.codebooks[stage].copy_(self.embed_sum[stage] / self.cluster_size[stage].clamp_min(1e-5)[:, None])
            total = total + codes
            residual = residual - codes
        z_q = rows + (total - rows).detach()
        return z_q.view(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2), loss


def build_step(implementation: str, dim: int, device: str):
    """A closure running one forward + backward, with its inputs and module already built."""
    torch.manual_seed(0)
    z = torch.randn(BATCH, dim, SIDE, SIDE, device=device, requires_grad=True)
    if implementation == "kepler":
        quantizer = ResidualQuantizer(num_quantizers=STAGES, num_codes=CODES, dim=dim, beta=BETA, init="uniform",
                                      ema_decay=DECAY).to(device).train()

        def step():
            z_q, loss, _ = quantizer(z)
            (loss + z_q.mean()).backward()

    elif implementation == "vqp":
        from vector_quantize_pytorch import ResidualVQ

        quantizer = ResidualVQ(dim=dim, num_quantizers=STAGES, codebook_size=CODES, decay=DECAY,
                               commitment_weight=BETA).to(device).train()

        def step():
            rows = z.permute(0, 2, 3, 1).reshape(BATCH, SIDE * SIDE, dim)
            z_q, _, loss = quantizer(rows)
            (loss.sum() + z_q.mean()).backward()

    elif implementation == "plain":
        quantizer = PlainResidualVQ(dim).to(device)

        def step():
            z_q, loss = quantizer(z)
            (loss + z_q.mean()).backward()

    else:
        raise ValueError(f"unknown implementation {implementation!r}")
    return step


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("device", [pytest.param(d, marks=device_marks(d)) for d in DEVICES])
def test_residual_quantizer_forward_backward(benchmark, device, dim, implementation):
    benchmark.group = f"residual VQ fwd+bwd {STAGES}x{CODES} D={dim} B={BATCH}x{SIDE}x{SIDE} {device}"
    step = build_step(implementation, dim, device)
    benchmark.pedantic(synchronized(step, device), rounds=ROUNDS, warmup_rounds=1)
    record_rate(benchmark, "search_gflop_per_s", 2 * BATCH * SIDE * SIDE * CODES * dim * STAGES / 1e9)
    benchmark.extra_info["peak_memory_mb"] = peak_step_memory_mb(step, device)
