"""Backend choice: explicit argument > KEPLER_BACKEND > auto; clear errors for what cannot run."""

import pytest
import torch

import kepler
from kepler import _backend

CPU = torch.device("cpu")


def test_auto_prefers_the_cpu_extension_on_cpu(monkeypatch):
    monkeypatch.delenv("KEPLER_BACKEND", raising=False)
    expected = "cpu" if kepler.HAS_CPU_EXT else "reference"
    assert _backend.resolve_backend(None, CPU) == expected
    assert _backend.resolve_backend("auto", CPU) == expected


def test_environment_variable_overrides_auto(monkeypatch):
    monkeypatch.setenv("KEPLER_BACKEND", "reference")
    assert _backend.resolve_backend(None, CPU) == "reference"


def test_argument_overrides_environment(monkeypatch):
    monkeypatch.setenv("KEPLER_BACKEND", "cuda")
    assert _backend.resolve_backend("reference", CPU) == "reference"


def test_unknown_backend_names_the_source(monkeypatch):
    monkeypatch.delenv("KEPLER_BACKEND", raising=False)
    with pytest.raises(ValueError, match="unknown backend argument 'fortran'"):
        _backend.resolve_backend("fortran", CPU)
    monkeypatch.setenv("KEPLER_BACKEND", "fortran")
    with pytest.raises(ValueError, match="unknown KEPLER_BACKEND 'fortran'"):
        _backend.resolve_backend(None, CPU)


def test_explicit_backend_that_cannot_run_raises():
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available: the 'cuda' backend runs on CUDA tensors"):
        _backend.resolve_backend("cuda", CPU)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 for CPU tensors"):
        _backend.resolve_backend("triton", CPU)


def test_available_backends_lists_only_runnable_ones():
    names = kepler.available_backends("cpu")
    assert names[0] == "reference"
    assert "cuda" not in names
    assert ("cpu" in names) == kepler.HAS_CPU_EXT


@pytest.mark.parametrize(
    "runnable, expected",
    [
        (("reference", "cuda", "triton"), "triton"),  # triton first until gpu_check.sh has vetted cuda
        (("reference", "cuda"), "cuda"),
        (("reference",), "reference"),
    ],
)
def test_auto_order_on_a_gpu(monkeypatch, runnable, expected):
    """On CUDA tensors auto picks triton > cuda > reference (no GPU needed: availability is faked)."""
    monkeypatch.delenv("KEPLER_BACKEND", raising=False)

    def reason(backend, device_type):
        return None if backend in runnable else f"{backend} faked unavailable"

    monkeypatch.setattr(_backend, "_unavailable_reason", reason)
    assert _backend.resolve_backend("auto", torch.device("cuda")) == expected


def test_an_op_a_stale_extension_does_not_define_is_an_unavailable_kernel():
    # A kepler._C built before an op was added loads fine; the op's compiled backends are then missing.
    assert not _backend.compiled_kernel_registered("an_op_kepler_never_had", "cpu")
    assert not _backend.compiled_kernel_registered("an_op_kepler_never_had", "cuda")
