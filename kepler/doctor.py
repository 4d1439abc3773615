"""``kepler doctor``: what this machine runs, and whether every backend agrees with the reference.

:func:`doctor` collects the versions (Python, torch, triton, CUDA), the devices, what ``kepler._C``
was built with, and for every op of the op inventory (:data:`kepler.ops.OPS`: ``nearest_codeword``,
``kepler_kl``, ``packing_energy``, ``closest_lattice_point``, ``code_entropy``) on every device and every backend
available there (``kepler.available_backends``):

* a randomized check (seeded, small odd shapes) of the forward value and the backward gradients
  against the float64 reference (``kepler/reference``), in float32 and in bfloat16; an op without a
  backward (``OpRecord.backward`` None: ``closest_lattice_point``) is checked on its forward only;
* a speed figure: the median of a few forward + backward runs (forward runs for an op without a
  backward) of the backend and of the plain PyTorch way (the reference op) on the same float32
  inputs. A figure, not a gate.

Tolerance rule (the tests' rule, section "Tests" of ``docs/DESIGN.md``): every run sees the same
input values (drawn in float32, rounded to the dtype under test); the oracle is the reference on
their float64 copies. A backend's largest absolute error against the oracle may be at most

    2 * (the error of the reference op run at the same dtype) + 2 * eps(result dtype) * max|oracle|

i.e. no worse than twice plain PyTorch at that precision, plus two units of rounding of the result
(float32 for forward values, which every op accumulates in float32; the input dtype for gradients)
so that a yardstick that happens to be exact does not demand exactness. The ``reference`` rows
measure the reference against itself (they pass by construction) and show the size of its rounding.

``nearest_codeword`` is checked on the distance to the chosen codeword (``sq_dist``): a near-tie
broken the other way within rounding changes the index but not the distance beyond the tolerance.

``closest_lattice_point`` is checked on the points of ``E8`` closest to random rows (|x| below 16,
far inside the exact range ``|x| < 2**21``), where every backend must return the reference's points
(a wrong point is off by at least 1/2, far beyond the tolerance). ``E8`` runs the most of the op:
the checkerboard lattice ``D8``'s parity fix on two cosets and the choice between them. That choice
is the one place where backends may differ, at a distance tie between the cosets, which random
rows reach with probability ~0 (a test keeps the doctor's rows clear of one).

The Triton backend runs on CPU tensors only in the Triton interpreter (``TRITON_INTERPRET=1`` set
before the process starts, see ``kepler doctor --triton-interpret``); interpreted runs get no speed
figure, as an interpreter's time says nothing about the kernel.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from kepler import _backend, _ext
from kepler.kernels._common import triton_interpreter_on
from kepler.losses import code_entropy, kepler_kl, packing_energy
from kepler.ops import OPS, OpRecord
from kepler.ops.closest_lattice_point import closest_lattice_point
from kepler.ops.nearest_codeword import nearest_codeword

CHECK_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class _OpCase:
    """How the doctor drives one op of the inventory.

    ``make_inputs(generator, size)`` returns the float32 CPU inputs (differentiable, where the op is)
    and the constant keyword arguments for ``size`` ``"check"`` (small odd shapes) or ``"speed"`` (a
    working size); ``forward(backend, *inputs, **constants)`` returns the op's float output (one tensor).
    """

    make_inputs: Callable[[torch.Generator, str], tuple[tuple[torch.Tensor, ...], dict]]
    forward: Callable[..., torch.Tensor]


def _nearest_codeword_inputs(generator: torch.Generator, size: str):
    """z (G, N, D) and a shared codebook (K, D)."""
    groups, rows, codes, dim = (2, 67, 37, 13) if size == "check" else (1, 8192, 1024, 64)
    z = torch.randn(groups, rows, dim, generator=generator)
    codebook = torch.randn(codes, dim, generator=generator)
    return (z, codebook), {}


def _kepler_kl_inputs(generator: torch.Generator, size: str):
    """x (B, M) and a constant prior (M,)."""
    rows, cols = (3, 257) if size == "check" else (32, 65536)
    x = torch.randn(rows, cols, generator=generator) * 0.7 + 0.2
    return (x,), {"prior": torch.rand(cols, generator=generator)}


def _packing_energy_inputs(generator: torch.Generator, size: str):
    """Two sub-codebooks (G, K, d)."""
    groups, codes, dim = (2, 37, 5) if size == "check" else (1, 1024, 16)
    return (torch.randn(groups, codes, dim, generator=generator),), {}


def _closest_lattice_point_inputs(generator: torch.Generator, size: str):
    """Rows x (..., 8) for E8 (why E8: the module docstring), (G, N, 8) to check, (N, 8) to time."""
    shape = (3, 67, 8) if size == "check" else (1 << 20, 8)
    return (torch.randn(shape, generator=generator) * 2.0,), {}


def _code_entropy_inputs(generator: torch.Generator, size: str):
    """z (G, N, D) and per-group codebooks (G, K, D), at a temperature that keeps the assignments soft."""
    groups, rows, codes, dim = (2, 67, 37, 13) if size == "check" else (1, 8192, 1024, 16)
    z = torch.randn(groups, rows, dim, generator=generator)
    codebook = torch.randn(groups, codes, dim, generator=generator)
    return (z, codebook), {}


# The inputs of every op of the inventory (kepler.ops.OPS), by its name.
_CASES = {
    "nearest_codeword": _OpCase(_nearest_codeword_inputs,
                                lambda backend, z, codebook: nearest_codeword(z, codebook, backend=backend)[1]),
    "kepler_kl": _OpCase(_kepler_kl_inputs, lambda backend, x, prior: kepler_kl(x, prior, backend=backend)),
    "packing_energy": _OpCase(_packing_energy_inputs,
                              lambda backend, codebook: packing_energy(codebook, backend=backend)),
    "closest_lattice_point": _OpCase(_closest_lattice_point_inputs,
                                     lambda backend, x: closest_lattice_point(x, "E8", backend=backend)),
    # Both entropies of each group, (2, G); T = 4 keeps random 13-d rows' assignments soft.
    "code_entropy": _OpCase(_code_entropy_inputs,
                            lambda backend, z, codebook: torch.stack(code_entropy(z, codebook, 4.0, backend=backend))),
}


@dataclass
class Agreement:
    """One direction (forward value or backward gradients) of one check: errors vs the float64 oracle."""

    error: float  # max |backend - oracle|
    allowed: float  # see the module docstring

    @property
    def passed(self) -> bool:
        return math.isfinite(self.error) and self.error <= self.allowed


@dataclass
class Check:
    """One op on one backend, device and dtype: forward and backward against the oracle.

    ``failure`` holds the exception text when the backend raised (then ``forward``/``backward``
    are None); ``backward`` is None too for an op without a backward.
    """

    op: str
    device: str
    backend: str
    dtype: str
    forward: Agreement | None = None
    backward: Agreement | None = None
    failure: str | None = None

    @property
    def passed(self) -> bool:
        return self.failure is None and self.forward.passed and (self.backward is None or self.backward.passed)


@dataclass
class Speed:
    """Median seconds of one forward + backward (of one forward where ``forward_only``: an op
    without a backward) on the speed-size float32 inputs.

    ``backend_s``/``reference_s`` are None, with ``note`` saying why, when no figure was taken.
    """

    op: str
    device: str
    backend: str
    forward_only: bool
    backend_s: float | None
    reference_s: float | None
    note: str = ""


@dataclass
class DoctorReport:
    """What :func:`doctor` found: the machine, the ops checked (name and ``OpRecord.backward``,
    inventory order), then one ``Check`` per (op, device, backend, dtype) and one ``Speed`` per
    (op, device, backend)."""

    environment: dict
    devices: list[dict]
    ops: list[dict]
    compiled_backends: list[str]
    backends: dict[str, list[str]]  # device -> backends checked there
    checks: list[Check]
    speeds: list[Speed]

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def to_dict(self) -> dict:
        """A JSON-ready copy (``passed`` included at every level)."""
        out = dataclasses.asdict(self)
        out["passed"] = self.passed
        for check, raw in zip(self.checks, out["checks"]):
            raw["passed"] = check.passed
        return out


def _environment() -> dict:
    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": version("triton"),
        "triton_interpreter": triton_interpreter_on(),
        "kepler_C": "built" if _ext.HAS_CPU_EXT else f"not built: {_ext.EXT_IMPORT_ERROR}",
        "cpu_threads": torch.get_num_threads(),
    }


def _cpu_name() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _devices() -> list[dict]:
    devices = [{"device": "cpu", "name": f"{_cpu_name()}, {os.cpu_count()} logical cores"}]
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        devices.append({
            "device": f"cuda:{index}",
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
        })
    return devices


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run(op: OpRecord, backend: str, inputs: Sequence[torch.Tensor], constants: dict,
         seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward value and the gradients of ``sum(output * w)`` w.r.t. every input, flattened
    (None for an op without a backward).

    ``w`` is drawn from ``seed`` in float64 (then cast to the output's dtype and device), so every
    run weighs the output the same way.
    """
    differentiable = op.backward is not None
    leaves = [tensor.detach().requires_grad_(differentiable) for tensor in inputs]
    output = _CASES[op.name].forward(backend, *leaves, **constants)
    if not differentiable:
        return output, None
    weights = torch.randn(output.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grads = torch.autograd.grad(output, leaves, grad_outputs=weights.to(output.dtype).to(output.device))
    return output.detach(), torch.cat([grad.reshape(-1) for grad in grads])


def _agreement(got: torch.Tensor, yardstick: torch.Tensor, oracle: torch.Tensor, result_dtype: torch.dtype) -> Agreement:
    """Largest error of ``got`` and its allowance (module docstring); every tensor is non-empty."""
    got, yardstick, oracle = (t.detach().double().cpu() for t in (got, yardstick, oracle))
    scale = oracle.abs().max().item()
    yard_error = (yardstick - oracle).abs().max().item()
    error = (got - oracle).abs().max().item()  # NaN when got holds one: Agreement.passed is then False
    return Agreement(error=error, allowed=2 * yard_error + 2 * torch.finfo(result_dtype).eps * scale)


def _checks(op: OpRecord, backends: Sequence[str], device: torch.device, dtype: torch.dtype, seed: int) -> list[Check]:
    """One :class:`Check` per backend; the float64 oracle and the yardstick (the reference at
    ``dtype`` on ``device``) are computed once for all of them."""
    generator = torch.Generator().manual_seed(seed)
    inputs, constants = _CASES[op.name].make_inputs(generator, "check")
    values = [tensor.to(dtype) for tensor in inputs]  # the values every run sees, rounded to dtype
    results = [Check(op.name, str(device), backend, str(dtype).removeprefix("torch.")) for backend in backends]
    try:  # moving the inputs may fail too (out of memory): then every row reports it
        on_device = [tensor.to(device) for tensor in values]
        device_constants = {key: value.to(device) for key, value in constants.items()}
        oracle = _run(op, "reference", [t.double() for t in values], {k: v.double() for k, v in constants.items()}, seed)
        yardstick = _run(op, "reference", on_device, device_constants, seed)
    except Exception as exc:  # then no backend can be judged on this device and dtype
        for result in results:
            result.failure = f"reference: {type(exc).__name__}: {exc}"
        return results
    for result in results:
        try:
            got = yardstick if result.backend == "reference" else _run(
                op, result.backend, on_device, device_constants, seed)
        except Exception as exc:  # a backend that raises is reported, not fatal: the other rows still run
            result.failure = f"{type(exc).__name__}: {exc}"
            continue
        result.forward = _agreement(got[0], yardstick[0], oracle[0], torch.float32)
        if op.backward is not None:
            result.backward = _agreement(got[1], yardstick[1], oracle[1], dtype)
    return results


def _median_seconds(op: OpRecord, backend: str, inputs, constants, device: torch.device, repeats: int) -> float:
    differentiable = op.backward is not None
    leaves = [tensor.detach().requires_grad_(differentiable) for tensor in inputs]

    def step():
        output = _CASES[op.name].forward(backend, *leaves, **constants)
        if differentiable:
            torch.autograd.grad(output, leaves, grad_outputs=torch.ones_like(output))

    step()  # warm-up: Triton/CUDA compile and caching allocators are not part of the figure
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        step()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _speeds(op: OpRecord, backends: Sequence[str], device: torch.device, seed: int, repeats: int,
            size: str) -> list[Speed]:
    """One :class:`Speed` per backend; plain PyTorch (the reference) is timed once for all of them."""
    inputs, constants = _CASES[op.name].make_inputs(torch.Generator().manual_seed(seed), size)
    inputs = [tensor.to(device) for tensor in inputs]
    constants = {key: value.to(device) for key, value in constants.items()}
    reference_s, reference_failure = None, ""
    try:
        reference_s = _median_seconds(op, "reference", inputs, constants, device, repeats)
    except Exception as exc:  # the correctness rows already report it
        reference_failure = f"reference: {type(exc).__name__}: {exc}"
    speeds = []
    for backend in backends:
        speed = functools.partial(Speed, op.name, str(device), backend, op.backward is None)
        if backend == "triton" and triton_interpreter_on():
            speeds.append(speed(None, None, "interpreted: no speed figure"))
        elif reference_s is None:
            speeds.append(speed(None, None, reference_failure))
        elif backend == "reference":
            speeds.append(speed(reference_s, reference_s))
        else:
            try:
                backend_s = _median_seconds(op, backend, inputs, constants, device, repeats)
            except Exception as exc:  # the correctness rows already report a failing backend
                speeds.append(speed(None, None, f"{type(exc).__name__}: {exc}"))
                continue
            speeds.append(speed(backend_s, reference_s))
    return speeds


def doctor(
    devices: Sequence[str] | None = None,
    *,
    backends: Sequence[str] | None = None,
    seed: int = 0,
    repeats: int = 3,
    quick: bool = False,
) -> DoctorReport:
    """Check every op on every backend available on every device against the float64 reference.

    Args:
        devices: the devices to check, e.g. ``["cpu", "cuda:0"]``; default the CPU and every
            visible CUDA device.
        backends: check only these (default: every backend available on each device). A named
            backend that runs on none of the devices raises ValueError with the reason.
        seed: seed of the random inputs (the check is deterministic for a given seed).
        repeats: timed runs per speed figure (after one warm-up); its median is reported.
        quick: time the small check-size inputs instead of the working size (a fast smoke run,
            e.g. in tests; the figures then say little).

    Returns:
        A :class:`DoctorReport`; ``report.passed`` is False when any backend disagrees with the
        reference beyond the tolerance (module docstring) or raises. Nothing is printed
        (:func:`format_report` renders it).
    """
    machine_devices = _devices()
    device_list = [torch.device(d) for d in (devices or [d["device"] for d in machine_devices])]
    checked = {str(device): _backend.available_backends(device) for device in device_list}
    if backends is not None:
        for name in backends:
            if name not in _backend.BACKENDS:
                raise ValueError(f"unknown backend {name!r}; expected one of {_backend.BACKENDS}")
            if not any(name in available for available in checked.values()):
                reasons = "; ".join(f"{device}: {_backend._unavailable_reason(name, device.type)}" for device in device_list)
                raise ValueError(f"backend {name!r} runs on none of the devices checked ({reasons})")
        checked = {device: [b for b in available if b in backends] for device, available in checked.items()}
    checks, speeds = [], []
    for op in OPS:
        for device in device_list:
            device_backends = checked[str(device)]
            for dtype in CHECK_DTYPES:
                checks += _checks(op, device_backends, device, dtype, seed)
            speeds += _speeds(op, device_backends, device, seed, repeats, "check" if quick else "speed")
    compiled = [name for name, built in (("cpu", _ext.HAS_CPU_EXT), ("cuda", _ext.HAS_CUDA_EXT)) if built]
    ops = [{"name": op.name, "backward": op.backward} for op in OPS]
    return DoctorReport(_environment(), machine_devices, ops, compiled, checked, checks, speeds)


# The bwd cells of an op without a backward (OpRecord.backward None).
NO_BACKWARD = "n/a (no backward)"


def _agreement_cell(agreement: Agreement | None) -> str:
    if agreement is None:
        return "-"
    mark = "" if agreement.passed else " !"
    return f"{agreement.error:.1e}/{agreement.allowed:.1e}{mark}"


def _duration(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3)):
        if seconds >= 0.9995 * scale:  # what rounds to 1000 at 3 digits is shown in the next unit up
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-6:.3g} us"


