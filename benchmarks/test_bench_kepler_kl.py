"""Forward + backward of the Kepler KL regularizer: kepler's fused backends vs the plain PyTorch way.

    .venv/bin/pytest benchmarks/test_bench_kepler_kl.py --benchmark-json=kepler_kl.json

* ``plain``: the released formula as PyTorch ops (standardize by the unbiased variance, softmax,
  ``sum p * log(p / q + 1e-5)``, batch mean) with autograd; it materializes about ten ``(B, M)``
  float32 temporaries.
* ``cpu`` / ``cuda`` / ``triton``: ``kepler.losses.kepler_kl(..., backend=...)``: three forward and
  two backward passes over each row; the only ``(B, M)`` tensor it allocates is the gradient.

Each round is one forward and one backward, ``mode="official"``, ``eps=1e-5``, a shared ``(M,)``
prior. ``extra_info``: ``effective_gb_per_s`` = (bytes of x read once + bytes of the gradient
written) / median time (the kernels actually read x five times, so this understates their memory
traffic on purpose), and ``peak_memory_mb`` (``benchmarks/memory.py``): the peak of one step
above what is held before it, i.e. above the inputs and the gradient left by the warm-up step, so
it counts the temporaries beyond the gradient (the fused backends' target is ~0); on the CPU it is
measured in a fresh process with glibc's mmap threshold lowered so that freed temporaries go back
to the OS instead of hiding in the heap.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from devices import DEVICES, device_marks
from memory import peak_step_memory_mb
from timing import record_rate

from kepler.losses import kepler_kl

BATCH = 32
ROW_LENGTHS = (65536, 2**20)


def plain_kepler_kl(x: torch.Tensor, prior: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The plain way: the released KeplerLoss.forward + kl_divergence, as PyTorch ops."""
    p = (x - x.mean(dim=1, keepdim=True)) / x.var(dim=1, keepdim=True)
    p = torch.softmax(p, dim=1)
    q = prior.reshape(1, -1)
    q = torch.softmax((q - q.mean(dim=1, keepdim=True)) / q.var(dim=1, keepdim=True), dim=1)
    return torch.sum(p * torch.log(p / q + eps), dim=1).mean()


def _step_fn(implementation: str, x: torch.Tensor, prior: torch.Tensor):
    def step():
        x.grad = None
        if implementation == "plain":
            loss = plain_kepler_kl(x, prior)
        else:
            loss = kepler_kl(x, prior, mode="official", eps=1e-5, backend=implementation)
        loss.backward()
        if x.is_cuda:
            torch.cuda.synchronize()

    return step


def _inputs(device: str, num_cols: int):
    torch.manual_seed(0)
    x = torch.randn(BATCH, num_cols, device=device, requires_grad=True)
    prior = torch.rand(num_cols, device=device)
    return x, prior


def _report_peak_rss(implementation: str, num_cols: int) -> None:
    """Child process: print the peak resident memory of one step above the inputs, in MiB."""
    x, prior = _inputs("cpu", num_cols)
    print(json.dumps({"peak_mb": peak_step_memory_mb(_step_fn(implementation, x, prior), "cpu")}))


def peak_memory_mb(implementation: str, device: str, num_cols: int) -> float:
    if device == "cuda":
        x, prior = _inputs(device, num_cols)
        return peak_step_memory_mb(_step_fn(implementation, x, prior), device)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    command = [sys.executable, __file__, "--peak-rss", implementation, str(num_cols)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True, timeout=600)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mb"]


def _params():
    params = []
    for device in DEVICES:
        marks = device_marks(device)
        implementations = ("plain", "cpu") if device == "cpu" else ("plain", "cuda", "triton")
        for num_cols in ROW_LENGTHS:
            for implementation in implementations:
                params.append(
                    pytest.param(device, num_cols, implementation, marks=marks, id=f"{device}-M{num_cols}-{implementation}")
                )
    return params


@pytest.mark.parametrize("device, num_cols, implementation", _params())
def test_kepler_kl_forward_backward(benchmark, device, num_cols, implementation):
    benchmark.group = f"kepler_kl fwd+bwd B={BATCH} M={num_cols} {device}"
    x, prior = _inputs(device, num_cols)
    step = _step_fn(implementation, x, prior)
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    bytes_moved = x.numel() * x.element_size() * 2  # x read once + grad written once
    record_rate(benchmark, "effective_gb_per_s", bytes_moved / 1e9)
    benchmark.extra_info["peak_memory_mb"] = peak_memory_mb(implementation, device, num_cols)
    benchmark.extra_info["gradient_mb"] = x.numel() * x.element_size() / 2**20


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--peak-rss":
    _report_peak_rss(sys.argv[2], int(sys.argv[3]))
