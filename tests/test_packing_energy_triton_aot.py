"""Every configuration the packing-energy launchers can pick compiles for sm_80 and sm_90.

Both kernels (forward and backward), every ``CONFIGS`` entry and every input dtype. Without a GPU
the test session runs with ``TRITON_INTERPRET=1``, which turns triton.language's own ``@jit``
helpers into interpreter objects the compiler cannot lower (triton 3.8); the compiles then run in
one child process started with ``TRITON_INTERPRET=0``. On a GPU machine they run in-process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kepler._backend import triton_interpreter_on
from triton_aot import GPU_CAPABILITIES, as_jit_function

kernels = pytest.importorskip("kepler.kernels.packing_energy")
triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402

POINTER_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
# The smallest shared memory per block among sm_80+ GPUs (sm_86/sm_89 consumer parts): 99 KiB.
SHARED_MEMORY_LIMIT = 99 * 1024
KERNEL_NAMES = ("fwd", "bwd")


def _launchable_variants():
    """(kernel name, config, dtype) for every d and dtype a caller can pass."""
    variants = set()
    for dim in range(1, 1025):
        for dtype in kernels.SUPPORTED_DTYPES:
            for name in KERNEL_NAMES:
                variants.add((name, kernels.pick_config(dim), dtype))
    return sorted(variants, key=str)


VARIANTS = _launchable_variants()


def _variant_id(name, config, dtype, capability):
    return f"{name}-D{config.BLOCK_D}-{str(dtype).removeprefix('torch.')}-sm{capability}"


def _shared_memory_bytes(name, config, dtype, capability) -> int:
    """Compile one variant for ``sm_<capability>``; the shared memory it needs per block."""
    pointer = POINTER_TYPES[dtype]
    # Sizes and strides as the launchers pass them: Python ints that fit int32 (Triton specializes
    # larger ones to int64, which the kernels' int64 offset arithmetic already covers).
    scalars = {
        "num_codewords": "i32", "dim": "i32", "neg_t_log2e": "fp32",
        "stride_yg": "i32", "stride_yk": "i32", "stride_yd": "i32",
        "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr",
    }  # fmt: skip
    if name == "fwd":
        kernel = kernels._packing_energy_fwd_kernel
        pointers = {"y_ptr": pointer, "center_ptr": "*fp32", "row_lse_ptr": "*fp32"}
    else:
        kernel = kernels._packing_energy_bwd_kernel
        pointers = {
            "y_ptr": pointer, "center_ptr": "*fp32", "row_lse_ptr": "*fp32", "coef_ptr": "*fp32", "grad_ptr": pointer,
        }  # fmt: skip
    constexprs = {"BLOCK_M": config.BLOCK_M, "BLOCK_N": config.BLOCK_N, "BLOCK_D": config.BLOCK_D}
    # As triton_aot.aot_compile, plus the launch options: num_stages sets the shared memory.
    source = triton.compiler.ASTSource(fn=as_jit_function(kernel), signature={**pointers, **scalars}, constexprs=constexprs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
    assert compiled.asm["cubin"], f"no cubin for sm_{capability}"
    return compiled.metadata.shared


def compile_every_variant() -> dict:
    """{variant id: {"shared": bytes} or {"error": message}}; what the child process prints."""
    results = {}
    for capability in GPU_CAPABILITIES:
        for variant in VARIANTS:
            try:
                results[_variant_id(*variant, capability)] = {"shared": _shared_memory_bytes(*variant, capability)}
            except Exception as exc:  # reported by the test of that variant
                results[_variant_id(*variant, capability)] = {"error": f"{type(exc).__name__}: {exc}"}
    return results


@pytest.fixture(scope="module")
def shared_memory_of():
    if not triton_interpreter_on():
        return lambda variant, capability: _shared_memory_bytes(*variant, capability)
    tests_dir = Path(__file__).resolve().parent
    child = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(tests_dir)!r})\n"
        f"import {Path(__file__).stem} as aot\n"
        "print(json.dumps(aot.compile_every_variant()))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])

    def lookup(variant, capability):
        outcome = results[_variant_id(*variant, capability)]
        if "error" in outcome:
            pytest.fail(outcome["error"])
        return outcome["shared"]

    return lookup


def test_variants_cover_every_config():
    assert {config for _, config, _ in VARIANTS} == set(kernels.CONFIGS.values())
    assert {name for name, _, _ in VARIANTS} == set(KERNEL_NAMES)


@pytest.mark.parametrize("capability", GPU_CAPABILITIES, ids=lambda c: f"sm{c}")
@pytest.mark.parametrize("variant", VARIANTS, ids=[_variant_id(*v, "")[:-3] for v in VARIANTS])
def test_kernel_compiles_for_gpu(variant, capability, shared_memory_of):
    shared = shared_memory_of(variant, capability)
    assert shared <= SHARED_MEMORY_LIMIT, f"needs {shared} bytes of shared memory"
