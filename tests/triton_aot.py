"""Ahead-of-time compilation of Triton kernels for GPU targets, without a GPU.

The interpreter tests prove a kernel's logic; compiling it for sm_80 and sm_90 proves it builds
for the GPUs we ship for (layouts, shared memory, dot shapes) even on a CPU-only machine, and that
its PTX rounds square roots and divisions as PyTorch does (the interpreter computes both exactly
whatever the kernel asks for, so only the PTX shows an approximate ``tl.sqrt`` or ``/``), and holds
no fused multiply-add where the op asks for none (the interpreter never fuses either).

An AOT test module (``tests/test_<op>_triton_aot.py``) states only what is particular to its op:
its kernels' argument types and what its launchers can pick, as ``VARIANTS`` (built with
:func:`kernel_variants` over :func:`launchable`), and takes its two tests from :func:`aot_tests`.
The harness compiles each variant for every capability in ``GPU_CAPABILITIES``.

Without a GPU the test session runs with ``TRITON_INTERPRET=1``, which turns triton.language's own
``@jit`` helpers (``tl.sum``, ``tl.min``, ``tl.zeros``, ...) into interpreter objects the compiler
cannot lower (triton 3.8). :func:`compile_results` then compiles a test module's ``VARIANTS`` in one
child process started with ``TRITON_INTERPRET=0``; on a GPU machine it compiles in the test process.
"""

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from kepler.kernels._common import KERNEL_DTYPES, triton_interpreter_on  # noqa: E402

GPU_CAPABILITIES = (80, 90)
# The smallest shared memory per block among sm_80+ GPUs (sm_86/sm_89 consumer parts): 99 KiB.
SHARED_MEMORY_LIMIT = 99 * 1024
POINTER_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
# The fields of an <Op>Config that are launch options; the others are the kernel's constexprs.
LAUNCH_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")
# Stands for the pointer type of the op's input dtype in a kernel's argument types.
INPUT = "*input"
# Sizes swept through a launcher's pick_config to find every configuration it can return.
SIZES = range(1, 8193)
# PTX square roots and divisions that are not correctly rounded: what a plain ``tl.sqrt`` and a
# float32 ``/`` lower to (sqrt.approx, div.full: up to 2 ulp off). Kernels use tl.sqrt_rn / tl.div_rn.
APPROXIMATE_PTX = re.compile(r"\b(?:sqrt|div|rcp)\.(?:approx|full)\.[a-z0-9.]*f32")
# A fused float32 multiply-add: what a kernel launched with ``enable_fp_fusion=False`` (a field of its
# <Op>Config) does not compile to; ptxas does not fuse the ``mul.rn``/``add.rn`` it has instead.
FUSED_PTX = re.compile(r"\bfma\.[a-z0-9.]*f32\b")


class Variant(NamedTuple):
    """One kernel as a launcher can launch it (the harness adds the GPU target).

    ``signature`` maps every runtime argument to its Triton type (``"*fp32"``, ``"i32"``, ...) as
    the launcher passes it: sizes and strides are Python ints that fit int32 (Triton specializes
    larger ones to int64, which the kernels' int64 offsets already cover). ``config`` is the
    ``<Op>Config`` the launcher picked: its block sizes are constexprs, its other fields launch
    options. ``constexprs`` are the kernel's other constexpr arguments.
    """

    label: str
    kernel: object
    signature: dict
    config: NamedTuple
    constexprs: dict = {}


def launchable(pick: Callable[[int, torch.dtype], NamedTuple]) -> list[tuple[NamedTuple, torch.dtype]]:
    """Every (config, input dtype) a launcher can launch: ``pick(size, dtype)`` over SIZES and KERNEL_DTYPES."""
    return sorted({(pick(size, dtype), dtype) for size in SIZES for dtype in KERNEL_DTYPES}, key=str)


def _config_label(config: NamedTuple) -> str:
    """``N64-K128-D16-w4-s2`` for BLOCK_N=64, BLOCK_K=128, BLOCK_D=16, num_warps=4, num_stages=2;
    a boolean field as 0 or 1 after its name."""
    short = {"num_warps": "w", "num_stages": "s", "enable_fp_fusion": "fusion"}
    return "-".join(
        f"{short.get(name, name.removeprefix('BLOCK_'))}{int(value) if isinstance(value, bool) else value}"
        for name, value in config._asdict().items()
    )


def kernel_variants(kernels: dict, scalars: dict, configs: list, constexprs: dict | None = None, tag: str = ""):
    """A :class:`Variant` for each kernel and each (config, input dtype) of ``configs``.

    ``kernels`` maps each kernel to its pointer arguments' types, :data:`INPUT` standing for the
    input dtype's; ``scalars`` are the runtime scalars they all take; ``constexprs`` their other
    constexpr arguments, ``tag`` what tells those variants apart in the labels.
    """
    variants = []
    for config, dtype in configs:
        for kernel, pointers in kernels.items():
            name = as_jit_function(kernel).__name__.removeprefix("_").removesuffix("_kernel")
            label = "-".join(part for part in (name, _config_label(config), str(dtype).removeprefix("torch."), tag) if part)
            types = {arg: POINTER_TYPES[dtype] if kind == INPUT else kind for arg, kind in pointers.items()}
            variants.append(Variant(label, kernel, types | scalars, config, constexprs or {}))
    return variants


