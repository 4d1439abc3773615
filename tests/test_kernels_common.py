"""kernels/_common.py: every Triton launch goes through ``launch`` and its CUDA device guard;
the group limit; config picking. The kernel modules and their launchers are the op inventory's.

The guard test runs every launcher of every kernel module on small inputs with the guard and the
kernels replaced by recorders: a kernel launched outside ``launch(...)`` (so without the guard),
or under a guard for another device, fails it. On a CPU-only machine this runs in the Triton
interpreter, where the guard itself has nothing to do, so the recorders are what check it.
"""

import contextlib
import importlib
import pkgutil
from typing import NamedTuple

import pytest
import torch

from kepler import _backend
from kepler.kernels import _common
from kepler.ops import OPS

from conftest import device_params

pytest.importorskip("triton")


# The launchers of the op inventory: one per kernel op.
LAUNCHERS = {f"{registered}_triton" for op in OPS for registered in op.registered_ops}


def _kernel_modules():
    """{op name: its launcher module} for every op of the inventory."""
    return {op.name: importlib.import_module(op.launcher_module) for op in OPS}


def test_the_launchers_are_the_inventorys():
    """Every kernels/ module is an op's launcher module, and holds the launchers of that op's kernel
    ops, no more and no fewer."""
    import kepler.kernels

    modules = {info.name for info in pkgutil.iter_modules(kepler.kernels.__path__) if not info.name.startswith("_")}
    assert {f"kepler.kernels.{name}" for name in modules} == {op.launcher_module for op in OPS}
    for op in OPS:
        module = importlib.import_module(op.launcher_module)
        launchers = {name for name in dir(module) if name.endswith("_triton") and callable(getattr(module, name))}
        assert launchers == {f"{registered}_triton" for registered in op.registered_ops}, op.name


def _launcher_calls(device):
    """{launcher name: call on small inputs} for every launcher; backward calls run their forward first."""
    kernels = _kernel_modules()
    nearest, kl, packing = kernels["nearest_codeword"], kernels["kepler_kl"], kernels["packing_energy"]
    lattice, entropy = kernels["closest_lattice_point"], kernels["code_entropy"]
    z, codebook = torch.randn(2, 5, 3, device=device), torch.randn(1, 4, 3, device=device)
    x, logq = torch.randn(3, 7, device=device), torch.log_softmax(torch.randn(1, 7, device=device), dim=-1)
    y = torch.randn(2, 5, 3, device=device)

    def kepler_kl_backward():
        _, stats = kl.kepler_kl_triton(x=x, prior_logq=logq, use_std=False, eps=1e-5)
        kl.kepler_kl_backward_triton(
            grad_loss=torch.ones(3, device=device), x=x, prior_logq=logq, stats=stats, use_std=False, eps=1e-5
        )

    def packing_energy_backward():
        energy, row_lse = packing.packing_energy_triton(y=y, t=0.5)
        packing.packing_energy_backward_triton(grad_energy=torch.ones(2, device=device), y=y, t=0.5, energy=energy,
                                               row_lse=row_lse)

    scale = torch.ones((), device=device)

    def code_entropy_backward():
        row_stats, code_mass = entropy.code_entropy_triton(z=z, codebook=codebook, scale=scale, inv_temperature=2.0)
        ones = torch.ones(2, device=device)
        entropy.code_entropy_backward_triton(grad_per_sample=ones, grad_batch=ones, z=z, codebook=codebook, scale=scale,
                                             inv_temperature=2.0, row_stats=row_stats, code_mass=code_mass)

    return {
        "nearest_codeword_triton": lambda: nearest.nearest_codeword_triton(z=z, codebook=codebook),
        "kepler_kl_triton": lambda: kl.kepler_kl_triton(x=x, prior_logq=logq, use_std=True, eps=0.0),
        "kepler_kl_backward_triton": kepler_kl_backward,
        "packing_energy_triton": lambda: packing.packing_energy_triton(y=y, t=0.5),
        "packing_energy_backward_triton": packing_energy_backward,
        "closest_lattice_point_triton": lambda: lattice.closest_lattice_point_triton(x=y[0], lattice="D"),
        "code_entropy_triton": lambda: entropy.code_entropy_triton(z=z, codebook=codebook, scale=scale,
                                                                   inv_temperature=2.0),
        "code_entropy_backward_triton": code_entropy_backward,
    }


