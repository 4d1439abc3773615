"""Every configuration the packing-energy launchers can pick compiles for sm_80 and sm_90.

Both kernels (forward and backward), every ``CONFIGS`` entry and every input dtype, with the
launchers' own launch options; see ``triton_aot`` for why the compiles run in a child process on a
CPU-only machine.
"""

import sys

import pytest
import torch

from triton_aot import GPU_CAPABILITIES, aot_compile, check_compiled, compile_all, compile_results

kernels = pytest.importorskip("kepler.kernels.packing_energy")

POINTER_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
KERNEL_NAMES = ("fwd", "bwd")


def _launchable_variants():
    """(kernel name, config, dtype, capability) for every d and dtype a caller can pass."""
    variants = set()
    for dim in range(1, 1025):
        for dtype in kernels.SUPPORTED_DTYPES:
            for name in KERNEL_NAMES:
                variants.add((name, kernels.pick_config(dim), dtype))
    return [(*variant, capability) for variant in sorted(variants, key=str) for capability in GPU_CAPABILITIES]


VARIANTS = _launchable_variants()


def _variant_id(variant) -> str:
    name, config, dtype, capability = variant
    return f"{name}-D{config.BLOCK_D}-{str(dtype).removeprefix('torch.')}-sm{capability}"


def _shared_memory_bytes(variant) -> int:
    """Compile one variant; the shared memory it needs per block."""
    name, config, dtype, capability = variant
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
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return aot_compile(kernel, {**pointers, **scalars}, constexprs, capability, options).metadata.shared


def compile_every_variant() -> dict:
    """What the AOT child process prints (see ``triton_aot.compile_results``)."""
    return compile_all(VARIANTS, _variant_id, _shared_memory_bytes)


@pytest.fixture(scope="module")
def compiled():
    return compile_results(sys.modules[__name__])


def test_variants_cover_every_config():
    assert {variant[1] for variant in VARIANTS} == set(kernels.CONFIGS.values())
    assert {variant[0] for variant in VARIANTS} == set(KERNEL_NAMES)


@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_kernel_compiles_for_gpu(variant, compiled):
    check_compiled(compiled, _variant_id(variant))
