"""kepler.nearest_codeword: every backend against the float64 reference, edge cases, autograd, ops.

The oracle is ``nearest_codeword_ref`` run in float64 on the very values the backend saw (a
bfloat16 input is upcast exactly). A backend may pick another index than the oracle only where
the two exact distances differ by less than the float32 rounding of the search scores, and its
``sq_dist`` must equal the exact distance to the index it picked, to float32 summation rounding.
"""

import dataclasses
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kepler
from kepler import _backend
from kepler.kernels._common import KERNEL_DTYPES
from kepler.ops._common import registered_op
from kepler.ops.nearest_codeword import NearestCodewordFunction
from kepler.reference.nearest_codeword import nearest_codeword_ref, search_scale

from conftest import (
    F32_UNIT,
    device_backend_params,
    device_params,
    float32_sum_error_bound,
    huge_column_stride_view,
    property_examples,
)
from strategies import value_specs


DEVICE_BACKENDS = device_backend_params()

ROWS = (1, 7, 131)
CODES = (1, 3, 67, 1000)  # 67 and 1000 are no multiple of any block size
DIMS = (1, 3, 8, 16, 64, 256)
ALL_SHAPES = list(itertools.product(ROWS, CODES, DIMS))
# The Triton interpreter is slow: on the CPU the triton backend gets a subset that still has every
# N, K and D above, one- and many-tile cases of each, and D chunks of 16, 32 and 64 with padding.
INTERPRETED_TRITON_SHAPES = [
    (1, 1, 1), (7, 3, 3), (131, 67, 8), (7, 1000, 16), (131, 3, 64), (1, 67, 256),
    (131, 1000, 3), (7, 67, 64), (131, 1, 16), (7, 3, 256), (1, 1000, 8), (131, 67, 256),
]  # fmt: skip


def _shape_params():
    params = []
    for device, backend in (p.values for p in DEVICE_BACKENDS):
        marks = next(p.marks for p in DEVICE_BACKENDS if p.values == (device, backend))
        interpreted = backend == "triton" and device == "cpu"
        for rows, codes, dim in INTERPRETED_TRITON_SHAPES if interpreted else ALL_SHAPES:
            params.append(
                pytest.param(device, backend, rows, codes, dim, marks=marks, id=f"{device}-{backend}-N{rows}-K{codes}-D{dim}")
            )
    return params




def _as_groups(z, codebook):
    return (z if z.dim() == 3 else z.unsqueeze(0)), (codebook if codebook.dim() == 3 else codebook.unsqueeze(0))


def _winners(codebook3, indices3):
    """codebook rows picked by ``indices3`` (G, N) -> (G, N, D)."""
    codes = codebook3.expand(indices3.shape[0], -1, -1)
    return torch.gather(codes, 1, indices3.unsqueeze(-1).expand(-1, -1, codes.shape[-1]))


