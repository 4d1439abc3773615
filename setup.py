"""Build kepler: the Python package, the Triton kernels (as ``kepler.kernels``) and ``kepler._C``.

``kepler._C`` always contains the C++ CPU kernels. The CUDA kernels are added when torch was built
with CUDA and a working CUDA toolkit is found (a directory holding ``bin/nvcc`` and
``lib64/libcudart.so``). Environment knobs:

* ``KEPLER_SKIP_CUDA_BUILD=1``: never build the CUDA kernels.
* ``KEPLER_FORCE_CUDA_BUILD=1``: fail instead of falling back to a CPU-only build.
* ``KEPLER_CUDA_ARCH`` / ``TORCH_CUDA_ARCH_LIST``: target architectures (default ``8.0;9.0+PTX``).
* ``KEPLER_SKIP_EXT=1``: build no extension at all (reference + Triton only).
* ``MAX_JOBS``: parallel compile jobs (ninja).
"""

import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCH = "8.0;9.0+PTX"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _is_toolkit(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "lib64", "libcudart.so")
    )


def _nvcc_wrapper_targets(nvcc: str) -> list[str]:
    """Toolkit roots named inside an ``nvcc`` wrapper script (``exec /path/cuda-X/bin/nvcc "$@"``).

    Some machines put a shell script called ``nvcc`` on PATH; the toolkit is where it execs to,
    not the script's own directory (which is what torch would guess).
    """
    try:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
    except OSError:
        return []
    if not head.startswith(b"#!"):
        return []
    roots = []
    for match in re.finditer(rb"(/[^\s\"']+)/bin/nvcc\b", head):
        roots.append(match.group(1).decode())
    return roots


def find_cuda_toolkit() -> str | None:
    """Return the root of a working CUDA toolkit, or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates += _nvcc_wrapper_targets(real)
        candidates.append(os.path.dirname(os.path.dirname(real)))
    candidates.append("/usr/local/cuda")
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for path in candidates:
        if _is_toolkit(path):
            return os.path.realpath(path)
    return None


def _log(msg: str) -> None:
    print(f"[kepler setup] {msg}", file=sys.stderr)


def extension_modules():
    if _env_flag("KEPLER_SKIP_EXT"):
        _log("KEPLER_SKIP_EXT=1: building no C++/CUDA extension")
        return [], {}
    import torch

    want_cuda = not _env_flag("KEPLER_SKIP_CUDA_BUILD")
    force_cuda = _env_flag("KEPLER_FORCE_CUDA_BUILD")
    toolkit = find_cuda_toolkit() if want_cuda else None
    with_cuda = want_cuda and torch.version.cuda is not None and toolkit is not None
    if force_cuda and not with_cuda:
        raise RuntimeError(
            "KEPLER_FORCE_CUDA_BUILD=1 but no CUDA build is possible: "
            f"torch.version.cuda={torch.version.cuda!r}, toolkit={toolkit!r} "
            "(need bin/nvcc and lib64/libcudart.so; set CUDA_HOME)"
        )
    if with_cuda:
        # cpp_extension reads CUDA_HOME when it is imported: set it first.
        os.environ["CUDA_HOME"] = toolkit
        arch = os.environ.get("KEPLER_CUDA_ARCH") or os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCH
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch
        _log(f"building CPU + CUDA kernels with toolkit {toolkit} for arch {arch}")
    else:
        reason = "KEPLER_SKIP_CUDA_BUILD=1" if not want_cuda else (
            "torch has no CUDA" if torch.version.cuda is None else "no CUDA toolkit found"
        )
        _log(f"building CPU kernels only ({reason})")

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    # No -std flag: cpp_extension adds the standard that the installed torch needs (C++20 for 2.14).
    cxx_flags = ["-O3", "-fopenmp"]
    if with_cuda:
        sources += sorted(glob.glob("csrc/**/*.cu", recursive=True))
        ext = CUDAExtension(
            "kepler._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("KEPLER_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "-lineinfo"],
            },
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "kepler._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def main() -> None:
    ext_modules, cmdclass = extension_modules()
    setup(
        name="kepler",
        version="0.1.0",
        description="Triton- and CUDA-accelerated vector quantization with Kepler codebooks",
        packages=find_packages(include=["kepler", "kepler.*"]) + ["kepler.kernels"],
        package_dir={"kepler.kernels": "kernels"},
        # The built-in training and study configs (kepler train sample): resolved inside the package.
        package_data={"kepler": ["configs/*.yaml"]},
        python_requires=">=3.10",
        install_requires=["torch>=2.4", "numpy"],
        extras_require={"triton": ["triton>=3.0"]},
        entry_points={"console_scripts": ["kepler=kepler.cli:main"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        zip_safe=False,
    )


# Guarded so tests can import the toolkit discovery without running a build.
if __name__ == "__main__":
    main()
