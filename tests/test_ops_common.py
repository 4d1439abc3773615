"""kepler/ops/_common.py: one registration for every op, one backend switch, one accumulation dtype."""

import importlib
import inspect

import pytest
import torch

import kepler
from kepler.ops._common import accumulation_dtype, registered_op

# Every op with a kernel: (name, module of its Triton launcher).
OPS = [
    ("nearest_codeword", "kepler.kernels.nearest_codeword"),
    ("kepler_kl", "kepler.kernels.kepler_kl"),
    ("kepler_kl_backward", "kepler.kernels.kepler_kl"),
    ("packing_energy", "kepler.kernels.packing_energy"),
    ("packing_energy_backward", "kepler.kernels.packing_energy"),
    ("closest_lattice_point", "kepler.kernels.closest_lattice_point"),
]


def _signature(op) -> list[tuple[str, str]]:
    """(name, type) of every argument and return of a registered op's schema."""
    schema = op.default._schema
    return [(a.name, str(a.type)) for a in schema.arguments] + [("->", str(r.type)) for r in schema.returns]


@pytest.mark.parametrize("name, kernels", OPS, ids=[name for name, _ in OPS])
def test_triton_op_calls_its_launcher_by_the_schema_names(name, kernels):
    """register_op calls the launcher with the schema's argument names as keywords: they must agree."""
    triton = pytest.importorskip("triton")  # noqa: F841
    launcher = getattr(importlib.import_module(kernels), f"{name}_triton")
    schema_names = [name for name, _ in _signature(registered_op(name, "triton")) if name != "->"]
    assert list(inspect.signature(launcher).parameters) == schema_names


@pytest.mark.skipif(not kepler.HAS_CPU_EXT, reason="kepler._C is not built")
@pytest.mark.parametrize("name", [name for name, _ in OPS])
def test_triton_and_compiled_ops_share_one_schema(name):
    """The Python schema of kepler::<op>_triton matches csrc/kepler.cpp's kepler::<op>."""
    assert _signature(registered_op(name, "triton")) == _signature(registered_op(name, "cpu"))


def test_backend_switch():
    assert registered_op("packing_energy", "cpu") is torch.ops.kepler.packing_energy
    assert registered_op("packing_energy", "cuda") is torch.ops.kepler.packing_energy
    assert registered_op("packing_energy_backward", "triton") is torch.ops.kepler.packing_energy_backward_triton
    with pytest.raises(ValueError, match="no registered op runs kepler::packing_energy on backend 'reference'"):
        registered_op("packing_energy", "reference")


def test_accumulation_dtype():
    assert accumulation_dtype(torch.float64) == torch.float64
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert accumulation_dtype(dtype) == torch.float32
