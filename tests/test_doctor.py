"""``kepler doctor``: every op x backend is listed and checked; a disagreeing backend fails it.

The full run happens once (tiny inputs, one timed repeat); the failing runs check one backend.
"""

import contextlib
import importlib
import io
import json
import os
import re
import sys

import pytest
import torch

import kepler
from kepler.cli import main
from kepler.doctor import _CASES, CHECK_DTYPES, NO_BACKWARD, doctor
from kepler.ops import OPS
from kepler.ops import closest_lattice_point as closest_lattice_point_module
from kepler.ops import kepler_kl as kepler_kl_module
from kepler.ops import packing_energy as packing_energy_module
from kepler.ops.nearest_codeword import NearestCodewordFunction
from kepler.reference.closest_lattice_point import closest_lattice_point_ref

QUICK = ["--quick", "--repeats", "1"]
# The module: the function doctor shadows it as the attribute kepler.doctor.
DOCTOR_MODULE = importlib.import_module("kepler.doctor")
OP_NAMES = [op.name for op in OPS]
FORWARD_ONLY = {op.name for op in OPS if op.backward is None}
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


def test_json_lists_the_inventorys_ops(full_run):
    _, _, report = full_run
    assert [op["name"] for op in report["ops"]] == OP_NAMES
    assert {op["name"] for op in report["ops"] if op["backward"] is None} == FORWARD_ONLY == {"closest_lattice_point"}
    assert {check["op"] for check in report["checks"]} == set(OP_NAMES)
    for check in report["checks"]:
        assert (check["backward"] is None) == (check["op"] in FORWARD_ONLY), check
    for speed in report["speeds"]:
        assert speed["forward_only"] == (speed["op"] in FORWARD_ONLY), speed


def test_forward_only_rows_say_so(full_run):
    _, text, _ = full_run
    for row in _table_rows(text):
        forward_only = row[0] in FORWARD_ONLY
        assert (row[4] == row[6] == NO_BACKWARD) == forward_only, row
        assert row[3].startswith("0.0e+00/") == forward_only, row  # a lattice point is exact or wrong
        assert row[7].startswith("fwd only: ") == (forward_only and row[7] != "interpreted: no speed figure"), row


def test_the_doctor_drives_every_op_of_the_inventory():
    assert set(_CASES) == set(OP_NAMES), "kepler/doctor.py needs inputs (_CASES) for every op of kepler.ops.OPS"
    listed = re.search(r":data:`kepler.ops.OPS`: (.*?)\)", DOCTOR_MODULE.__doc__, flags=re.S).group(1)
    assert re.findall(r"``(\w+)``", listed) == OP_NAMES, "the docstring lists the inventory's ops"


@pytest.mark.parametrize("op", OPS, ids=OP_NAMES)
def test_the_record_says_whether_gradients_flow(op):
    """``backward`` None is an op whose result does not require grad, any other value one whose
    result does: the doctor checks gradients by it."""
    inputs, constants = _CASES[op.name].make_inputs(torch.Generator().manual_seed(0), "check")
    output = _CASES[op.name].forward("reference", *[t.requires_grad_(True) for t in inputs], **constants)
    assert output.requires_grad == (op.backward is not None)


@pytest.mark.parametrize("dtype", CHECK_DTYPES, ids=str)
def test_the_closest_point_rows_are_far_from_ties_and_rounding(dtype):
    """The doctor's E8 rows (at each checked dtype) lie inside the exact range, and in each the
    two cosets' squared distances differ by far more than float32 rounding, so that no backend
    may break a tie between them another way (module docstring of kepler.doctor): the distances
    are sums of eight squares below 2 (D8's covering radius is sqrt(2)), rounded by ~1e-6."""
    (x,), _ = _CASES["closest_lattice_point"].make_inputs(torch.Generator().manual_seed(0), "check")
    rows = x.to(dtype).double().reshape(-1, 8)
    assert rows.abs().max() < 16
    integral = closest_lattice_point_ref(rows, "D")
    half_integral = closest_lattice_point_ref(rows - 0.5, "D") + 0.5
    gap = ((rows - integral).square().sum(-1) - (rows - half_integral).square().sum(-1)).abs()
    assert gap.min() > 1e-4


@needs_cpu_ext
def test_a_wrong_closest_point_fails_the_report(monkeypatch):
    real_registered_op = closest_lattice_point_module.registered_op

    def off_by_one(name, backend):
        def run(rows, family):
            points = real_registered_op(name, backend)(rows, family).clone()
            points[-1, 0] += 1  # one coordinate of one row: a point of Z^8 but not of E8
            return points

        return run

    monkeypatch.setattr(closest_lattice_point_module, "registered_op", off_by_one)
    report = doctor(["cpu"], backends=["cpu"], repeats=1, quick=True)
    failed = [c for c in report.checks if not c.passed]
    assert {(c.op, c.dtype) for c in failed} == {("closest_lattice_point", "float32"), ("closest_lattice_point", "bfloat16")}
    assert all(c.forward.error == 1.0 and c.backward is None for c in failed)


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


@pytest.mark.parametrize("arguments, message", [
    (["--device", "nonsense"], "--device nonsense: device 'nonsense' is not a device: expected auto, cpu, cuda or "
                               "cuda:<index>"),
    (["--device", "cuda:7"], "--device cuda:7: device 'cuda:7' requested but "),
])
def test_bad_devices_are_one_line_before_the_run(arguments, message, capsys, monkeypatch):
    """A device that is no device or is not here was a traceback (or a long run, then a failure)."""
    monkeypatch.setattr(importlib.import_module("kepler.doctor"), "doctor", lambda *a, **k: pytest.fail("ran before checking --device"))
    assert main(["doctor", *arguments]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kepler doctor: error: {message}") and err.count("\n") == 1


def test_an_unwritable_json_path_fails_before_the_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(importlib.import_module("kepler.doctor"), "doctor", lambda *a, **k: pytest.fail("ran before checking --json"))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["doctor", "--json", str(blocker / "report.json")]) == 2
    assert capsys.readouterr().err == (f"kepler doctor: error: --json {blocker / 'report.json'}: {blocker} is a file, "
                                       "not a folder\n")
    assert main(["doctor", "--json", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"kepler doctor: error: --json {tmp_path} is a folder, not a file\n"