def assert_matches_oracle(z, codebook, indices, sq_dist, exact=False):
    """Check one backend's result against the float64 reference on the same input values.

    Any finite values (magnitudes up to float32's range), NaN and inf: a row of ``z`` holding
    NaN/inf has no finite score and gets index 0; a codeword holding NaN/inf never wins a finite
    row while a finite codeword exists. With ``exact`` (inputs whose float32 scores are exact, e.g.
    small integers at one power of two) the index must be the oracle's, ties to the lowest index.
    """
    expected_shape = z.shape[:-1]
    assert indices.dtype == torch.int64 and indices.shape == expected_shape and indices.device == z.device
    assert sq_dist.dtype == torch.float32 and sq_dist.shape == expected_shape and sq_dist.is_contiguous()
    # The power of two the backend searched at, to bound float32's underflow in its units.
    scale = search_scale(*_as_groups(z, codebook)).double().item()
    z3, codebook3 = _as_groups(z.double().cpu(), codebook.double().cpu())
    indices3 = indices.cpu().reshape(z3.shape[:2])
    sq_dist3 = sq_dist.cpu().double().reshape(z3.shape[:2])
    num_codes, dim = codebook3.shape[1:]
    assert ((indices3 >= 0) & (indices3 < num_codes)).all(), "index out of range (unwritten output?)"

    oracle_indices, oracle_sq_dist = nearest_codeword_ref(z3, codebook3)
    if exact:
        torch.testing.assert_close(indices3, oracle_indices, rtol=0, atol=0)
    finite_rows = torch.isfinite(z3).all(-1)  # (G, N)
    finite_codes = torch.isfinite(codebook3).all(-1).expand(z3.shape[0], -1)  # (G, K)
    searchable = finite_rows & finite_codes.any(-1, keepdim=True)
    assert (indices3[~searchable] == 0).all(), "a row without any finite score must get index 0"
    picked = _winners(codebook3, indices3)
    picked_sq_dist = ((z3 - picked) ** 2).sum(-1)
    assert torch.gather(finite_codes, 1, indices3)[searchable].all(), "a codeword holding NaN/inf won a finite row"

    # Worst-case float32 error of one search score ||e||^2 - 2 z.e (D-term sums, then the
    # subtraction: D + 1 roundings on the absolute terms, whatever the order or FMA use; TF32 is
    # off in tests), plus the absolute error of D + 1 results that may underflow to float32's
    # subnormals (2**-150 each, at the search scale), doubled (the "no worse than 2x plain
    # PyTorch" rule); two scores are compared, so both errors add up.
    oracle_picked = _winners(codebook3, oracle_indices)
    underflow = 2 * (dim + 1) * 2.0**-150 / scale**2

    def score_error(codes):
        terms = (codes * codes).sum(-1) + 2 * (z3.abs() * codes.abs()).sum(-1)
        return 2 * float32_sum_error_bound(dim + 1, terms) + underflow

    allowed_gap = score_error(picked) + score_error(oracle_picked)
    gap = picked_sq_dist - oracle_sq_dist
    differ = (indices3 != oracle_indices) & searchable
    assert (gap[differ] <= allowed_gap[differ]).all(), (
        f"{int(differ.sum())} rows pick a codeword farther than rounding allows: gaps {gap[differ][:5].tolist()} "
        f"vs allowed {allowed_gap[differ][:5].tolist()}"
    )
    # sq_dist is the exact distance to the picked codeword, summed over D in float32 at the search
    # scale and then multiplied back by 1/scale twice: each term rounded by the difference and the
    # square, a D-term sum of positive terms and two products (doubled), plus underflow to
    # subnormals at either scale. Past float32's range it is inf; NaN/inf where the exact one is.
    relative = 2 * float32_sum_error_bound(dim + 5, 1.0)
    absolute = 2 * (dim + 3) * 2.0**-150 / scale**2 + 2 * 2.0**-150
    largest = torch.finfo(torch.float32).max
    fits = picked_sq_dist.isfinite() & (picked_sq_dist <= largest * (1 - relative))
    overflows = picked_sq_dist > largest * (1 + relative)
    torch.testing.assert_close(sq_dist3[fits], picked_sq_dist[fits], rtol=relative, atol=absolute)
    assert sq_dist3[overflows].isposinf().all(), "a distance past float32's range must be inf"
    unfinished = ~picked_sq_dist.isfinite()
    torch.testing.assert_close(sq_dist3[unfinished], picked_sq_dist[unfinished], equal_nan=True)


# ---------------------------------------------------------------------------------------------
# Search results
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device, backend, rows, codes, dim", _shape_params())
def test_float32_matches_reference(device, backend, rows, codes, dim, poisoned_empty):
    z = torch.randn(rows, dim, device=device)
    codebook = torch.randn(codes, dim, device=device)
    indices, sq_dist = kepler.nearest_codeword(z, codebook, backend=backend)
    assert_matches_oracle(z, codebook, indices, sq_dist)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows, codes, dim", [(131, 67, 64), (7, 1000, 16), (131, 3, 3), (7, 67, 256)])