def as_jit_function(kernel) -> JITFunction:
    """The compilable JITFunction behind ``kernel``.

    With TRITON_INTERPRET=1 set at import, ``@triton.jit`` returns an InterpretedFunction; the
    compiler needs a real JITFunction of the same Python function.
    """
    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)


def variant_id(variant: Variant, capability: int) -> str:
    return f"{variant.label}-sm{capability}"


def compile_variant(variant: Variant, capability: int):
    """Compile ``variant`` for ``sm_<capability>`` with the launcher's launch options (they change
    the generated code and the shared memory it needs); returns the compiled kernel."""
    fn = as_jit_function(variant.kernel)
    config = variant.config._asdict()
    constexprs = {name: value for name, value in config.items() if name not in LAUNCH_OPTIONS} | variant.constexprs
    options = {name: value for name, value in config.items() if name in LAUNCH_OPTIONS}
    types = variant.signature | {name: "constexpr" for name in constexprs}
    assert set(types) == set(fn.arg_names), f"{variant.label}: signature {sorted(types)} vs arguments {fn.arg_names}"
    signature = {name: types[name] for name in fn.arg_names}
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
    assert compiled.asm["cubin"], f"no cubin for sm_{capability}"
    return compiled


def compile_variants(variants: list[Variant]) -> dict:
    """{variant id: {"shared": bytes, "approximate": [PTX ops], "fused": bool} or {"error": message}}
    for every variant and capability; "approximate" lists the :data:`APPROXIMATE_PTX` instructions
    found, "fused" says whether the PTX holds a :data:`FUSED_PTX` one.

    Errors are recorded, not raised, so each variant's test reports its own.
    """
    results = {}
    for variant in variants:
        for capability in GPU_CAPABILITIES:
            try:
                compiled = compile_variant(variant, capability)
                results[variant_id(variant, capability)] = {
                    "shared": int(compiled.metadata.shared),
                    "approximate": sorted(set(APPROXIMATE_PTX.findall(compiled.asm["ptx"]))),
                    "fused": bool(FUSED_PTX.search(compiled.asm["ptx"])),
                }
            except Exception as exc:
                results[variant_id(variant, capability)] = {"error": f"{type(exc).__name__}: {exc}"}
    return results


@functools.lru_cache(maxsize=None)
def compile_results(module_name: str) -> dict:
    """The :func:`compile_variants` results of test module ``module_name``'s ``VARIANTS``, once per module.

    In this process when kernels are compiled for real; under the interpreter in a child process
    with ``TRITON_INTERPRET=0`` (see the module docstring).
    """
    module = sys.modules[module_name]
    if not triton_interpreter_on():
        return compile_variants(module.VARIANTS)
    path = Path(module.__file__).resolve()
    child = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(path.parent)!r})\n"
        "import triton_aot\n"
        f"import {path.stem} as aot\n"
        "print(json.dumps(triton_aot.compile_variants(aot.VARIANTS)))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def aot_tests(variants: list[Variant], configs, unfused: bool = False):
    """The two tests of an AOT module, to assign to module-level ``test_*`` names.

    ``configs``: every configuration the launchers can pick (the kernel module's ``CONFIGS``);
    ``variants`` must compile each of them. ``unfused``: the op rounds every float32 product and
    sum on its own, as its reference does, so no variant may compile to a fused multiply-add.
    """
    labels = [variant.label for variant in variants]
    assert len(set(labels)) == len(labels), "variant labels must be unique"
    cases = [(variant, capability) for variant in variants for capability in GPU_CAPABILITIES]

    def test_variants_cover_every_config():
        assert {variant.config for variant in variants} == set(configs)

    @pytest.mark.parametrize("variant, capability", cases, ids=[variant_id(*case) for case in cases])
    def test_kernel_compiles_for_gpu(variant, capability, request):
        outcome = compile_results(request.module.__name__)[variant_id(variant, capability)]
        if "error" in outcome:
            pytest.fail(outcome["error"])
        assert outcome["shared"] <= SHARED_MEMORY_LIMIT, f"needs {outcome['shared']} bytes of shared memory"
        assert not outcome["approximate"], f"approximate square roots or divisions: {outcome['approximate']}"
        if unfused:
            assert not outcome["fused"], "fused multiply-adds (launch it with enable_fp_fusion=False)"

    return test_variants_cover_every_config, test_kernel_compiles_for_gpu
