"""The layers of docs/DESIGN.md hold: every import of every module under kepler/ and kernels/ (those
inside functions too) points down, only the command line prints, and no module outgrows 500 lines."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# package -> the kepler packages it must never import, at any level.
FORBIDDEN = {
    "kepler.reference": ("kepler.ops", "kepler.kernels", "kepler.nn", "kepler.models", "kepler.train",
                         "kepler.io", "kepler.data", "kepler.study", "kepler.cli"),
    "kepler.kernels": ("kepler.reference", "kepler.ops", "kepler.nn", "kepler.models", "kepler.train", "kepler.io",
                       "kepler.data", "kepler.study", "kepler.cli"),
    "kepler.ops": ("kepler.nn", "kepler.models", "kepler.train", "kepler.io", "kepler.data", "kepler.study",
                   "kepler.cli"),
    "kepler.data": ("kepler.nn", "kepler.models", "kepler.train", "kepler.io", "kepler.study", "kepler.cli"),
    "kepler.nn": ("kepler.models", "kepler.train", "kepler.io", "kepler.study", "kepler.cli"),
    "kepler.io": ("kepler.models", "kepler.train", "kepler.study", "kepler.cli"),
    "kepler.models": ("kepler.train", "kepler.study", "kepler.cli"),
    "kepler.train": ("kepler.study", "kepler.cli"),
    "kepler.study": ("kepler.cli",),
}


def _modules():
    """``(module name, path)`` of every Python file of the package (kernels/ is ``kepler.kernels``)."""
    for root, package in ((REPO / "kepler", "kepler"), (REPO / "kernels", "kepler.kernels")):
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            yield ".".join([package, *parts]), path


def _imports(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports, wherever the import statement is (top level or in a function)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from kepler import models`
    return found


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


MODULES = list(_modules())


def test_the_walk_sees_function_level_imports(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from kepler.train import trainer\n    import kepler.cli\n")
    assert {"kepler.train", "kepler.train.trainer", "kepler.cli"} <= _imports("kepler.models.probe", source)


@pytest.mark.parametrize("package", FORBIDDEN)
def test_imports_point_down(package):
    bad = []
    for name, path in MODULES:
        if not _inside(name, package):
            continue
        for imported in _imports(name, path):
            for forbidden in FORBIDDEN[package]:
                if _inside(imported, forbidden) and not _inside(name, forbidden):
                    bad.append(f"{path.relative_to(REPO)} imports {imported}")
    assert not bad, "\n".join(sorted(set(bad)))


def test_only_the_command_line_prints():
    printers = [str(path.relative_to(REPO)) for name, path in MODULES if not _inside(name, "kepler.cli")
                and any(isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print"
                        for node in ast.walk(ast.parse(path.read_text())))]
    assert not printers


def test_no_module_is_over_500_lines():
    long = {str(path.relative_to(REPO)): n for _, path in MODULES if (n := len(path.read_text().splitlines())) > 500}
    assert not long


def test_progress_is_shown_in_one_place():
    """Bar or plain lines is decided once (kepler.progress): a tqdm bar elsewhere would redraw into
    cluster log files again."""
    users = sorted(str(path.relative_to(REPO)) for name, path in MODULES
                   if any(_inside(module, "tqdm") for module in _imports(name, path)))
    assert users == ["kepler/progress.py"]
