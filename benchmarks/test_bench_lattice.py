"""Closest lattice point (D4, E8) in plain PyTorch, eager and ``torch.compile``d, against a memcpy.

    .venv/bin/pytest benchmarks/test_bench_lattice.py --benchmark-json=lattice.json

The closest-point step runs over every latent sub-vector of every training step, so its bound is
memory traffic: reading the ``(N, n)`` float32 sub-vectors and writing their lattice points. The
``memcpy`` row (``torch.empty_like(x).copy_(x)``, the same bytes read and written) is that bound; a
group (lattice, threads) holds the three rows, so the ratios come from one run. ``extra_info``:
``gb_per_s`` (bytes read + written, 10^9 per second) and, in the ``memcpy`` rows, nothing else;
compare ``mean`` across a group for the ratio. ``N = 2**20`` sub-vectors.
"""

from __future__ import annotations

import pytest
import torch

from kepler.lattice import get_lattice
from kepler.lattice_codes import closest_point_function

ROWS = 2**20
LATTICES = ("D4", "E8")
THREADS = (1, 2)
IMPLEMENTATIONS = ("memcpy", "eager", "compiled")


def _memcpy(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x).copy_(x)


@pytest.fixture
def threads(request):
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("threads", THREADS, indirect=True)
@pytest.mark.parametrize("lattice", LATTICES)
def test_closest_point(benchmark, lattice, threads, implementation):
    function = closest_point_function(lattice)
    dim = get_lattice(lattice).dim
    x = torch.randn(ROWS, dim, generator=torch.Generator().manual_seed(0)) * 3
    if implementation == "memcpy":
        run = _memcpy
    elif implementation == "eager":
        run = function
    else:
        run = torch.compile(function, fullgraph=True, dynamic=False)
        run(x)  # compile outside the timing
    if implementation != "memcpy":
        assert torch.equal(run(x), function(x))
    benchmark.group = f"closest point {lattice}, {threads} thread(s), N=2**20 float32"
    benchmark.extra_info.update(lattice=lattice, threads=threads, implementation=implementation)
    benchmark.pedantic(run, args=(x,), rounds=10, warmup_rounds=2)
    benchmark.extra_info["gb_per_s"] = 2 * x.numel() * x.element_size() / benchmark.stats.stats.mean / 1e9
