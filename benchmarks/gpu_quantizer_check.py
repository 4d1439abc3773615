"""KeplerQuantizer on one device: forward + backward in float32 and under bfloat16 autocast on every
kernel backend, checked against the reference backend, and torch.compile(fullgraph=True) checked
against eager. Part of benchmarks/gpu_check.sh; runs on the CPU too (``--device cpu``).

    python benchmarks/gpu_quantizer_check.py --device cuda --json OUT/quantizer.json

Exit status 1 when a part fails; every part's result (and why) goes to stdout and the JSON.

Each part builds the README's quantizer (K=1024, C=256, P=4 shared sub-codebooks, the codebook
drawn like the latents so that every code is in play) on a batch of 8 16x16 latents made by a 1x1
convolution (so autocast has an op to run in bfloat16 before the quantizer, as in a VQGAN).
Tolerances:

* indices: identical to the reference backend's (random data has no ties within rounding);
* float32: loss and gradients within float32 rounding of the reference backend's
  (``rtol = 1e-5``, ``atol = 1e-5 * max|reference|``);
* bfloat16 autocast: the quantizer sees bfloat16 latents; gradients within two bfloat16 units
  (``2 * 2**-8`` relative) of the reference backend's at their largest magnitude;
* compile: the compiled module against eager on the same backend, three steps, same tolerances as
  float32 (the compiled graph may fuse and reorder float32 sums).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

import kepler
from kepler.nn import KeplerQuantizer

BATCH, CHANNELS, SIDE, CODES, PARTITIONS = 8, 256, 16, 1024, 4


def make_quantizer(backend: str | None, device: torch.device, seed: int = 0) -> KeplerQuantizer:
    torch.manual_seed(seed)
    quantizer = KeplerQuantizer(num_codes=CODES, dim=CHANNELS, partitions=PARTITIONS, backend=backend)
    with torch.no_grad():
        quantizer.codebook.normal_()
    return quantizer.to(device)


def make_inputs(device: torch.device, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-quantization input (B, C, H, W) and the 1x1 convolution's weight (C, C, 1, 1)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, CHANNELS, SIDE, SIDE, generator=generator)
    weight = torch.eye(CHANNELS).view(CHANNELS, CHANNELS, 1, 1) + 0.01 * torch.randn(
        CHANNELS, CHANNELS, 1, 1, generator=generator)
    return x.to(device), weight.to(device)


def step(quantizer, x, weight, autocast_dtype=None):
    """One forward + backward; returns indices, z_q, loss and the gradients of x and the codebook."""
    x = x.detach().clone().requires_grad_(True)
    quantizer.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        latent = torch.nn.functional.conv2d(x, weight)
        out = quantizer(latent)
    (out.loss + out.z_q.float().square().mean()).backward()
    return {"indices": out.indices, "z_q": out.z_q.detach(), "loss": out.loss.detach(),
            "grad_x": x.grad, "grad_codebook": quantizer.codebook.grad}


def compare(got: dict, expected: dict, rel: float) -> list[str]:
    """Why ``got`` differs from ``expected`` (empty when it does not): indices exactly, floats within
    ``rel`` relative plus ``rel`` of the largest magnitude."""
    problems = []
    mismatched = int((got["indices"] != expected["indices"]).sum())
    if mismatched:
        problems.append(f"{mismatched} of {expected['indices'].numel()} indices differ")
    for name in ("z_q", "loss", "grad_x", "grad_codebook"):
        a, b = got[name].double(), expected[name].double()
        if not torch.isfinite(a).all():
            problems.append(f"{name} is not finite")
            continue
        error = (a - b).abs().max().item()
        allowed = rel * b.abs().max().item()
        if not torch.allclose(a, b, rtol=rel, atol=allowed):
            problems.append(f"{name}: max error {error:.3g} > {allowed:.3g}")
    return problems


def check_backend(backend: str, device: torch.device, autocast_dtype) -> list[str]:
    x, weight = make_inputs(device)
    got = step(make_quantizer(backend, device), x, weight, autocast_dtype)
    expected = step(make_quantizer("reference", device), x, weight, autocast_dtype)
    problems = []
    if autocast_dtype is not None:
        if got["z_q"].dtype != autocast_dtype or got["loss"].dtype != torch.float32:
            problems.append(f"z_q {got['z_q'].dtype}, loss {got['loss'].dtype}: expected {autocast_dtype}, float32")
        return problems + compare(got, expected, rel=2 * 2**-8)
    return problems + compare(got, expected, rel=1e-5)


def check_compile(device: torch.device, compile_backend: str) -> list[str]:
    eager = make_quantizer(None, device)
    compiled_module = make_quantizer(None, device)
    compiled = torch.compile(compiled_module, fullgraph=True, backend=compile_backend)
    problems = []
    for index in range(3):
        x, weight = make_inputs(device, seed=10 + index)
        expected = step(eager, x, weight)
        got = step(compiled, x, weight)
        problems += [f"step {index}: {p}" for p in compare(got, expected, rel=1e-5)]
        with torch.no_grad():  # the same (plain SGD) update on both, so later steps see new codebooks
            for module in (eager, compiled_module):
                module.codebook -= 0.1 * module.codebook.grad
    return problems


def run_part(name: str, check) -> dict:
    start = time.perf_counter()
    try:
        problems = check()
    except Exception as exc:  # a crash is that part's failure; the other parts still run
        problems = [f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=-3)]
    result = {"part": name, "passed": not problems, "problems": problems, "seconds": round(time.perf_counter() - start, 2)}
    status = "ok" if result["passed"] else "FAIL: " + "; ".join(problems[:3])
    print(f"{name}: {status} ({result['seconds']} s)", flush=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:1, cpu ...")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (inductor, aot_eager)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    kernel_backends = [b for b in kepler.available_backends(device) if b != "reference"]
    print(f"device {device}; kernel backends: {', '.join(kernel_backends) or 'none'}", flush=True)
    parts = []
    for backend in kernel_backends:
        parts.append(run_part(f"{backend} float32 fwd+bwd", lambda b=backend: check_backend(b, device, None)))
        parts.append(run_part(f"{backend} bf16 autocast fwd+bwd",
                              lambda b=backend: check_backend(b, device, torch.bfloat16)))
    parts.append(run_part(f"torch.compile(fullgraph=True, backend={args.compile_backend!r})",
                          lambda: check_compile(device, args.compile_backend)))
    if not kernel_backends:
        parts.append({"part": "kernel backends", "passed": False, "problems": [f"none available on {device}"]})
    passed = all(part["passed"] for part in parts)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"device": str(device), "passed": passed, "parts": parts}, indent=2) + "\n")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
