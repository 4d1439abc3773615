"""Every configuration the nearest-codeword launcher can pick compiles for sm_80 and sm_90.

Every D chunk and input dtype, and for float32 both dot precisions; see ``triton_aot`` for the
harness and why the compiles run in a child process on a CPU-only machine.
"""

import pytest
import torch

from triton_aot import INPUT, aot_tests, kernel_variants, launchable

kernels = pytest.importorskip("kepler.kernels.nearest_codeword")

KERNELS = {kernels._nearest_codeword_kernel: {"z_ptr": INPUT, "e_ptr": INPUT, "indices_ptr": "*i64", "sq_dist_ptr": "*fp32"}}
SCALARS = {
    "N": "i32", "K": "i32", "D": "i32",
    "stride_zg": "i32", "stride_zn": "i32", "stride_zd": "i32",
    "stride_eg": "i32", "stride_ek": "i32", "stride_ed": "i32",
}  # fmt: skip
CONFIGS = launchable(kernels.pick_config)
FLOAT32_CONFIGS = [(config, dtype) for config, dtype in CONFIGS if dtype == torch.float32]

# DOT_IN_FP32 is the interpreter-only path; GPUs take the native dot. TF32 is for float32 only.
VARIANTS = kernel_variants(KERNELS, SCALARS, CONFIGS, {"INPUT_PRECISION": "ieee", "DOT_IN_FP32": False}, "ieee")
VARIANTS += kernel_variants(KERNELS, SCALARS, FLOAT32_CONFIGS, {"INPUT_PRECISION": "tf32", "DOT_IN_FP32": False}, "tf32")

test_variants_cover_every_config, test_kernel_compiles_for_gpu = aot_tests(VARIANTS, kernels.CONFIGS)
