"""Every configuration the kepler_kl Triton launchers can pick compiles for sm_80 and sm_90.

Both kernels, every ``CONFIGS`` entry and every input dtype; see ``triton_aot`` for the harness
and why the compiles run in a child process on a CPU-only machine.
"""

import pytest

from triton_aot import INPUT, aot_tests, kernel_variants, launchable

kernels = pytest.importorskip("kepler.kernels.kepler_kl")

KERNELS = {
    kernels._kepler_kl_fwd_kernel: {"x_ptr": INPUT, "logq_ptr": "*fp32", "loss_ptr": "*fp32", "stats_ptr": "*fp32"},
    kernels._kepler_kl_bwd_kernel: {
        "grad_loss_ptr": "*fp32", "x_ptr": INPUT, "logq_ptr": "*fp32", "stats_ptr": "*fp32", "grad_ptr": INPUT,
    },
}  # fmt: skip
SCALARS = {
    "M": "i32", "stride_xb": "i32", "stride_xm": "i32", "stride_qb": "i32", "stride_qm": "i32",
    "log_eps": "fp32", "has_eps": "i32", "use_std": "i32",
}  # fmt: skip

VARIANTS = kernel_variants(KERNELS, SCALARS, launchable(lambda M, dtype: kernels.pick_config(M)))

test_variants_cover_every_config, test_kernel_compiles_for_gpu = aot_tests(VARIANTS, kernels.CONFIGS)
