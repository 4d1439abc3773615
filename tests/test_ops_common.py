"""kepler/ops/_common.py: one registration for every op, one backend switch; the layers' imports point down."""

import ast
import importlib
import inspect
from pathlib import Path

import pytest
import torch

import kepler
from kepler.ops._common import registered_op

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


ROOT = Path(__file__).resolve().parents[1]


def _kepler_imports(path: Path) -> set[str]:
    """Every ``kepler`` module ``path`` imports, at its top or inside a function
    (``from kepler import _ext`` counts as ``kepler._ext``)."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module == "kepler":
            modules.update(f"kepler.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            modules.add(node.module)
    return {module for module in modules if module.split(".")[0] == "kepler"}


@pytest.mark.parametrize("folder, allowed", [
    # The spec: nothing of kepler above it.
    ("kepler/reference", ("kepler._numerics", "kepler.reference.")),
    # Leaves: the launchers' shared checks and the bottom module only, never the reference or ops.
    ("kernels", ("kepler._numerics", "kepler.kernels._common")),
])
def test_imports_point_down(folder, allowed):
    files = sorted((ROOT / folder).glob("*.py"))
    assert files
    upward = {f"{path.relative_to(ROOT)}: {module}" for path in files for module in _kepler_imports(path)
              if not module.startswith(allowed)}
    assert not upward, f"{folder} imports a layer above it"


def test_import_scan_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "module.py"
    source.write_text("import torch\nfrom kepler import _ext\ndef f():\n    from kepler.ops._common import check_input\n")
    assert _kepler_imports(source) == {"kepler._ext", "kepler.ops._common"}
