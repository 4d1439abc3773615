"""Every configuration the nearest-codeword launcher can pick compiles for sm_80 and sm_90.

Without a GPU the test session runs with ``TRITON_INTERPRET=1``, which turns triton.language's own
``@jit`` helpers (``tl.sum``, ``tl.min``, ``tl.zeros``, ...) into interpreter objects that the
compiler cannot lower (triton 3.8). The compiles then run in one child process started with
``TRITON_INTERPRET=0``; on a GPU machine they run in the test process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kepler._backend import triton_interpreter_on
from triton_aot import GPU_CAPABILITIES, aot_compile

kernels = pytest.importorskip("kepler.kernels.nearest_codeword")

POINTER_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
# The smallest shared memory per block among sm_80+ GPUs (sm_86/sm_89 consumer parts): 99 KiB.
SHARED_MEMORY_LIMIT = 99 * 1024


def _launchable_variants():
    """(config, dtype, dot precision) for every D and dtype a caller can pass on a GPU."""
    variants = set()
    for dim in range(1, 1025):
        for dtype in kernels.SUPPORTED_DTYPES:
            config = kernels.pick_config(dim, dtype)
            precisions = ("ieee", "tf32") if dtype == torch.float32 else ("ieee",)
            variants.update((config, dtype, precision) for precision in precisions)
    return sorted(variants, key=str)


VARIANTS = _launchable_variants()


def _variant_id(config, dtype, precision, capability):
    return f"D{config.BLOCK_D}-K{config.BLOCK_K}-{str(dtype).removeprefix('torch.')}-{precision}-sm{capability}"


def _shared_memory_bytes(config, dtype, precision, capability) -> int:
    """Compile one variant for ``sm_<capability>``; the shared memory it needs per block."""
    pointer = POINTER_TYPES[dtype]
    # Sizes and strides as the launcher passes them: Python ints that fit int32 (Triton
    # specializes larger ones to int64, which the kernel's int64 offset arithmetic already covers).
    signature = {
        "z_ptr": pointer, "e_ptr": pointer, "indices_ptr": "*i64", "sq_dist_ptr": "*fp32",
        "N": "i32", "K": "i32", "D": "i32",
        "stride_zg": "i32", "stride_zn": "i32", "stride_zd": "i32",
        "stride_eg": "i32", "stride_ek": "i32", "stride_ed": "i32",
        "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "BLOCK_D": "constexpr",
        "INPUT_PRECISION": "constexpr", "DOT_IN_FP32": "constexpr",
    }  # fmt: skip
    constexprs = {
        "BLOCK_N": config.BLOCK_N,
        "BLOCK_K": config.BLOCK_K,
        "BLOCK_D": config.BLOCK_D,
        "INPUT_PRECISION": precision,
        "DOT_IN_FP32": False,  # the interpreter-only path; GPUs take the native dot
    }
    compiled = aot_compile(kernels._nearest_codeword_kernel, signature, constexprs, capability)
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
    assert {config for config, _, _ in VARIANTS} == set(kernels.CONFIGS.values())


@pytest.mark.parametrize("capability", GPU_CAPABILITIES, ids=lambda c: f"sm{c}")
@pytest.mark.parametrize("variant", VARIANTS, ids=[_variant_id(*v, "")[:-3] for v in VARIANTS])
def test_kernel_compiles_for_gpu(variant, capability, shared_memory_of):
    shared = shared_memory_of(variant, capability)
    assert shared <= SHARED_MEMORY_LIMIT, f"needs {shared} bytes of shared memory"
