"""Every configuration the packing-energy launchers can pick compiles for sm_80 and sm_90.

Both kernels (forward and backward), every ``CONFIGS`` entry and every input dtype; see
``triton_aot`` for the harness and why the compiles run in a child process on a CPU-only machine.
"""

import pytest

from triton_aot import INPUT, aot_tests, kernel_variants, launchable

kernels = pytest.importorskip("kepler.kernels.packing_energy")

KERNELS = {
    kernels._packing_energy_fwd_kernel: {"y_ptr": INPUT, "center_ptr": "*fp32", "row_lse_ptr": "*fp32"},
    kernels._packing_energy_bwd_kernel: {
        "y_ptr": INPUT, "center_ptr": "*fp32", "row_lse_ptr": "*fp32", "coef_ptr": "*fp32", "grad_ptr": INPUT,
    },
}  # fmt: skip
SCALARS = {
    "K": "i32", "D": "i32", "neg_t_log2e": "fp32", "stride_yg": "i32", "stride_yk": "i32", "stride_yd": "i32",
}  # fmt: skip

VARIANTS = kernel_variants(KERNELS, SCALARS, launchable(lambda D, dtype: kernels.pick_config(D)))

test_variants_cover_every_config, test_kernel_compiles_for_gpu = aot_tests(VARIANTS, kernels.CONFIGS)
