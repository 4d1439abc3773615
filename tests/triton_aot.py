"""Ahead-of-time compilation of Triton kernels for GPU targets, without a GPU.

The interpreter tests prove a kernel's logic; compiling it for sm_80 and sm_90 proves it builds
for the GPUs we ship for (layouts, shared memory, dot shapes) even on a CPU-only machine.
"""

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

GPU_CAPABILITIES = (80, 90)


def as_jit_function(kernel) -> JITFunction:
    """The compilable JITFunction behind ``kernel``.

    With TRITON_INTERPRET=1 set at import, ``@triton.jit`` returns an InterpretedFunction; the
    compiler needs a real JITFunction of the same Python function.
    """
    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)


def aot_compile(kernel, signature: dict, constexprs: dict, capability: int):
    """Compile ``kernel`` for ``sm_<capability>``; returns the compiled kernel (``.asm`` has ptx/cubin).

    ``signature`` maps every argument name to its Triton type (``"*fp32"``, ``"i32"``, ...) and
    constexpr arguments to ``"constexpr"``; ``constexprs`` gives their values.
    """
    source = triton.compiler.ASTSource(fn=as_jit_function(kernel), signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32))
    assert compiled.asm["cubin"], f"no cubin for sm_{capability}"
    return compiled