@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_low_precision_matches_reference(device, backend, rows, codes, dim, dtype, poisoned_empty):
    groups = 2
    z = torch.randn(groups, rows, dim, device=device).to(dtype)
    codebook = torch.randn(groups, codes, dim, device=device).to(dtype)
    indices, sq_dist = kepler.nearest_codeword(z, codebook, backend=backend)
    assert_matches_oracle(z, codebook, indices, sq_dist)


def _strided_copy(t):
    """The values of ``t`` in a non-contiguous view at an offset into a larger buffer (every other row,
    features not at the start of the row)."""
    buffer = torch.randn(*t.shape[:-2], 2 * t.shape[-2] + 1, t.shape[-1] + 5, dtype=t.dtype, device=t.device)
    view = buffer[..., 1::2, 3 : 3 + t.shape[-1]]
    view.copy_(t)
    return view


def _column_major(t):
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


LAYOUTS = {
    "shared-2d": ((37,), ()),  # z (N, D), codebook (K, D)
    "shared-grouped": ((3, 37), ()),  # z (G, N, D), codebook (K, D) shared by the groups
    "per-group": ((3, 37), (3,)),  # z (G, N, D), codebook (G, K, D)
}


@pytest.mark.parametrize("memory", ["contiguous", "strided", "column-major"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_layouts_and_strides(device, backend, layout, memory, poisoned_empty):
    z_lead, codebook_lead = LAYOUTS[layout]
    dim, codes = 19, 70
    z = torch.randn(*z_lead, dim, device=device)
    codebook = torch.randn(*codebook_lead, codes, dim, device=device)
    if memory == "strided":
        z, codebook = _strided_copy(z), _strided_copy(codebook)
    elif memory == "column-major":
        z, codebook = _column_major(z), _column_major(codebook)
    expected_indices, expected_sq_dist = kepler.nearest_codeword(z.contiguous(), codebook.contiguous(), backend=backend)
    indices, sq_dist = kepler.nearest_codeword(z, codebook, backend=backend)
    assert_matches_oracle(z, codebook, indices, sq_dist)
    torch.testing.assert_close(indices, expected_indices, rtol=0, atol=0)
    torch.testing.assert_close(sq_dist, expected_sq_dist)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_triton_every_config_matches_reference(dtype, monkeypatch, poisoned_empty):
    """Every search configuration the launcher can pick for ``dtype`` (each D chunk, z resident or
    looped over D, 64- and 128-row programs) against the oracle, with MANY_ROWS lowered so that the
    128-row family runs on inputs small enough for the interpreter; N and K are no multiple of any block."""
    if _backend._unavailable_reason("triton", "cpu"):
        pytest.skip("the triton backend cannot run on the CPU here")
    kernels = pytest.importorskip("kepler.kernels.nearest_codeword")
    monkeypatch.setattr(kernels, "MANY_ROWS", 200)
    picked = set()
    for groups in (1, 3):  # 67 or 201 rows in all
        for dim in (13, 30, 64, 100):
            z = torch.randn(groups, 67, dim).to(dtype)
            codebook = torch.randn(131, dim).to(dtype)
            picked.add(kernels.pick_config(groups * 67, dim, dtype))
            indices, sq_dist = kepler.nearest_codeword(z, codebook, backend="triton")
            assert_matches_oracle(z, codebook, indices, sq_dist)
    assert picked == {kernels.pick_config(rows, dim, dtype) for rows in (1, 200) for dim in range(1, 257)}


def test_triton_column_offsets_past_int32():
    """A column-major z whose column offsets pass 2**31 elements (as in a transposed (N, D) view with
    N * D > 2**31) is searched as the same values contiguous.

    Run end to end in the interpreter, which multiplies int32 offsets in int32 like a GPU does, on a
    real view of an 8 GiB address space (see ``huge_column_stride_view``) rather than by checking
    the offset expression's dtype: that would pass for a cast in the wrong place, this cannot.
    """
    if _backend._unavailable_reason("triton", "cpu"):
        pytest.skip("the triton backend cannot run on the CPU here")
    z = torch.randn(5, 3).half()
    codebook = torch.randn(70, 3).half()
    # The registered op, not kepler.nearest_codeword: the functional's overflow-safe scaling
    # (search_scale) copies z into a contiguous tensor before the kernel sees it.
    search = registered_op("nearest_codeword", "triton")  # takes (G, N, D) and (Gc, K, D)
    expected = search(z[None], codebook[None])
    got = search(huge_column_stride_view(z)[None], codebook[None])
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_groups_search_their_own_codebook(device, backend):
    # Group g's codebook holds group g's rows of z in its own order: only there is each row at distance 0.
    groups, rows, dim = 3, 11, 8
    z = torch.randn(groups, rows, dim, device=device)
    codebook = torch.empty(groups, rows, dim, device=device)
    positions = torch.stack([torch.randperm(rows, device=device) for _ in range(groups)])
    for g in range(groups):
        codebook[g, positions[g]] = z[g]
    indices, sq_dist = kepler.nearest_codeword(z, codebook, backend=backend)
    torch.testing.assert_close(indices, positions, rtol=0, atol=0)
    torch.testing.assert_close(sq_dist, torch.zeros_like(sq_dist), rtol=0, atol=0)


@pytest.mark.parametrize("grouped", [False, True], ids=["2d", "grouped"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_empty_rows(device, backend, dtype, grouped):
    z = torch.randn(*((2,) if grouped else ()), 0, 5, device=device, dtype=dtype, requires_grad=True)
    codebook = torch.randn(4, 5, device=device, dtype=dtype, requires_grad=True)
    indices, sq_dist = kepler.nearest_codeword(z, codebook, backend=backend)
    assert indices.shape == sq_dist.shape == z.shape[:-1]
    assert indices.dtype == torch.int64 and sq_dist.dtype == torch.float32
    sq_dist.sum().backward()
    assert z.grad.shape == z.shape
    torch.testing.assert_close(codebook.grad, torch.zeros_like(codebook), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_ties_go_to_the_lowest_index(device, backend, dtype):
    # Small integers: every product and sum is exact in any order of summation, so tied distances
    # give bitwise-tied scores in every backend (random floats would not: a GEMM may round two equal
    # columns differently).
    dim, codes = 16, 131  # codebook tiles are 64 or 128 codes: 131 spans two or three
    codebook = torch.randint(-3, 4, (codes, dim), device=device).to(dtype)
    target = torch.randint(-3, 4, (dim,), device=device).to(dtype)
    unit = torch.zeros(dim, device=device, dtype=dtype)
    unit[0] = 1
    duplicates = [5, 9, 64, 66, 130]  # inside one tile and across tiles
    codebook[duplicates] = target
    z = target + torch.eye(dim, device=device, dtype=dtype)[:9]  # distance 1 to every duplicate
    indices, sq_dist = kepler.nearest_codeword(z, codebook, backend=backend)
    assert (indices == 5).all(), indices
    assert (sq_dist == 1).all(), sq_dist
    # Two different codewords at the same distance: the lower index wins.
    far = codebook + 50
    far[60], far[7] = target + unit, target - unit
    indices, _ = kepler.nearest_codeword(target.expand(3, dim), far, backend=backend)
    assert (indices == 7).all(), indices
    # Every codeword the same: every row takes index 0.
    indices, _ = kepler.nearest_codeword(z, target.expand(codes, dim), backend=backend)
    assert (indices == 0).all(), indices


# NaN/inf inputs make numpy (the Triton interpreter) warn; those warnings are expected here.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_non_finite_scores_never_win(device, backend, dtype):
    rows, codes, dim = 6, 67, 8
    z = torch.randn(rows, dim, device=device).to(dtype)
    codebook = torch.randn(codes, dim, device=device).to(dtype)
    z[1, 3] = float("nan")
    z[2, 0] = float("inf")
    codebook[0, 2] = float("nan")  # a NaN codeword is never picked, even though it is index 0
    codebook[40, 1] = float("inf")
    indices, sq_dist = kepler.nearest_codeword(z, codebook, backend=backend)
    expected_indices, expected_sq_dist = nearest_codeword_ref(z.double(), codebook.double())
    # Rows holding NaN / inf have no finite score: index 0, and the exact distance is NaN / inf.
    assert indices[1] == 0 and indices[2] == 0
    assert torch.isnan(sq_dist[1]) and (torch.isinf(sq_dist[2]) or torch.isnan(sq_dist[2]))
    finite_rows = [0, 3, 4, 5]
    assert not torch.isin(indices[finite_rows], torch.tensor([0, 40], device=device)).any()
    assert_matches_oracle(z[finite_rows], codebook, indices[finite_rows], sq_dist[finite_rows])
    assert expected_indices[1] == 0 and expected_indices[2] == 0 and torch.isnan(expected_sq_dist[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)  # float16 cannot reach 2**32
@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_values_near_the_float32_range(device, backend, dtype):
    """||e||^2 of a codeword past ~1e19 overflows the float32 score: the search must still be exact."""
    z = torch.tensor([[2e19, 0, 0, 0], [0, 3e19, 0, 0], [3e38, 0, 0, 0]], device=device).to(dtype)
    codebook = torch.tensor([[0, 0, 0, 0], [2e19, 0, 0, 0], [0, 3.1e19, 0, 0]], device=device).to(dtype)
    z.requires_grad_(True)
    indices, sq_dist = kepler.nearest_codeword(z, codebook, backend=backend)
    expected = torch.tensor([1, 2, 1], device=device)
    torch.testing.assert_close(indices, expected, rtol=0, atol=0)
    residual = z.detach().double() - codebook.double()[expected]
    # Row 2's distance (~9e76) does not fit float32: inf is its right value, with the right index.
    exact_sq_dist = residual.square().sum(-1).float()
    assert torch.isinf(exact_sq_dist[2])
    torch.testing.assert_close(sq_dist, exact_sq_dist, rtol=2 * F32_UNIT, atol=0)
    (grad_z,) = torch.autograd.grad(sq_dist[:2].sum(), z)
    torch.testing.assert_close(grad_z[:2], (2 * residual[:2]).to(dtype), rtol=torch.finfo(dtype).eps, atol=0)


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("codebook_groups", [None, 1, 3], ids=["2d", "shared", "per-group"])
def test_gradcheck_float64(codebook_groups):
    """The reference backend is plain autograd through nearest_codeword_ref's recomputed distance."""
    groups, rows, codes, dim = 3, 5, 4, 3
    z_shape = (rows, dim) if codebook_groups is None else (groups, rows, dim)
    codebook_shape = (codes, dim) if codebook_groups in (None, 1) else (groups, codes, dim)
    z = torch.randn(z_shape, dtype=torch.float64, requires_grad=True)
    codebook = torch.randn(codebook_shape, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda z, e: kepler.nearest_codeword(z, e, backend="reference")[1], (z, codebook))


KERNEL_BACKENDS = [p for p in DEVICE_BACKENDS if p.values[1] != "reference"]


@pytest.mark.parametrize("code_groups", [1, 3], ids=["shared", "per-group"])
@pytest.mark.parametrize("device, backend", KERNEL_BACKENDS)
def test_function_backward_matches_float64_reference_autograd(device, backend, code_groups):
    """NearestCodewordFunction's hand-written backward vs autograd of the float64 reference, on the
    (G, N, D) / (Gc, K, D) layout the Function takes, with a non-uniform upstream gradient.

    Tolerance: twice the error of the plain float32 reference's autograd, plus one float32 rounding.
    """
    groups, rows, codes, dim = 3, 40, 6, 5  # ~7 rows per codeword: the codebook gradient sums many
    z = torch.randn(groups, rows, dim, device=device)
    codebook = torch.randn(code_groups, codes, dim, device=device)
    grad_output = torch.randn(groups, rows, device=device)

    def grads(function, z, codebook):
        z, codebook = z.clone().requires_grad_(), codebook.clone().requires_grad_()
        indices, sq_dist = function(z, codebook)
        sq_dist.backward(grad_output.to(sq_dist.dtype))
        return indices, z.grad, codebook.grad

    got = grads(lambda z, e: NearestCodewordFunction.apply(z, e, backend), z, codebook)
    plain = grads(nearest_codeword_ref, z, codebook)
    exact = grads(nearest_codeword_ref, z.double(), codebook.double())
    torch.testing.assert_close(got[0], exact[0], rtol=0, atol=0)
    for name, ours, yardstick, oracle in zip(("z", "codebook"), got[1:], plain[1:], exact[1:]):
        err = (ours.double() - oracle).abs().max().item()
        allowed = 2 * (yardstick.double() - oracle).abs().max().item() + F32_UNIT * oracle.abs().max().item()
        assert err <= allowed, f"grad {name}: error {err} > {allowed}"


def _distance_grads(backend, z, codebook, grad_output):
    z = z.detach().requires_grad_()
    codebook = codebook.detach().requires_grad_()
    indices, sq_dist = kepler.nearest_codeword(z, codebook, backend=backend)
    sq_dist.backward(grad_output)
    return indices, z.grad, codebook.grad


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-group"])
@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_gradients_match_reference(device, backend, shared, dtype):
    groups, rows, codes, dim = 2, 29, 7, 12
    z = torch.randn(groups, rows, dim, device=device).to(dtype)
    codebook = torch.randn(*(() if shared else (groups,)), codes, dim, device=device).to(dtype)
    grad_output = torch.randn(groups, rows, device=device)
    expected = _distance_grads("reference", z, codebook, grad_output)
    got = _distance_grads(backend, z, codebook, grad_output)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    assert got[1].dtype == dtype and got[2].dtype == dtype
    torch.testing.assert_close(got[1], expected[1])
    torch.testing.assert_close(got[2], expected[2])
    # Against the float64 formula: grad_z = 2 g (z - e_idx), grad_e[k] = -sum over rows at k.
    z64, codebook64 = z.double(), codebook.double()
    residual = 2 * grad_output.double().unsqueeze(-1) * (z64 - _winners(_as_groups(z64, codebook64)[1], expected[0]))
    codebook_grad64 = torch.zeros(groups if not shared else 1, codes, dim, dtype=torch.float64, device=device)
    for g in range(groups):
        codebook_grad64[0 if shared else g].index_add_(0, expected[0][g], -residual[g])
    for grad, exact in ((got[1], residual), (got[2], codebook_grad64.reshape(codebook.shape))):
        # float32 sums, then one rounding to the input dtype: allow twice that dtype's rounding.
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(grad.double(), exact, rtol=2 * eps, atol=2 * eps * exact.abs().max().item())


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_codebook_gradient_is_deterministic(device, backend):
    # Many rows per codeword, so the accumulation order matters if it is not fixed.
    z = torch.randn(4, 600, 16, device=device)
    codebook = torch.randn(5, 16, device=device)
    grad_output = torch.randn(4, 600, device=device)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = _distance_grads(backend, z, codebook, grad_output)[2]
        second = _distance_grads(backend, z, codebook, grad_output)[2]
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    assert torch.equal(first, second)


def test_indices_are_not_differentiable():
    z = torch.randn(5, 3, requires_grad=True)
    indices, sq_dist = kepler.nearest_codeword(z, torch.randn(4, 3), backend="reference")
    assert not indices.requires_grad and sq_dist.requires_grad


# ---------------------------------------------------------------------------------------------
# Registered ops and torch.compile
# ---------------------------------------------------------------------------------------------


def _registered_ops(device):
    ops = []
    if device == "cpu" and kepler.HAS_CPU_EXT or device == "cuda" and kepler.HAS_CUDA_EXT:
        ops.append(torch.ops.kepler.nearest_codeword.default)
    if _backend._unavailable_reason("triton", device) is None:
        ops.append(torch.ops.kepler.nearest_codeword_triton.default)
    return ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("codebook_groups", [1, 3], ids=["shared", "per-group"])
@pytest.mark.parametrize("device", device_params())
def test_opcheck(device, codebook_groups, dtype):
    ops = _registered_ops(device)
    if not ops:
        pytest.skip(f"no kepler nearest_codeword op can run on {device} here")
    z = torch.randn(3, 13, 9, device=device, dtype=dtype)
    codebook = torch.randn(codebook_groups, 70, 9, device=device, dtype=dtype)
    for op in ops:
        # Inputs without requires_grad: the ops have no autograd formula of their own, gradients
        # come from NearestCodewordFunction around them (test_autograd_registration needs grads).
        torch.library.opcheck(op, (z, codebook), test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
        torch.library.opcheck(op, (z[:, :0], codebook), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_compiles_without_graph_breaks(device, backend):
    def quantize_loss(z, codebook):
        indices, sq_dist = kepler.nearest_codeword(z, codebook, backend=backend)
        return indices, sq_dist.mean()

    torch._dynamo.reset()
    compiled = torch.compile(quantize_loss, fullgraph=True)
    z = torch.randn(2, 33, 8, device=device, requires_grad=True)
    codebook = torch.randn(70, 8, device=device, requires_grad=True)
    indices, loss = compiled(z, codebook)
    loss.backward()
    expected_indices, expected_loss = quantize_loss(z, codebook)
    torch.testing.assert_close(indices, expected_indices, rtol=0, atol=0)
    torch.testing.assert_close(loss, expected_loss)
    assert z.grad is not None and codebook.grad is not None


# ---------------------------------------------------------------------------------------------
# Backend choice and bad input
# ---------------------------------------------------------------------------------------------


def test_float64_runs_on_the_reference_only(monkeypatch):
    monkeypatch.delenv("KEPLER_BACKEND", raising=False)
    z, codebook = torch.randn(5, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    indices, sq_dist = kepler.nearest_codeword(z, codebook)  # auto falls back to the reference
    assert sq_dist.dtype == torch.float64
    torch.testing.assert_close(indices, nearest_codeword_ref(z, codebook)[0], rtol=0, atol=0)
    explicit = [b for b in kepler.available_backends("cpu") if b != "reference"]
    for backend in explicit:
        with pytest.raises(TypeError, match=f"backend '{backend}' cannot run nearest_codeword on torch.float64 inputs: it takes float32, bfloat16 or float16"):
            kepler.nearest_codeword(z, codebook, backend=backend)


@pytest.mark.skipif(not kepler.HAS_CPU_EXT, reason="kepler._C is not built")
def test_missing_compiled_kernel_is_an_unavailable_backend(monkeypatch):
    monkeypatch.delenv("KEPLER_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "compiled_kernel_registered", lambda op, device_type: False)
    z, codebook = torch.randn(5, 3), torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="backend 'cpu' is not available: kepler._C has no nearest_codeword kernel"):
        kepler.nearest_codeword(z, codebook, backend="cpu")
    torch.testing.assert_close(kepler.nearest_codeword(z, codebook)[0], nearest_codeword_ref(z, codebook)[0])


def test_fp32_dot_precision_follows_the_matmul_setting():
    kernels = pytest.importorskip("kepler.kernels.nearest_codeword")
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert kernels.fp32_dot_precision(torch.device("cuda")) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert kernels.fp32_dot_precision(torch.device("cuda")) == "tf32"
        assert kernels.fp32_dot_precision(torch.device("cpu")) == "ieee"
    finally:
        torch.set_float32_matmul_precision(previous)


BAD_INPUTS = [
    (lambda: ([[1.0]], torch.randn(2, 1)), TypeError, "z must be a torch.Tensor, got list"),
    (lambda: (torch.randn(3, 2), None), TypeError, "codebook must be a torch.Tensor, got NoneType"),
    (lambda: (torch.randn(5), torch.randn(4, 5)), ValueError, r"z must be \(N, D\) or \(G, N, D\), got shape \(5,\)"),
    (lambda: (torch.randn(1, 2, 3, 4), torch.randn(4, 4)), ValueError, r"z must be .* got shape \(1, 2, 3, 4\)"),
    (lambda: (torch.randn(3, 4), torch.randn(4)), ValueError, r"codebook must be \(K, D\) or \(G, K, D\), got shape \(4,\)"),
    (lambda: (torch.randn(3, 4), torch.randn(5, 3)), ValueError, "codebook has D=3 features but z has D=4"),
    (lambda: (torch.randn(3, 0), torch.randn(5, 0)), ValueError, "z must have D >= 1 features, got D=0"),
    (lambda: (torch.randn(3, 4), torch.randn(0, 4)), ValueError, "codebook must hold at least one codeword, got K=0"),
    (lambda: (torch.randn(2, 3, 4), torch.randn(3, 5, 4)), ValueError, "codebook has G=3 groups but z has G=2"),
    (lambda: (torch.randn(3, 4), torch.randn(2, 5, 4)), ValueError, r"a per-group codebook \(2, 5, 4\) needs grouped z"),
    (lambda: (torch.ones(3, 4, dtype=torch.int64), torch.randn(2, 4)), TypeError, "z must be float32, bfloat16, float16 or float64, got torch.int64"),
    (lambda: (torch.randn(3, 4), torch.ones(2, 4, dtype=torch.bool)), TypeError, "codebook must be float32, bfloat16, float16 or float64, got torch.bool"),
    (lambda: (torch.randn(3, 4), torch.randn(2, 4).half()), TypeError, "z and codebook must have the same dtype, got torch.float32 and torch.float16"),
    (lambda: (torch.randn(3, 4), torch.randn(2, 4, device="meta")), ValueError, "z and codebook must be on the same device, got cpu and meta"),
]  # fmt: skip


@pytest.mark.parametrize("make_inputs, error, message", BAD_INPUTS)
def test_bad_inputs_are_named(make_inputs, error, message):
    z, codebook = make_inputs()
    with pytest.raises(error, match=message):
        kepler.nearest_codeword(z, codebook, backend="reference")


def test_unavailable_backend_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        kepler.nearest_codeword(torch.randn(3, 4), torch.randn(2, 4), backend="cuda")
    with pytest.raises(RuntimeError, match="backend 'triton' is not available"):
        kepler.nearest_codeword(torch.randn(3, 4), torch.randn(2, 4), backend="triton")
    with pytest.raises(ValueError, match="unknown backend argument 'gpu'"):
        kepler.nearest_codeword(torch.randn(3, 4), torch.randn(2, 4), backend="gpu")


# ---------------------------------------------------------------------------------------------
# Properties (Hypothesis): random shapes, dtypes, layouts, magnitudes 1e-20..1e19, NaN/inf, ties
# ---------------------------------------------------------------------------------------------


@st.composite
def search_cases(draw):
    """(z, codebook, exact): z (N, D) or (G, N, D), a shared or per-group codebook of one dtype.
    Integer codebooks get integer z at the same power of two, whose scores are exact (``exact``)."""
    grouped = draw(st.booleans())
    groups = draw(st.integers(1, 3)) if grouped else None
    rows, codes, dim = draw(st.integers(0, 40)), draw(st.integers(1, 70)), draw(st.integers(1, 80))
    codebook_spec = draw(value_specs())
    z_spec = draw(value_specs(dtypes=(codebook_spec.dtype,)))
    exact = codebook_spec.kind != "gaussian"
    if exact:
        z_spec = dataclasses.replace(z_spec, kind="integers", exponent=codebook_spec.exponent)
    lead = () if groups is None else (groups,)
    per_group = grouped and draw(st.booleans())
    z = z_spec.build((*lead, rows, dim))
    codebook = codebook_spec.build((*(lead if per_group else ()), codes, dim))
    return z, codebook, exact


# NaN/inf inputs make numpy (the Triton interpreter) warn; those warnings are expected here.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_random_inputs_match_the_float64_reference(device, backend, poisoned_empty):
    @settings(max_examples=property_examples(device, backend))
    @given(case=search_cases())
    def check(case):
        z, codebook, exact = (value.to(device) if torch.is_tensor(value) else value for value in case)
        indices, sq_dist = kepler.nearest_codeword(z, codebook, backend=backend)
        assert_matches_oracle(z, codebook, indices, sq_dist, exact=exact)

    check()
