"""Every configuration the kepler_kl Triton launchers can pick compiles for sm_80 and sm_90.

Both kernels, every ``(BLOCK, num_warps)`` in ``BLOCK_CONFIGS`` and every input dtype, with the
launchers' num_warps; see ``triton_aot`` for why the compiles run in a child process on a CPU-only
machine.
"""

import sys

import pytest

from triton_aot import GPU_CAPABILITIES, aot_compile, check_compiled, compile_all, compile_results

kernels = pytest.importorskip("kepler.kernels.kepler_kl")

TRITON_DTYPES = ("fp32", "bf16", "fp16")
KERNEL_NAMES = ("fwd", "bwd")
# Sizes and strides as the launchers pass them: Python ints that fit int32 (larger ones become
# int64, which the kernels' int64 offsets already cover).
SCALARS = {
    "num_cols": "i32", "stride_xb": "i32", "stride_xm": "i32", "stride_qb": "i32", "stride_qm": "i32",
    "log_eps": "fp32", "has_eps": "i32", "use_std": "i32", "BLOCK": "constexpr",
}  # fmt: skip
VARIANTS = [
    (name, block, num_warps, dtype, capability)
    for name in KERNEL_NAMES
    for block, num_warps in kernels.BLOCK_CONFIGS
    for dtype in TRITON_DTYPES
    for capability in GPU_CAPABILITIES
]


def _variant_id(variant) -> str:
    name, block, num_warps, dtype, capability = variant
    return f"{name}-B{block}-w{num_warps}-{dtype}-sm{capability}"


def _shared_memory_bytes(variant) -> int:
    """Compile one variant; the shared memory it needs per block."""
    name, block, num_warps, dtype, capability = variant
    if name == "fwd":
        kernel = kernels._kepler_kl_fwd_kernel
        pointers = {"x_ptr": f"*{dtype}", "logq_ptr": "*fp32", "loss_ptr": "*fp32", "stats_ptr": "*fp32"}
    else:
        kernel = kernels._kepler_kl_bwd_kernel
        pointers = {
            "grad_loss_ptr": "*fp32", "x_ptr": f"*{dtype}", "logq_ptr": "*fp32", "stats_ptr": "*fp32",
            "grad_ptr": f"*{dtype}",
        }  # fmt: skip
    signature = {**pointers, **SCALARS}
    options = {"num_warps": num_warps}
    return aot_compile(kernel, signature, {"BLOCK": block}, capability, options).metadata.shared


def compile_every_variant() -> dict:
    """What the AOT child process prints (see ``triton_aot.compile_results``)."""
    return compile_all(VARIANTS, _variant_id, _shared_memory_bytes)


@pytest.fixture(scope="module")
def compiled():
    return compile_results(sys.modules[__name__])


def test_block_configs_cover_every_row_length():
    picked = {kernels.block_config(num_cols) for num_cols in (1, 255, 256, 257, 1024, 1025, 4096, 4097, 2**20)}
    assert picked == set(kernels.BLOCK_CONFIGS)


@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_kernel_compiles_for_gpu(variant, compiled):
    check_compiled(compiled, _variant_id(variant))
