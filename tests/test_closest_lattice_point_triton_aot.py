"""Every configuration the closest-lattice-point launcher can pick compiles for sm_80 and sm_90.

Every ``CONFIGS`` entry (one per row width) and input dtype, for each lattice family the launcher
can run in it (``Z`` and ``D`` at every width, ``A2`` and ``E8`` at their own), on both layouts
(``PACKED`` rows and strided ones). The op rounds every product and sum on its own, as the
reference does (A2's ``k * spacing + shift``), so the PTX must hold no fused multiply-add. See
``triton_aot`` for the harness and why the compiles run in a child process on a CPU-only machine.
"""

import pytest

from triton_aot import INPUT, aot_tests, kernel_variants, launchable

from kepler._numerics import FAMILY_ROW_LENGTH, LATTICE_FAMILIES

kernels = pytest.importorskip("kepler.kernels.closest_lattice_point")

KERNEL = {kernels._closest_lattice_point_kernel: {"x_ptr": INPUT, "out_ptr": "*fp32"}}
SCALARS = {"N": "i32", "n": "i32", "stride_xn": "i32", "stride_xd": "i32"}


def family_configs(family: str) -> list:
    """What the launcher can pick for ``family``: any row width for Z and D, the family's own for A2 and E8."""
    if family in FAMILY_ROW_LENGTH:
        return launchable(lambda n, dtype: kernels.pick_config(FAMILY_ROW_LENGTH[family]))
    return launchable(lambda n, dtype: kernels.pick_config(n))


VARIANTS = [
    variant
    for family in LATTICE_FAMILIES
    for packed in (True, False)
    for variant in kernel_variants(
        KERNEL, SCALARS, family_configs(family), {"LATTICE": family, "PACKED": packed},
        f"{family}-{'packed' if packed else 'strided'}",
    )
]  # fmt: skip

test_variants_cover_every_config, test_kernel_compiles_for_gpu = aot_tests(VARIANTS, kernels.CONFIGS, unfused=True)
