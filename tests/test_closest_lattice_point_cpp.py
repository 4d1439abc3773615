"""The CPU kernel of ``torch.ops.kepler.closest_lattice_point`` called directly, against the float32
reference: what the functional tests in test_closest_lattice_point.py do not reach.

* both CPU kernels (the AVX2 block kernels and the portable one that ``KEPLER_DISABLE_AVX2=1``
  forces), every row length the kernels unroll (1, 2, 3, 4, 8) and run-time ones, row counts
  around the 8-row block, packed and strided float32 (the shuffle transposes and the general load);
* ties (half-integers, where rounding goes to even and D_n's moved coordinate is the first of
  several), magnitudes past 2**24, non-finite coordinates in every position of a block;
* results independent of the thread count.

Every case is exact: the reference fixes every rounding, and the inputs avoid distance ties that
the spec leaves open (E8's half-integer inputs tie exactly, and both sides keep the first candidate).
"""

import math

import pytest
import torch

import kepler
from kepler import _backend
from kepler.reference.closest_lattice_point import closest_lattice_point_ref

pytestmark = pytest.mark.skipif(
    not kepler.HAS_CPU_EXT or not _backend.compiled_kernel_registered("closest_lattice_point", "cpu"),
    reason="kepler._C has no CPU closest_lattice_point kernel",
)

# (family, n): the unrolled row lengths, run-time ones for Z and D, and the fixed A2 and E8.
FAMILY_DIMS = [("Z", n) for n in (1, 2, 3, 4, 5, 8, 13)] + [("D", n) for n in (1, 2, 3, 4, 6, 8, 16)]
FAMILY_DIMS += [("A2", 2), ("E8", 8)]
ROWS = (1, 7, 8, 9, 1001)


def closest_op(x, family):
    return torch.ops.kepler.closest_lattice_point(x, family)


def assert_matches_reference(x, family):
    found = closest_op(x, family)
    assert found.dtype == torch.float32 and found.shape == x.shape and found.is_contiguous()
    torch.testing.assert_close(found, closest_lattice_point_ref(x.float(), family), rtol=0, atol=0)


def gaussian_rows(rows, dim, scale=3.0, seed=0):
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("family, dim", FAMILY_DIMS)
def test_packed_float32_rows(cpu_kernel, family, dim, rows):
    for seed, scale in enumerate((0.4, 3.0, 2.0**22, 2.0**26)):
        assert_matches_reference(gaussian_rows(rows, dim, scale, seed), family)


@pytest.mark.parametrize("family, dim", FAMILY_DIMS)
def test_strided_and_low_precision_rows(cpu_kernel, family, dim):
    buffer = gaussian_rows(2 * 37, 2 * dim + 3, seed=1)
    views = {
        "row step": buffer[::2, 3 : 3 + dim],
        "column-major": buffer[:37, :dim].t().contiguous().t(),
        "column step": buffer[:37, : 2 * dim : 2],
        "bfloat16": buffer[:37, :dim].to(torch.bfloat16),
        "float16 row step": buffer[::2, :dim].to(torch.float16),
    }
    for name, x in views.items():
        found = closest_op(x, family)
        torch.testing.assert_close(found, closest_lattice_point_ref(x.float(), family), rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("family, dim", [f for f in FAMILY_DIMS if f[0] != "A2"])
def test_ties_round_to_even_and_move_the_first_coordinate(cpu_kernel, family, dim):
    # Integers and half-integers: every rounding is a tie or exact, D_n's largest residuals tie.
    x = torch.randint(-9, 10, (203, dim), generator=torch.Generator().manual_seed(5)).float() / 2
    assert_matches_reference(x, family)


@pytest.mark.parametrize("family, dim", FAMILY_DIMS)
def test_non_finite_coordinates_give_nan_rows(cpu_kernel, family, dim):
    x = gaussian_rows(3 * 8 + 5, dim, seed=2)  # blocks of 8 and a partial one
    bad = torch.zeros(x.shape[0], dtype=torch.bool)
    for i, value in zip(range(0, x.shape[0], 3), [math.nan, math.inf, -math.inf] * 4):
        x[i, i % dim] = value
        bad[i] = True
    found = closest_op(x, family)
    assert found[bad].isnan().all()
    torch.testing.assert_close(found[~bad], closest_lattice_point_ref(x[~bad], family), rtol=0, atol=0)


@pytest.mark.parametrize("family, dim", [("D", 4), ("E8", 8), ("Z", 5)])
def test_thread_count_does_not_change_the_result(cpu_kernel, family, dim):
    x = gaussian_rows(40_003, dim, seed=3)  # several parallel_for tasks
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = closest_op(x, family)
        torch.set_num_threads(2)
        assert torch.equal(closest_op(x, family), single)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(single, closest_lattice_point_ref(x, family), rtol=0, atol=0)


def test_launcher_errors():
    with pytest.raises(RuntimeError, match=r"kepler::closest_lattice_point: x must be 2-D \(N, n\), got a 1-D tensor"):
        closest_op(torch.zeros(4), "Z")
    with pytest.raises(RuntimeError, match=r"x must have rows of at least one coordinate \(n >= 1\), got x of shape \[3, 0\]"):
        closest_op(torch.zeros(3, 0), "D")
    with pytest.raises(RuntimeError, match="x must be float32, bfloat16 or float16, got Double"):
        closest_op(torch.zeros(3, 8, dtype=torch.float64), "E8")
    with pytest.raises(RuntimeError, match=r"A2 takes rows of 2, got x of shape \[3, 3\]"):
        closest_op(torch.zeros(3, 3), "A2")
    with pytest.raises(RuntimeError, match="lattice must be one of Z, D, A2, E8, got 'D4'"):
        closest_op(torch.zeros(3, 4), "D4")