def _speed_cell(speed: Speed) -> str:
    if speed.backend_s is None:
        return speed.note.splitlines()[0][:60] if speed.note else "-"
    timed = "fwd only: " if speed.forward_only else ""
    if speed.backend == "reference":
        return f"{timed}{_duration(speed.backend_s)} (is plain PyTorch)"
    ratio = speed.reference_s / speed.backend_s
    relation = f"{ratio:.2g}x faster" if ratio >= 1 else f"{1 / ratio:.2g}x slower"
    return f"{timed}{_duration(speed.backend_s)} vs {_duration(speed.reference_s)} ({relation})"


def format_report(report: DoctorReport) -> str:
    """The report as text: the machine, then one table row per (op, device, backend)."""
    env = report.environment
    lines = [
        f"python {env['python']}, torch {env['torch']} (CUDA {env['torch_cuda']}), triton {env['triton']}"
        + (" (interpreter)" if env["triton_interpreter"] else ""),
        f"kepler._C: {env['kepler_C']}; compiled backends: {', '.join(report.compiled_backends) or 'none'}",
    ]
    for device in report.devices:
        extra = f", sm_{device['capability'].replace('.', '')}, {device['memory_gib']} GiB" if "capability" in device else ""
        lines.append(f"device {device['device']}: {device['name']}{extra}")
    for device, backends in report.backends.items():
        lines.append(f"backends on {device}: {', '.join(backends)}")
    lines.append("")
    lines.append("error/allowed vs the float64 reference (fwd: value, bwd: gradients); ! = disagrees")
    header = ["op", "device", "backend", "fp32 fwd", "fp32 bwd", "bf16 fwd", "bf16 bwd", "fwd+bwd time vs plain PyTorch", "result"]
    rows = [header]
    speeds = {(s.op, s.device, s.backend): s for s in report.speeds}
    forward_only = {op["name"] for op in report.ops if op["backward"] is None}
    by_row: dict[tuple[str, str, str], dict[str, Check]] = {}
    for check in report.checks:
        by_row.setdefault((check.op, check.device, check.backend), {})[check.dtype] = check
    for key, per_dtype in by_row.items():
        cells = list(key)
        for dtype in ("float32", "bfloat16"):
            check = per_dtype.get(dtype)
            backward = NO_BACKWARD if key[0] in forward_only else _agreement_cell(check.backward if check else None)
            cells += [_agreement_cell(check.forward if check else None), backward]
        failures = [c.failure for c in per_dtype.values() if c.failure]
        ok = all(c.passed for c in per_dtype.values())
        cells.append(_speed_cell(speeds[key]) if key in speeds else "-")
        cells.append("ok" if ok else "FAIL" + (f": {failures[0].splitlines()[0][:80]}" if failures else ""))
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    table = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    table.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    failed = sum(not check.passed for check in report.checks)
    verdict = "all backends agree with the reference" if report.passed else f"{failed} check(s) FAILED"
    return "\n".join(lines + table + ["", verdict])
