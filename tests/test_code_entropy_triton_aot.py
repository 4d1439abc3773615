"""Every configuration the code-entropy launchers can pick compiles for sm_80 and sm_90.

All four kernels (the forward row and code-mass kernels, the backward row and code kernels), every
``CONFIGS`` entry and every input dtype, and for float32 both dot precisions (IEEE and TF32); see
``triton_aot`` for the harness and why the compiles run in a child process on a CPU-only machine.
"""

import pytest
import torch

from triton_aot import INPUT, aot_tests, kernel_variants, launchable

kernels = pytest.importorskip("kepler.kernels.code_entropy")

BACKWARD_POINTERS = {
    "z_ptr": INPUT, "e_ptr": INPUT, "params_ptr": "*fp32", "row_stats_ptr": "*fp32", "code_weight_ptr": "*fp32",
    "group_coef_ptr": "*fp32", "row_weight_ptr": "*fp32",
}  # fmt: skip
KERNELS = {
    kernels._code_entropy_fwd_kernel: {"z_ptr": INPUT, "e_ptr": INPUT, "params_ptr": "*fp32", "row_stats_ptr": "*fp32"},
    kernels._code_entropy_mass_kernel: {
        "z_ptr": INPUT, "e_ptr": INPUT, "params_ptr": "*fp32", "row_stats_ptr": "*fp32", "code_mass_ptr": "*fp32",
    },
    kernels._code_entropy_bwd_rows_kernel: BACKWARD_POINTERS | {"grad_z_ptr": INPUT},
}  # fmt: skip
CODES_KERNEL = {kernels._code_entropy_bwd_codes_kernel: BACKWARD_POINTERS | {"grad_e_ptr": INPUT}}
SCALARS = {
    "N": "i32", "K": "i32", "D": "i32",
    "stride_zg": "i32", "stride_zn": "i32", "stride_zd": "i32",
    "stride_eg": "i32", "stride_ek": "i32", "stride_ed": "i32",
}  # fmt: skip
CODES_SCALARS = SCALARS | {"groups_per_codebook": "i32"}

CONFIGS = launchable(lambda D, dtype: kernels.pick_config(D))
FLOAT32_CONFIGS = [(config, dtype) for config, dtype in CONFIGS if dtype == torch.float32]

# DOT_IN_FP32 is the interpreter-only path; GPUs take the native dot. TF32 is for float32 only.
VARIANTS = []
for kernel_set, scalars in ((KERNELS, SCALARS), (CODES_KERNEL, CODES_SCALARS)):
    VARIANTS += kernel_variants(kernel_set, scalars, CONFIGS, {"INPUT_PRECISION": "ieee", "DOT_IN_FP32": False}, "ieee")
    VARIANTS += kernel_variants(
        kernel_set, scalars, FLOAT32_CONFIGS, {"INPUT_PRECISION": "tf32", "DOT_IN_FP32": False}, "tf32"
    )

test_variants_cover_every_config, test_kernel_compiles_for_gpu = aot_tests(VARIANTS, kernels.CONFIGS)
