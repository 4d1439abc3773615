"""Every configuration the nearest-codeword launcher can pick compiles for sm_80 and sm_90.

The search kernel in every configuration (both row-count families, every D chunk, resident and
looped over D) and input dtype, and for float32 both dot precisions; the norms kernel in its one
configuration and every dtype. See ``triton_aot`` for the harness and why the compiles run in a
child process on a CPU-only machine.
"""

import pytest
import torch

from triton_aot import INPUT, aot_tests, kernel_variants, launchable

kernels = pytest.importorskip("kepler.kernels.nearest_codeword")

SEARCH_KERNEL = {
    kernels._nearest_codeword_kernel: {
        "z_ptr": INPUT, "e_ptr": INPUT, "code_sq_norms_ptr": "*fp32", "indices_ptr": "*i64", "sq_dist_ptr": "*fp32",
    },
}  # fmt: skip
SEARCH_SCALARS = {
    "N": "i32", "K": "i32", "D": "i32",
    "stride_zg": "i32", "stride_zn": "i32", "stride_zd": "i32",
    "stride_eg": "i32", "stride_ek": "i32", "stride_ed": "i32", "stride_normg": "i32",
}  # fmt: skip
# Below and from MANY_ROWS rows: the two families pick_config chooses between.
SEARCH_CONFIGS = sorted(
    {pair for rows in (1, kernels.MANY_ROWS) for pair in launchable(lambda D, dtype: kernels.pick_config(rows, D, dtype))},
    key=str,
)
FLOAT32_SEARCH_CONFIGS = [(config, dtype) for config, dtype in SEARCH_CONFIGS if dtype == torch.float32]

NORMS_KERNEL = {kernels._code_sq_norms_kernel: {"e_ptr": INPUT, "sq_norms_ptr": "*fp32"}}
NORMS_SCALARS = {"K": "i32", "D": "i32", "stride_eg": "i32", "stride_ek": "i32", "stride_ed": "i32"}
NORMS_CONFIGS = launchable(lambda D, dtype: kernels.SQ_NORMS_CONFIG)

# DOT_IN_FP32 is the interpreter-only path; GPUs take the native dot. TF32 is for float32 only.
VARIANTS = kernel_variants(SEARCH_KERNEL, SEARCH_SCALARS, SEARCH_CONFIGS, {"INPUT_PRECISION": "ieee", "DOT_IN_FP32": False}, "ieee")
VARIANTS += kernel_variants(
    SEARCH_KERNEL, SEARCH_SCALARS, FLOAT32_SEARCH_CONFIGS, {"INPUT_PRECISION": "tf32", "DOT_IN_FP32": False}, "tf32"
)
VARIANTS += kernel_variants(NORMS_KERNEL, NORMS_SCALARS, NORMS_CONFIGS)

test_variants_cover_every_config, test_kernel_compiles_for_gpu = aot_tests(
    VARIANTS, kernels.CONFIGS + (kernels.SQ_NORMS_CONFIG,)
)
