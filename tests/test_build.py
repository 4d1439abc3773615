"""The build: toolkit discovery in setup.py, the extension's presence, and import without it."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kepler

ROOT = Path(__file__).resolve().parents[1]


def _load_setup_module():
    spec = importlib.util.spec_from_file_location("kepler_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # guarded: defines functions, runs no build
    return module


def _fake_toolkit(root: Path, with_cudart: bool = True) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (root / "lib64").mkdir()
    if with_cudart:
        (root / "lib64" / "libcudart.so").write_text("")
    return root


def test_wrapper_script_target_is_found(tmp_path, monkeypatch):
    setup_mod = _load_setup_module()
    toolkit = _fake_toolkit(tmp_path / "cuda-13.0")
    wrapper_dir = tmp_path / "wrapper" / "bin"
    wrapper_dir.mkdir(parents=True)
    wrapper = wrapper_dir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(wrapper_dir))
    assert setup_mod._nvcc_wrapper_targets(str(wrapper)) == [str(toolkit)]
    # The wrapper's own directory is no toolkit (no lib64/libcudart.so); its target is.
    found = setup_mod.find_cuda_toolkit()
    assert found is not None and found != str(wrapper_dir.parent)
    assert setup_mod._is_toolkit(found)


def test_toolkit_without_cudart_is_rejected(tmp_path, monkeypatch):
    setup_mod = _load_setup_module()
    broken = _fake_toolkit(tmp_path / "cuda-broken", with_cudart=False)
    assert not setup_mod._is_toolkit(str(broken))
    assert setup_mod._is_toolkit(str(_fake_toolkit(tmp_path / "cuda-ok")))


def test_extension_is_built_with_cuda_when_a_toolkit_exists():
    """CI's `make test` builds kepler._C; with a toolkit and a CUDA torch it must include CUDA."""
    setup_mod = _load_setup_module()
    assert kepler.HAS_CPU_EXT, "kepler._C was not built by `make build`"
    expect_cuda = (
        torch.version.cuda is not None
        and setup_mod.find_cuda_toolkit() is not None
        and os.environ.get("KEPLER_SKIP_CUDA_BUILD", "") not in ("1", "true")
    )
    if not expect_cuda:
        pytest.skip("no CUDA toolkit or CPU-only torch here: a CPU-only build is expected")
    assert kepler.HAS_CUDA_EXT, "a CUDA toolkit was found but kepler._C has no CUDA kernels"


def test_import_without_extension_falls_back_to_reference():
    code = (
        "import sys; sys.modules['kepler._C'] = None\n"
        "import kepler\n"
        "assert not kepler.HAS_CPU_EXT and not kepler.HAS_CUDA_EXT\n"
        "print(','.join(kepler.available_backends('cpu')))\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "reference"


def test_import_without_triton_registers_every_op():
    """Triton ops are registered whether or not triton imports; their launchers load on first call."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, kepler, kepler.losses\n"
        "assert 'triton' not in kepler.available_backends('cpu')\n"
        "from kepler.ops import OPS\n"
        "for name in (registered for op in OPS for registered in op.registered_ops):\n"
        "    getattr(torch.ops.kepler, name + '_triton')\n"
        "print(sorted(name for name in sys.modules if name.startswith('kepler.kernels')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['kepler.kernels', 'kepler.kernels._common']"


def _installed_layout(build_lib: Path) -> None:
    """What a wheel installs, minus the compiled extension: ``setup.py build_py`` copies the Python
    packages and their package data (the built-in configs) as ``pip wheel`` does."""
    env = dict(os.environ, KEPLER_SKIP_EXT="1")
    out = subprocess.run([sys.executable, "setup.py", "--quiet", "build_py", "--build-lib", str(build_lib)],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr


def test_builtin_configs_resolve_in_the_installed_package(tmp_path):
    """``kepler train sample`` works without the repository: the configs are package data."""
    build_lib = tmp_path / "site"
    _installed_layout(build_lib)
    code = (
        "import kepler, sys\n"
        "from kepler.io.config_files import resolve_config\n"
        "from kepler.cli import main\n"
        "print(kepler.__file__)\n"
        "print(resolve_config('sample'))\n"
        "sys.exit(main(['train', '--list-configs']))\n"
    )
    elsewhere = tmp_path / "elsewhere"  # no configs/ folder, no repository
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(build_lib), TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=elsewhere)
    assert out.returncode == 0, out.stderr
    package, sample, *listing = out.stdout.splitlines()
    assert package == str(build_lib / "kepler" / "__init__.py")
    assert sample == str(build_lib / "kepler" / "configs" / "sample.yaml")
    shipped = sorted(path.stem for path in (ROOT / "kepler" / "configs").glob("*.yaml"))
    assert "sample" in shipped and [line.split()[0] for line in listing] == shipped


@pytest.mark.skipif(os.environ.get("KEPLER_TEST_WHEEL") != "1",
                    reason="builds the wheel (minutes of C++ compile): set KEPLER_TEST_WHEEL=1")
def test_the_wheel_holds_the_configs_and_kernels(tmp_path):
    import zipfile

    env = dict(os.environ, KEPLER_SKIP_CUDA_BUILD="1")
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", str(ROOT),
                          "-w", str(tmp_path)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("kepler-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"kepler/configs/{path.name}" for path in (ROOT / "kepler" / "configs").glob("*.yaml")}
    assert configs and configs <= names
    assert "kepler/kernels/nearest_codeword.py" in names and any(n.startswith("kepler/_C") for n in names)
