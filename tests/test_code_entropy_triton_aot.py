"""Every configuration the code-entropy launchers can pick compiles for sm_80 and sm_90.

All four kernels (the forward row and code-mass kernels, the backward row and code kernels), every
``CONFIGS`` entry and every input dtype, and for float32 both dot precisions (IEEE and TF32); the
backward code kernel also as it writes float32 partial gradients for bfloat16/float16 inputs (the
rows split among several programs). See ``triton_aot`` for the harness and why the compiles run in
a child process on a CPU-only machine.
"""

import pytest
import torch

from triton_aot import INPUT, aot_tests, kernel_variants, launchable

kernels = pytest.importorskip("kepler.kernels.code_entropy")

BACKWARD_POINTERS = {
    "z_ptr": INPUT, "e_ptr": INPUT, "params_ptr": "*fp32", "row_stats_ptr": "*fp32", "code_weight_ptr": "*fp32",
    "group_coef_ptr": "*fp32", "row_weight_ptr": "*fp32",
}  # fmt: skip
FORWARD_POINTERS = {"z_ptr": INPUT, "e_ptr": INPUT, "params_ptr": "*fp32", "row_stats_ptr": "*fp32"}
SCALARS = {
    "N": "i32", "K": "i32", "D": "i32",
    "stride_zg": "i32", "stride_zn": "i32", "stride_zd": "i32",
    "stride_eg": "i32", "stride_ek": "i32", "stride_ed": "i32",
}  # fmt: skip
# (kernel, its pointers, its scalars); the code-block kernels take their row split too.
KERNELS = (
    (kernels._code_entropy_fwd_kernel, FORWARD_POINTERS, SCALARS),
    (
        kernels._code_entropy_mass_kernel,
        FORWARD_POINTERS | {"code_mass_ptr": "*fp32"},
        SCALARS | {"tiles_per_split": "i32"},
    ),
    (kernels._code_entropy_bwd_rows_kernel, BACKWARD_POINTERS | {"grad_z_ptr": INPUT}, SCALARS),
    (
        kernels._code_entropy_bwd_codes_kernel,
        BACKWARD_POINTERS | {"grad_e_ptr": INPUT},
        SCALARS | {"groups_per_codebook": "i32", "tiles_per_split": "i32"},
    ),
)  # fmt: skip
PARTIAL_CODES_KERNEL = {kernels._code_entropy_bwd_codes_kernel: BACKWARD_POINTERS | {"grad_e_ptr": "*fp32"}}

CONFIGS = launchable(lambda D, dtype: kernels.pick_config(D))
FLOAT32_CONFIGS = [(config, dtype) for config, dtype in CONFIGS if dtype == torch.float32]
SIXTEEN_BIT_CONFIGS = [(config, dtype) for config, dtype in CONFIGS if dtype != torch.float32]

# DOT_IN_FP32 is the interpreter-only path; GPUs take the native dot. TF32 is for float32 only.
IEEE = {"INPUT_PRECISION": "ieee", "DOT_IN_FP32": False}
TF32 = {"INPUT_PRECISION": "tf32", "DOT_IN_FP32": False}
VARIANTS = []
for kernel, pointers, scalars in KERNELS:
    VARIANTS += kernel_variants({kernel: pointers}, scalars, CONFIGS, IEEE, "ieee")
    VARIANTS += kernel_variants({kernel: pointers}, scalars, FLOAT32_CONFIGS, TF32, "tf32")
VARIANTS += kernel_variants(PARTIAL_CODES_KERNEL, KERNELS[-1][2], SIXTEEN_BIT_CONFIGS, IEEE, "ieee-partial")

test_variants_cover_every_config, test_kernel_compiles_for_gpu = aot_tests(VARIANTS, kernels.CONFIGS)
