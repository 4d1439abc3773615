"""``kepler doctor``: every op x backend is listed and checked; a disagreeing backend fails it.

The full run happens once (tiny inputs, one timed repeat); the failing runs check one backend.
"""

import contextlib
import io
import json
import os
import sys

import pytest
import torch

import kepler
from kepler.cli import main
from kepler.doctor import CHECK_DTYPES, OP_NAMES, doctor
from kepler.ops import kepler_kl as kepler_kl_module
from kepler.ops import packing_energy as packing_energy_module
from kepler.ops.nearest_codeword import NearestCodewordFunction

QUICK = ["--quick", "--repeats", "1"]
needs_cpu_ext = pytest.mark.skipif(not kepler.HAS_CPU_EXT, reason="kepler._C is not built")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """``kepler doctor`` on every device and backend here: (exit status, printed text, JSON report)."""
    json_path = tmp_path_factory.mktemp("doctor") / "doctor.json"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(["doctor", *QUICK, "--json", str(json_path)])
    return status, out.getvalue(), json.loads(json_path.read_text())


def _table_rows(text: str) -> list[list[str]]:
    """The table's data rows as cells (header and rule left out)."""
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
    return rows[1:]


def test_table_lists_every_op_and_backend_and_passes(full_run):
    status, text, report = full_run
    assert status == 0, text
    assert report["passed"] is True
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    expected = {(op, device, backend) for op in OP_NAMES for device in devices
                for backend in kepler.available_backends(device)}
    rows = _table_rows(text)
    assert {tuple(row[:3]) for row in rows} == expected
    assert all(row[-1] == "ok" for row in rows), text
    checked = {(c["op"], c["device"], c["backend"], c["dtype"]) for c in report["checks"]}
    dtypes = {str(dtype).removeprefix("torch.") for dtype in CHECK_DTYPES}
    assert checked == {key + (dtype,) for key in expected for dtype in dtypes}
    assert f"torch {torch.__version__}" in text and "all backends agree with the reference" in text


def _wrong_energy(monkeypatch, shift: float) -> None:
    """Make the kernel backends' packing_energy return ``shift`` too much (gradients unchanged);
    the tests check only the ``cpu`` backend."""
    real_apply = packing_energy_module.PackingEnergyFunction.apply
    monkeypatch.setattr(packing_energy_module.PackingEnergyFunction, "apply", lambda *args: real_apply(*args) + shift)


@needs_cpu_ext
def test_a_wrong_forward_fails_the_report(monkeypatch):
    _wrong_energy(monkeypatch, 1e-4)  # ~100 float32 units of rounding at |E| ~ 1
    report = doctor(["cpu"], backends=["cpu"], repeats=1, quick=True)
    assert not report.passed
    failed = {(c.op, c.backend, c.dtype) for c in report.checks if not c.passed}
    assert failed == {("packing_energy", "cpu", "float32"), ("packing_energy", "cpu", "bfloat16")}
    assert all(not c.forward.passed and c.backward.passed for c in report.checks if not c.passed)


@needs_cpu_ext
def test_a_wrong_backward_fails_the_report(monkeypatch):
    real_backward = NearestCodewordFunction.backward

    def scaled_backward(ctx, grad_indices, grad_sq_dist):
        return real_backward(ctx, grad_indices, grad_sq_dist * 1.05)

    monkeypatch.setattr(NearestCodewordFunction, "backward", staticmethod(scaled_backward))
    report = doctor(["cpu"], backends=["cpu"], repeats=1, quick=True)
    failed = [c for c in report.checks if not c.passed]
    assert {(c.op, c.dtype) for c in failed} == {("nearest_codeword", "float32"), ("nearest_codeword", "bfloat16")}
    assert all(c.forward.passed and not c.backward.passed for c in failed)


@needs_cpu_ext
def test_a_raising_backend_is_a_failed_row(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(kepler_kl_module.KeplerKLFunction, "apply", broken)
    report = doctor(["cpu"], backends=["cpu"], repeats=1, quick=True)
    failed = [c for c in report.checks if not c.passed]
    assert {c.op for c in failed} == {"kepler_kl"}
    assert all(c.failure == "RuntimeError: kernel exploded" for c in failed)


@needs_cpu_ext
def test_cli_exits_non_zero_when_a_backend_disagrees(monkeypatch, capsys):
    _wrong_energy(monkeypatch, 1e-4)
    assert main(["doctor", *QUICK, "--backend", "cpu"]) == 1
    out = capsys.readouterr().out
    rows = {row[0]: row for row in _table_rows(out)}
    assert rows["packing_energy"][-1] == "FAIL" and rows["packing_energy"][3].endswith("!")
    assert rows["nearest_codeword"][-1] == "ok"
    assert "2 check(s) FAILED" in out


def test_unknown_and_unavailable_backends_are_refused(capsys):
    with pytest.raises(ValueError, match=r"unknown backend 'tpu'; expected one of"):
        doctor(["cpu"], backends=["tpu"])
    assert main(["doctor", "--device", "cpu", "--backend", "cuda"]) == 2
    assert "backend 'cuda' runs on none of the devices checked (cpu: the 'cuda' backend runs on CUDA tensors" in (
        capsys.readouterr().err)


class _Restarted(Exception):
    pass


def test_triton_interpret_flag_restarts_with_the_interpreter_on(monkeypatch):
    """Without TRITON_INTERPRET the command re-runs itself, same arguments, with it set (that the new
    process then lists the triton backend on the CPU was checked by hand: a subprocess costs ~30 s)."""
    calls = []

    def fake_execve(path, argv, env):
        calls.append((path, argv, env))
        raise _Restarted

    monkeypatch.setattr(os, "execve", fake_execve)
    monkeypatch.delenv("TRITON_INTERPRET")
    argv = ["doctor", "--triton-interpret", "--backend", "reference", *QUICK]
    with pytest.raises(_Restarted):
        main(argv)
    [(path, exec_argv, env)] = calls
    assert path == sys.executable and exec_argv == [sys.executable, "-m", "kepler", *argv]
    assert env["TRITON_INTERPRET"] == "1"
