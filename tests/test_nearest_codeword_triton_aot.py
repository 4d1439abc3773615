"""Every configuration the nearest-codeword launcher can pick compiles for sm_80 and sm_90.

Compiled with the launcher's own launch options; see ``triton_aot`` for why the compiles run in a
child process on a CPU-only machine.
"""

import sys

import pytest
import torch

from triton_aot import GPU_CAPABILITIES, aot_compile, check_compiled, compile_all, compile_results

kernels = pytest.importorskip("kepler.kernels.nearest_codeword")

POINTER_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}


def _launchable_variants():
    """(config, dtype, dot precision, capability) for every D and dtype a caller can pass on a GPU."""
    variants = set()
    for dim in range(1, 1025):
        for dtype in kernels.SUPPORTED_DTYPES:
            config = kernels.pick_config(dim, dtype)
            precisions = ("ieee", "tf32") if dtype == torch.float32 else ("ieee",)
            variants.update((config, dtype, precision) for precision in precisions)
    return [(*variant, capability) for variant in sorted(variants, key=str) for capability in GPU_CAPABILITIES]


VARIANTS = _launchable_variants()


def _variant_id(variant) -> str:
    config, dtype, precision, capability = variant
    return f"D{config.BLOCK_D}-K{config.BLOCK_K}-{str(dtype).removeprefix('torch.')}-{precision}-sm{capability}"


def _shared_memory_bytes(variant) -> int:
    """Compile one variant; the shared memory it needs per block."""
    config, dtype, precision, capability = variant
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
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return aot_compile(kernels._nearest_codeword_kernel, signature, constexprs, capability, options).metadata.shared


def compile_every_variant() -> dict:
    """What the AOT child process prints (see ``triton_aot.compile_results``)."""
    return compile_all(VARIANTS, _variant_id, _shared_memory_bytes)


@pytest.fixture(scope="module")
def compiled():
    return compile_results(sys.modules[__name__])


def test_variants_cover_every_config():
    assert {variant[0] for variant in VARIANTS} == set(kernels.CONFIGS.values())


@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_kernel_compiles_for_gpu(variant, compiled):
    check_compiled(compiled, _variant_id(variant))
