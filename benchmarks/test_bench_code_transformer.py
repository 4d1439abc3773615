"""The code prior on the CPU: KV-cache sampling vs recomputing the prefix, flat vs factorized order.

    .venv/bin/pytest benchmarks/test_bench_code_transformer.py --benchmark-json=code_transformer.json

The index maps are the demo tokenizer's (32x32 crops, downsampling 4, 4 partitions of one shared
codebook of 256 codes): 8x8 positions of 4 sub-codes, 256 flat tokens or 64 factorized positions.
The prior is small (d_model 128, 4 layers, 4 heads: about 0.9M parameters) so that the suite runs in
about a minute on one core. On a machine whose cores other jobs also use, run it with
``OMP_NUM_THREADS=1``: two OpenMP threads contending for a busy core make every small step of the
cached path wait, and the timings are noise.

* ``prior sampling``: :meth:`CodeTransformer.generate` of ``SAMPLES`` maps, each order with the KV
  cache (one token through the stack per step) and recomputing the whole prefix at every step
  (``use_cache=False``, what a prior without a cache does). ``extra_info["tokens_per_s"]`` counts
  sub-codes sampled per second; the issue asks the cache to be >= 5x faster than recomputing at
  256 flat tokens.
* ``prior training step``: forward + backward of the mean cross-entropy on a batch of ``BATCH``
  maps; ``extra_info["tokens_per_s"]`` counts sub-codes per second and ``peak_memory_mb`` the
  step's peak above what it starts with (``benchmarks/memory.py``).
"""

from __future__ import annotations

import pytest
import torch
from memory import peak_step_memory_mb
from timing import record_rate

from kepler.models import CodeLayout, CodeTransformer

LAYOUT = CodeLayout(height=8, width=8, tokens_per_position=4, codebook_size=256, shared_codebook=True)
MODEL = dict(d_model=128, num_layers=4, num_heads=4)
SAMPLES, BATCH, ROUNDS = 4, 16, 3


def build_prior(order: str) -> CodeTransformer:
    torch.manual_seed(0)
    return CodeTransformer(LAYOUT, order=order, **MODEL)


@pytest.mark.parametrize(
    "order, use_cache",
    [("flat", True), ("flat", False), ("factorized", True), ("factorized", False)],
    ids=["flat-kv-cache", "flat-recompute", "factorized-kv-cache", "factorized-recompute"],
)
def test_sampling(benchmark, order, use_cache):
    benchmark.group = f"prior sampling {LAYOUT.flat_length} tokens cpu"
    model = build_prior(order)
    generator = torch.Generator().manual_seed(0)
    # No warm-up round: sampling allocates nothing lazily, and recomputing takes ~10 s a round.
    benchmark.pedantic(lambda: model.generate(SAMPLES, generator=generator, use_cache=use_cache), rounds=ROUNDS)
    record_rate(benchmark, "tokens_per_s", SAMPLES * LAYOUT.flat_length)


@pytest.mark.parametrize("order", ["flat", "factorized"])
def test_training_step(benchmark, order):
    benchmark.group = "prior training step cpu"
    model = build_prior(order)
    indices = torch.randint(0, LAYOUT.codebook_size, (BATCH, LAYOUT.height, LAYOUT.width, LAYOUT.tokens_per_position))

    def step():
        model.zero_grad(set_to_none=True)
        model.loss(indices).backward()

    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1)
    record_rate(benchmark, "tokens_per_s", BATCH * LAYOUT.flat_length)
    benchmark.extra_info["peak_memory_mb"] = peak_step_memory_mb(step, "cpu")