class _LaunchRecorder:
    """Stands in for ``_common.device_guard`` and for every ``_*_kernel``: records, per launch, the
    device whose guard was active (None outside every guard)."""

    def __init__(self):
        self.guarded_device = None
        self.launches = []

    def device_guard(self, device):
        @contextlib.contextmanager
        def guard():
            outer, self.guarded_device = self.guarded_device, device
            try:
                yield
            finally:
                self.guarded_device = outer

        return guard()

    def kernel(self, name, kernel):
        recorder = self

        class RecordedKernel:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    recorder.launches.append((name, recorder.guarded_device))
                    return kernel[grid](*args, **kwargs)

                return run

        return RecordedKernel()


@pytest.mark.parametrize("device", device_params())
def test_every_launch_is_device_guarded(device, monkeypatch):
    reason = _backend._unavailable_reason("triton", torch.device(device).type)
    if reason:
        pytest.skip(reason)
    recorder = _LaunchRecorder()
    monkeypatch.setattr(_common, "device_guard", recorder.device_guard)
    kernel_names = set()
    for module_name, module in _kernel_modules().items():
        for name in dir(module):
            if name.startswith("_") and name.endswith("_kernel"):
                monkeypatch.setattr(module, name, recorder.kernel(f"{module_name}.{name}", getattr(module, name)))
                kernel_names.add(f"{module_name}.{name}")

    calls = _launcher_calls(device)
    assert set(calls) == LAUNCHERS, "every launcher of the op inventory needs a sample call here"
    for call in calls.values():
        call()
    assert {name for name, _ in recorder.launches} == kernel_names, "a kernel was not launched"
    unguarded = [(name, guarded) for name, guarded in recorder.launches if guarded != torch.device(device)]
    assert not unguarded, f"launched without a guard for {device}: {unguarded}"


def test_grouped_launchers_refuse_more_groups_than_the_grid_holds():
    if _backend._unavailable_reason("triton", "cpu"):
        pytest.skip("the triton launchers need TRITON_INTERPRET=1 for CPU tensors")
    kernels = _kernel_modules()
    too_many = _common.MAX_GROUPS + 1
    message = f"at most {_common.MAX_GROUPS} groups, got G={too_many}"
    z = torch.zeros(1, 1, 1).expand(too_many, 1, 1)  # no memory for the groups themselves
    with pytest.raises(ValueError, match=f"nearest_codeword_triton: {message}"):
        kernels["nearest_codeword"].nearest_codeword_triton(z=z, codebook=torch.zeros(1, 1, 1))
    with pytest.raises(ValueError, match=f"packing_energy_triton: {message}"):
        kernels["packing_energy"].packing_energy_triton(y=torch.zeros(1, 2, 1).expand(too_many, 2, 1), t=1.0)
    with pytest.raises(ValueError, match=f"code_entropy_triton: {message}"):
        kernels["code_entropy"].code_entropy_triton(z=z, codebook=torch.zeros(1, 1, 1), scale=torch.ones(()),
                                                    inv_temperature=1.0)


def test_launchers_refuse_cpu_tensors_without_the_interpreter(monkeypatch):
    kernels = _kernel_modules()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"kepler_kl_triton: the Triton kernels need CUDA tensors \(or TRITON_INTERPRET=1\)"):
        kernels["kepler_kl"].kepler_kl_triton(x=torch.randn(2, 3), prior_logq=torch.zeros(1, 3), use_std=False, eps=0.0)


def test_pick_covering_takes_the_smallest_block_that_covers_else_the_largest():
    class Config(NamedTuple):
        BLOCK: int

    configs = (Config(16), Config(32), Config(64))
    picked = [_common.pick_covering(configs, size, "BLOCK").BLOCK for size in (1, 16, 17, 32, 33, 64, 65, 10**6)]
    assert picked == [16, 16, 32, 32, 64, 64, 64, 64]
