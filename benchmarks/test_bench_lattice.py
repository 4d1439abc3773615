"""Closest lattice point (D4, E8): kepler's fused backends vs plain PyTorch (eager and compiled) vs a memcpy.

    .venv/bin/pytest benchmarks/test_bench_lattice.py --benchmark-json=lattice.json

The closest-point step runs over every latent sub-vector of every training step, so its bound is
memory traffic: reading the ``(N, n)`` float32 sub-vectors and writing their lattice points. The
``memcpy`` row (``torch.empty_like(x).copy_(x)``, the same bytes read and written) is that bound.
``reference`` is the plain PyTorch way (``closest_lattice_point_ref``), ``compiled`` the same under
``torch.compile``; ``cpu`` / ``cuda`` / ``triton`` are ``kepler.closest_lattice_point(...,
backend=...)``. A group (lattice, device, threads) holds all rows, so the ratios come from one run:
compare ``mean`` across a group. ``extra_info['gb_per_s']``: bytes read + written, 10^9 per second.
``N = 2**20`` sub-vectors on the CPU, ``2**24`` on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from devices import DEVICES, device_marks
from timing import record_rate

from kepler.lattice import get_lattice
from kepler.ops.closest_lattice_point import closest_lattice_point, lattice_family
from kepler.reference.closest_lattice_point import closest_lattice_point_ref

LATTICES = ("D4", "E8")
ROWS = {"cpu": 2**20, "cuda": 2**24}


def _memcpy(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x).copy_(x)


def _params():
    params = []
    for device in DEVICES:
        marks = device_marks(device)
        kernels = ("cpu",) if device == "cpu" else ("cuda", "triton")
        for threads in (1, 2) if device == "cpu" else (None,):
            for implementation in ("memcpy", "reference", "compiled", *kernels):
                label = f"{device}-{threads}t-{implementation}" if threads else f"{device}-{implementation}"
                params.append(pytest.param(device, threads, implementation, marks=marks, id=label))
    return params


@pytest.fixture
def restore_threads():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("device, threads, implementation", _params())
@pytest.mark.parametrize("lattice", LATTICES)
def test_closest_point(benchmark, restore_threads, lattice, device, threads, implementation):
    if threads is not None:
        torch.set_num_threads(threads)
    family, dim = lattice_family(lattice)
    x = torch.randn(ROWS[device], dim, generator=torch.Generator().manual_seed(0)).mul_(3).to(device)
    if implementation == "memcpy":
        run = _memcpy
    elif implementation == "reference":
        run = lambda rows: closest_lattice_point_ref(rows, family)  # noqa: E731
    elif implementation == "compiled":
        torch._dynamo.reset()
        run = torch.compile(lambda rows: closest_lattice_point_ref(rows, family), fullgraph=True, dynamic=False)
    else:
        run = lambda rows: closest_lattice_point(rows, lattice, backend=implementation)  # noqa: E731
    if implementation != "memcpy":
        # Outside the timing: the compile, and the check that every row gets a closest point (rows
        # within rounding of a tie may take the other one: the distances agree, not the points).
        expected = closest_lattice_point_ref(x, family)
        found_sq = (x - run(x)).square().sum(dim=1)
        torch.testing.assert_close(found_sq, (x - expected).square().sum(dim=1), rtol=0, atol=1e-5)
    group_threads = f", {threads} thread(s)" if threads else ""
    benchmark.group = f"closest point {get_lattice(lattice).name}, {device}{group_threads}, N={x.shape[0]} float32"
    benchmark.extra_info.update(lattice=lattice, device=device, threads=threads, implementation=implementation)
    if device == "cuda":
        benchmark.pedantic(lambda: (run(x), torch.cuda.synchronize()), rounds=20, warmup_rounds=3)
    else:
        benchmark.pedantic(run, args=(x,), rounds=10, warmup_rounds=2)
    record_rate(benchmark, "gb_per_s", 2 * x.numel() * x.element_size() / 1e9, "mean")
