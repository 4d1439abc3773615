"""Ahead-of-time compilation of Triton kernels for GPU targets, without a GPU.

The interpreter tests prove a kernel's logic; compiling it for sm_80 and sm_90 proves it builds
for the GPUs we ship for (layouts, shared memory, dot shapes) even on a CPU-only machine.

Without a GPU the test session runs with ``TRITON_INTERPRET=1``, which turns triton.language's own
``@jit`` helpers (``tl.sum``, ``tl.min``, ``tl.zeros``, ...) into interpreter objects the compiler
cannot lower (triton 3.8). :func:`compile_results` then runs a test module's
``compile_every_variant()`` in one child process started with ``TRITON_INTERPRET=0``; on a GPU
machine it runs in the test process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterable

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from kepler._backend import triton_interpreter_on  # noqa: E402

GPU_CAPABILITIES = (80, 90)
# The smallest shared memory per block among sm_80+ GPUs (sm_86/sm_89 consumer parts): 99 KiB.
SHARED_MEMORY_LIMIT = 99 * 1024


def as_jit_function(kernel) -> JITFunction:
    """The compilable JITFunction behind ``kernel``.

    With TRITON_INTERPRET=1 set at import, ``@triton.jit`` returns an InterpretedFunction; the
    compiler needs a real JITFunction of the same Python function.
    """
    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)


def aot_compile(kernel, signature: dict, constexprs: dict, capability: int, options: dict | None = None):
    """Compile ``kernel`` for ``sm_<capability>``; returns the compiled kernel (``.asm`` has ptx/cubin).

    ``signature`` maps every argument name to its Triton type (``"*fp32"``, ``"i32"``, ...) and
    constexpr arguments to ``"constexpr"``; ``constexprs`` gives their values. ``options`` are the
    launcher's launch options (``num_warps``, ``num_stages``): they change the generated code and
    the shared memory it needs, so pass what the launcher passes.
    """
    source = triton.compiler.ASTSource(fn=as_jit_function(kernel), signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options or {})
    assert compiled.asm["cubin"], f"no cubin for sm_{capability}"
    return compiled


def compile_all(variants: Iterable, variant_id: Callable, compile_one: Callable) -> dict:
    """{variant id: {"shared": bytes} or {"error": message}} for every variant.

    ``compile_one(variant)`` compiles one variant and returns the shared memory it needs.
    Errors are recorded, not raised, so each variant's test reports its own.
    """
    results = {}
    for variant in variants:
        try:
            results[variant_id(variant)] = {"shared": int(compile_one(variant))}
        except Exception as exc:
            results[variant_id(variant)] = {"error": f"{type(exc).__name__}: {exc}"}
    return results


def compile_results(test_module) -> dict:
    """The ``compile_every_variant()`` results of ``test_module`` (pass ``sys.modules[__name__]``).

    In this process when kernels are compiled for real; under the interpreter in a child process
    with ``TRITON_INTERPRET=0`` (see the module docstring).
    """
    if not triton_interpreter_on():
        return test_module.compile_every_variant()
    path = Path(test_module.__file__).resolve()
    child = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(path.parent)!r})\n"
        f"import {path.stem} as aot\n"
        "print(json.dumps(aot.compile_every_variant()))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_compiled(results: dict, variant_id: str) -> None:
    """Fail with the compiler's message, or when the variant needs more shared memory than sm_80+ has."""
    outcome = results[variant_id]
    if "error" in outcome:
        pytest.fail(outcome["error"])
    assert outcome["shared"] <= SHARED_MEMORY_LIMIT, f"needs {outcome['shared']} bytes of shared memory"
