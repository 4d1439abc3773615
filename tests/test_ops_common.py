"""The op inventory (kepler/ops/__init__.py) and kepler/ops/_common.py: one registration for every op, one
backend switch; the layers' imports point down."""

import ast
import contextlib
import importlib
import inspect
import io
import re
from pathlib import Path

import pytest
import torch

import kepler
from kepler.ops import OPS, OpRecord
from kepler.ops._common import register_op, registered_op

# Every kernel op: (name, module of its Triton launcher).
KERNEL_OPS = [(registered, op.launcher_module) for op in OPS for registered in op.registered_ops]


ROOT = Path(__file__).resolve().parents[1]


def _kepler_ops(suffix: str) -> set[str]:
    """The names of the registered ``kepler::`` ops, without the namespace: those that end in
    ``suffix`` (``"_triton"``), or with ``suffix=""`` those that do not end in ``_triton``."""
    names = {name.removeprefix("kepler::") for name in torch._C._dispatch_get_all_op_names() if name.startswith("kepler::")}
    return {name for name in names if name.endswith("_triton") == bool(suffix)}


def test_the_inventory_names_every_registered_op():
    """register_op refuses a Triton op the inventory lacks; here, the other way round (a record's op
    left unregistered), and that csrc/kepler.cpp's ops are the inventory's."""
    import kepler.losses  # noqa: F401  (registers the losses' ops)

    registered = {name for op in OPS for name in op.registered_ops}
    assert _kepler_ops("_triton") == {f"{name}_triton" for name in registered}
    if kepler.HAS_CPU_EXT:
        assert _kepler_ops("") == registered


def test_register_op_refuses_an_op_the_inventory_lacks():
    with pytest.raises(ValueError, match="kepler::packing_energy_grad is no kernel op of the op inventory kepler.ops.OPS"):
        register_op("packing_energy_grad", "(Tensor y) -> Tensor", lambda y: y)


def test_inventory_records():
    assert len({op.name for op in OPS}) == len(OPS)
    by_name = {op.name: op for op in OPS}
    assert by_name["packing_energy"].registered_ops == ("packing_energy", "packing_energy_backward")
    assert by_name["nearest_codeword"].registered_ops == ("nearest_codeword",)
    assert by_name["closest_lattice_point"].registered_ops == ("closest_lattice_point",)
    assert by_name["kepler_kl"].launcher_module == "kepler.kernels.kepler_kl"
    for op in OPS:
        assert op.tests and all((ROOT / path).is_file() for path in op.tests), op
    with pytest.raises(ValueError, match=r"op fused: backward must be one of \('kernel', 'pytorch', None\), got 'kernels'"):
        OpRecord("fused", backward="kernels", tests=())


def test_gpu_check_runs_the_inventorys_test_files():
    """The KERNEL_TESTS line of benchmarks/gpu_check.sh prints the inventory's test files, one a line."""
    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    [code] = re.findall(r'^mapfile -t KERNEL_TESTS < <\("\$PY" -c "(.*)"\)$', script, flags=re.M)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code, {})
    assert out.getvalue().splitlines() == [path for op in OPS for path in op.tests]


def _signature(op) -> list[tuple[str, str]]:
    """(name, type) of every argument and return of a registered op's schema."""
    schema = op.default._schema
    return [(a.name, str(a.type)) for a in schema.arguments] + [("->", str(r.type)) for r in schema.returns]


@pytest.mark.parametrize("name, kernels", KERNEL_OPS, ids=[name for name, _ in KERNEL_OPS])
def test_triton_op_calls_its_launcher_by_the_schema_names(name, kernels):
    """register_op calls the launcher with the schema's argument names as keywords: they must agree."""
    triton = pytest.importorskip("triton")  # noqa: F841
    launcher = getattr(importlib.import_module(kernels), f"{name}_triton")
    schema_names = [name for name, _ in _signature(registered_op(name, "triton")) if name != "->"]
    assert list(inspect.signature(launcher).parameters) == schema_names


@pytest.mark.skipif(not kepler.HAS_CPU_EXT, reason="kepler._C is not built")
@pytest.mark.parametrize("name", [name for name, _ in KERNEL_OPS])
def test_triton_and_compiled_ops_share_one_schema(name):
    """The Python schema of kepler::<op>_triton matches csrc/kepler.cpp's kepler::<op>."""
    assert _signature(registered_op(name, "triton")) == _signature(registered_op(name, "cpu"))


def test_backend_switch():
    assert registered_op("packing_energy", "cpu") is torch.ops.kepler.packing_energy
    assert registered_op("packing_energy", "cuda") is torch.ops.kepler.packing_energy
    assert registered_op("packing_energy_backward", "triton") is torch.ops.kepler.packing_energy_backward_triton
    with pytest.raises(ValueError, match="no registered op runs kepler::packing_energy on backend 'reference'"):
        registered_op("packing_energy", "reference")


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
