"""kepler.losses.packing_energy: every backend against the float64 reference, autograd, ops, physics.

The oracle is ``packing_energy_ref`` run in float64 on the very values the backend saw (bfloat16
and float16 inputs are upcast exactly). Tolerances follow the "no worse than 2x plain PyTorch at
the same precision" rule: a backend's error against the oracle may be at most twice the error of
the reference itself run on the input dtype (float32 internally, like the kernels), plus a floor
of rounding units of the output dtype (grown like sqrt(K d)) for where the plain error is ~0.
"""

import dataclasses
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kepler
from kepler import _backend
from kepler.losses import packing_energy
from kepler.ops.packing_energy import PackingEnergyFunction
from kepler.reference.packing_energy import MIN_SPREAD_SQ, normalize_codebook, packing_energy_raw_ref, packing_energy_ref

from conftest import (
    F32_UNIT,
    GPU_APPROX_FN_REL_ERROR,
    device_backend_params,
    device_params,
    float32_sum_error_bound,
    huge_column_stride_view,
    property_examples,
)

LOW_PRECISION = (torch.bfloat16, torch.float16)


from strategies import value_specs  # noqa: E402

DEVICE_BACKENDS = device_backend_params()
FUSED_DEVICE_BACKENDS = [p for p in DEVICE_BACKENDS if p.values[1] != "reference"]

GROUPS = (1, 8)
CODEWORDS = (2, 3, 67, 257)  # 67 and 257 are no multiple of any tile; 257 spans several tiles
DIMS = (1, 3, 8, 24, 64)
ALL_SHAPES = list(itertools.product(GROUPS, CODEWORDS, DIMS))
# The Triton interpreter is slow: on the CPU the triton backend gets a subset that still has every
# G, K and d above, one- and many-tile cases, and d chunks of 16, 32 and 64 with padding.
INTERPRETED_TRITON_SHAPES = [
    (1, 2, 1), (8, 3, 3), (1, 67, 8), (8, 67, 24), (1, 257, 64), (8, 2, 64), (1, 257, 3), (8, 3, 8),
]  # fmt: skip


def _shape_params():
    params = []
    for param in DEVICE_BACKENDS:
        device, backend = param.values
        interpreted = backend == "triton" and device == "cpu"
        for groups, codewords, dim in INTERPRETED_TRITON_SHAPES if interpreted else ALL_SHAPES:
            params.append(
                pytest.param(
                    device, backend, groups, codewords, dim, marks=param.marks, id=f"{device}-{backend}-G{groups}-K{codewords}-d{dim}"
                )
            )
    return params




def _energy_and_grad(fn, codebook, weights):
    """fn(codebook) and the gradient of sum(fn(codebook) * weights) with respect to codebook."""
    leaf = codebook.detach().requires_grad_(True)
    energy = fn(leaf)
    (grad,) = torch.autograd.grad((energy * weights.to(energy.dtype)).sum(), leaf)
    return energy.detach(), grad


def _oracle(codebook, t, normalize, weights):
    """float64 energy and gradient on the exact input values, one group at a time (bounded memory)."""
    exact = codebook.detach().cpu().double()
    grouped = exact.dim() == 3
    energies, grads = [], []
    for group, weight in zip(exact if grouped else exact.unsqueeze(0), weights.cpu().double().reshape(-1)):
        energy, grad = _energy_and_grad(lambda c: packing_energy_ref(c, t, normalize), group, weight)
        energies.append(energy)
        grads.append(grad)
    energy, grad = torch.stack(energies), torch.stack(grads)
    return (energy, grad) if grouped else (energy[0], grad[0])


def assert_matches_oracle(codebook, t, normalize, backend, weights=None):
    """The backend's energy and gradient against the float64 oracle, within 2x the plain error."""
    if weights is None:
        weights = torch.randn(codebook.shape[:-2], device=codebook.device)
    energy, grad = _energy_and_grad(lambda c: packing_energy(c, t=t, normalize=normalize, backend=backend), codebook, weights)
    expected_dtype = torch.float64 if codebook.dtype == torch.float64 else torch.float32
    assert energy.dtype == expected_dtype and energy.shape == codebook.shape[:-2]
    assert grad.dtype == codebook.dtype and grad.shape == codebook.shape
    plain_energy, plain_grad = _energy_and_grad(lambda c: packing_energy_ref(c, t, normalize), codebook, weights)
    oracle_energy, oracle_grad = _oracle(codebook, t, normalize, weights)

    # Floor for where the plain error is ~0 by luck: a fused value sums K*d rounded terms (d per
    # distance, K per row), in a different order than the plain way; random-walk growth sqrt(K d).
    growth = math.sqrt(codebook.shape[-2] * codebook.shape[-1])

    # The fused backward sums w_ij (y_i - y_j) over j as y_i sum_j w_ij - sum_j w_ij y_j: without
    # normalization its rounding is relative to 2 t |y|, not to the gradient, which cancels to ~0
    # where the nearest pairs coincide (repeated codewords far from the origin).
    raw_terms = 0.0 if normalize else 2 * t * codebook.detach().abs().max().item() * weights.abs().max().item()

    def check(name, ours, plain, oracle, unit):
        ours, plain = ours.cpu().double(), plain.cpu().double()
        assert torch.isfinite(ours).all(), f"{name}: non-finite values (unwritten output?)"
        scale = oracle.abs().max().item() if oracle.numel() else 0.0
        scale = max(scale, raw_terms) if name == "grad" else scale
        floor = 4 * unit * growth * max(scale, 1.0 if name == "energy" else 0.0)
        allowed = 2 * (plain - oracle).abs().max().item() + floor
        error = (ours - oracle).abs().max().item() if oracle.numel() else 0.0
        assert error <= allowed, f"{name}: max error {error:.3e} > allowed {allowed:.3e} (plain {plain.dtype})"

    check("energy", energy, plain_energy, oracle_energy, torch.finfo(expected_dtype).eps)
    check("grad", grad, plain_grad, oracle_grad, torch.finfo(codebook.dtype).eps)


def _codebook(shape, device, dtype=torch.float32, offset=0.0):
    """Random codewords of typical VQ scale, optionally far from the origin."""
    return (torch.randn(shape, device=device) / math.sqrt(shape[-1]) + offset).to(dtype)


# ---------------------------------------------------------------------------------------------
# Values and gradients against the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device, backend, groups, codewords, dim", _shape_params())
def test_float32_matches_reference(device, backend, groups, codewords, dim, poisoned_empty):
    codebook = _codebook((groups, codewords, dim), device)
    assert_matches_oracle(codebook, 1.0, True, backend)


@pytest.mark.parametrize("t", [0.1, 3.0])
@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_unnormalized_matches_reference(device, backend, t, poisoned_empty):
    # Far from the origin: the fused ||a||^2 + ||b||^2 - 2ab distances must not lose the spread.
    codebook = _codebook((3, 67, 8), device, offset=5.0)
    assert_matches_oracle(codebook, t, False, backend)
    assert_matches_oracle(codebook[0], t, False, backend)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "raw"])
@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_low_precision_matches_reference(device, backend, normalize, dtype, poisoned_empty):
    codebook = _codebook((2, 67, 24), device, dtype)
    assert_matches_oracle(codebook, 1.0, normalize, backend)


@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "raw"])
@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_non_contiguous_and_offset_inputs(device, backend, normalize, poisoned_empty):
    buffer = _codebook((3, 20, 140), device)
    codebook = buffer[:, 2:10, 3::2].transpose(1, 2)  # (3, 69, 8): strided, transposed, offset
    assert not codebook.is_contiguous() and codebook.storage_offset() > 0
    assert_matches_oracle(codebook, 0.5, normalize, backend)
    assert_matches_oracle(codebook[1], 0.5, normalize, backend)


def test_triton_column_offsets_past_int32():
    """Codewords whose column offsets pass 2**31 elements (a transposed view with K * d > 2**31) give
    the energy and gradient of the same values contiguous.

    Run end to end in the interpreter, which multiplies int32 offsets in int32 like a GPU does, on a
    real view of an 8 GiB address space (see ``huge_column_stride_view``) rather than by checking
    the offset expression's dtype: that would pass for a cast in the wrong place, this cannot.
    """
    if _backend._unavailable_reason("triton", "cpu"):
        pytest.skip("the triton backend cannot run on the CPU here")
    codebook = _codebook((67, 3), "cpu", torch.float16)
    weights = torch.tensor(1.5)
    expected = _energy_and_grad(lambda c: packing_energy(c, t=0.5, normalize=False, backend="triton"), codebook, weights)
    got = _energy_and_grad(
        lambda c: packing_energy(c, t=0.5, normalize=False, backend="triton"), huge_column_stride_view(codebook), weights
    )
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_groups_are_independent(device, backend):
    codebook = _codebook((4, 33, 5), device)
    grouped = packing_energy(codebook, backend=backend)
    single = torch.stack([packing_energy(group, backend=backend) for group in codebook])
    assert grouped.shape == (4,) and single.shape == (4,)
    torch.testing.assert_close(grouped, single)


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_empty_groups(device, backend):
    codebook = torch.randn(0, 5, 3, device=device, requires_grad=True)
    energy = packing_energy(codebook, backend=backend)
    assert energy.shape == (0,) and energy.dtype == torch.float32
    energy.sum().backward()
    assert codebook.grad.shape == codebook.shape


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_scale_and_translation_invariance(device, backend):
    codebook = _codebook((2, 40, 6), device)
    shift = torch.randn(6, device=device)
    base = packing_energy(codebook, backend=backend)
    for scale in (1e-3, 7.0):
        moved = packing_energy(scale * codebook + shift, backend=backend)
        torch.testing.assert_close(moved, base, rtol=1e-5, atol=1e-5)
    # Without normalization, inflating the codebook lowers the energy (the loophole it closes).
    raw = packing_energy(codebook, normalize=False, backend=backend)
    inflated = packing_energy(3.0 * codebook, normalize=False, backend=backend)
    assert (inflated < raw).all()


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_scale_invariance_near_the_float32_range(device, backend):
    """||c||^2 of codewords near 1e19 and beyond overflows float32: s^2 must not become inf (E = 0)."""
    codebook = _codebook((2, 40, 6), device).requires_grad_(True)
    base = packing_energy(codebook, backend=backend)
    (base_grad,) = torch.autograd.grad(base.sum(), codebook)
    for scale in (1e19, 1e30, 1e37):
        big = (codebook.detach() * scale).requires_grad_(True)
        moved = packing_energy(big, backend=backend)
        torch.testing.assert_close(moved, base.detach(), rtol=1e-5, atol=1e-5)
        (grad,) = torch.autograd.grad(moved.sum(), big)
        # E(scale c) = E(c), so its gradient is base_grad / scale.
        torch.testing.assert_close(grad * scale, base_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_coincident_codewords(device, backend):
    """All codewords equal: s^2 = 0 is floored at MIN_SPREAD_SQ, E = log(1) = 0, gradient finite."""
    codebook = torch.full((2, 9, 4), 0.1, device=device).requires_grad_(True)
    energy = packing_energy(codebook, backend=backend)
    torch.testing.assert_close(energy, torch.zeros(2, device=device), rtol=0, atol=1e-6)
    energy.sum().backward()
    assert torch.isfinite(codebook.grad).all()
    exact = codebook.detach().double()
    assert (exact - exact.mean(dim=-2, keepdim=True)).square().sum(-1).mean() < MIN_SPREAD_SQ  # the floor applied
    assert normalize_codebook(exact, True).abs().max() < 1e-3  # mapped to ~0, not blown up to rounding noise


@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "raw"])
@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_nan_propagates_like_the_reference(device, backend, normalize):
    """NaN inputs give NaN energies and gradients exactly where the reference does.

    Group 0 has a NaN coordinate in every codeword, so every row's scores are all NaN (the case a
    running maximum taken with '>' skips, which gave row_lse = -inf and energy = -inf); group 1 has
    one NaN coordinate (raw: one all-NaN row; normalized: the NaN mean makes every point NaN);
    group 2 is finite and must stay so.
    """
    codebook = _codebook((3, 5, 3), device)
    codebook[0, :, 1] = math.nan
    codebook[1, 2, 0] = math.nan
    weights = torch.ones(3, device=device)
    energy, grad = _energy_and_grad(lambda c: packing_energy(c, t=1.0, normalize=normalize, backend=backend), codebook, weights)
    expected_energy, expected_grad = _oracle(codebook, 1.0, normalize, weights)
    assert expected_energy[:2].isnan().all() and expected_energy[2].isfinite()  # what the reference says
    assert torch.equal(energy.isnan().cpu(), expected_energy.isnan()), f"energy {energy}, reference {expected_energy}"
    assert torch.equal(grad.isnan().cpu(), expected_grad.isnan())
    assert energy[2].isfinite() and grad[2].isfinite().all()


def test_reference_formula_by_hand():
    """Two codewords at distance r: E = log(exp(-t r^2 / s^2)) with s^2 = r^2 / 4 when normalized."""
    codebook = torch.tensor([[0.0, 0.0], [3.0, 4.0]], dtype=torch.float64)
    assert packing_energy_ref(codebook, 0.5, False).item() == pytest.approx(-0.5 * 25.0)
    assert packing_energy_ref(codebook, 0.5, True).item() == pytest.approx(-0.5 * 4.0)
    energy, row_lse = packing_energy_raw_ref(codebook.unsqueeze(0), 0.5)
    torch.testing.assert_close(row_lse, torch.full((1, 2), -12.5, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# The registered ops themselves
# ---------------------------------------------------------------------------------------------


def _registered_ops(device):
    """(forward op, backward op, dtypes it takes) available on ``device``."""
    ops = []
    if device == "cpu" and kepler.HAS_CPU_EXT or device == "cuda" and kepler.HAS_CUDA_EXT:
        ops.append(
            (torch.ops.kepler.packing_energy.default, torch.ops.kepler.packing_energy_backward.default, (torch.float32, torch.float64))
        )
    if _backend._unavailable_reason("triton", device) is None:
        ops.append(
            (torch.ops.kepler.packing_energy_triton.default, torch.ops.kepler.packing_energy_backward_triton.default, (torch.float32,))
        )
    return ops


@pytest.mark.parametrize("device", device_params())
def test_ops_return_row_log_sum_exps(device, poisoned_empty):
    ops = _registered_ops(device)
    if not ops:
        pytest.skip(f"no kepler packing_energy op can run on {device} here")
    t, (groups, codewords, dim) = 0.8, (3, 70, 5)
    points = torch.randn(groups, codewords, dim, device=device)
    expected_energy, expected_row_lse = packing_energy_raw_ref(points.double(), t)
    # Worst-case float32 error, valid for the exact sum of squared differences (cpu, cuda) and for
    # ||a||^2 + ||b||^2 - 2 a.b on centred points (triton): each score -t d_ij is off by at most
    # t gamma_{d+3} (||a_i||^2 + ||a_j||^2 + 2 sum_k |a_ik a_jk|) (centring, products, sums, the
    # combination); log-sum-exp is 1-Lipschitz in the scores, and adds a K-term sum of positive
    # terms, approximate exp/log on a GPU and the final rounding.
    centred = points.double().cpu() - points.double().cpu().mean(dim=1, keepdim=True)
    sq_norms = centred.square().sum(-1)
    abs_terms = sq_norms.unsqueeze(-1) + sq_norms.unsqueeze(-2) + 2 * torch.einsum("gik,gjk->gij", centred.abs(), centred.abs())
    score_error = t * float32_sum_error_bound(dim + 3, abs_terms.amax(dim=-1))  # (G, K), per row
    lse_error = float32_sum_error_bound(codewords, 1.0) + 2 * GPU_APPROX_FN_REL_ERROR
    allowed_row_lse = score_error + lse_error + F32_UNIT * expected_row_lse.abs()
    allowed_energy = allowed_row_lse.amax(dim=-1) + lse_error + F32_UNIT * expected_energy.abs()
    for forward, _, _ in ops:
        energy, row_lse = forward(points, t)
        assert energy.dtype == row_lse.dtype == torch.float32 and row_lse.shape == (groups, codewords)
        assert ((energy.double().cpu() - expected_energy).abs() <= allowed_energy).all(), (energy, expected_energy)
        assert ((row_lse.double().cpu() - expected_row_lse).abs() <= allowed_row_lse).all()


@pytest.mark.parametrize("device", device_params())
def test_opcheck(device):
    ops = _registered_ops(device)
    if not ops:
        pytest.skip(f"no kepler packing_energy op can run on {device} here")
    for forward, backward, dtypes in ops:
        for dtype in dtypes + (torch.bfloat16,):
            points = torch.randn(2, 19, 3, device=device, dtype=dtype)
            energy, row_lse = forward(points, 1.5)
            grad_energy = torch.randn(2, device=device, dtype=energy.dtype)
            # Inputs without requires_grad: the ops have no autograd formula of their own, gradients
            # come from PackingEnergyFunction around them (test_autograd_registration needs grads).
            utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
            torch.library.opcheck(forward, (points, 1.5), test_utils=utils)
            torch.library.opcheck(backward, (grad_energy, points, 1.5, energy, row_lse), test_utils=utils)
            torch.library.opcheck(forward, (points[:0], 1.5), test_utils=("test_schema", "test_faketensor"))


# float64 runs on the reference and on the compiled kernels; the Triton kernels take float32,
# bfloat16 and float16 only (test_triton_refuses_float64), so they are compared in float32 above.
@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "raw"])
@pytest.mark.parametrize(
    "device, backend", [p for p in DEVICE_BACKENDS if p.values[1] in ("reference", "cpu", "cuda")]
)
def test_gradcheck_float64(device, backend, normalize):
    codebook = torch.randn(2, 7, 3, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c: packing_energy(c, t=0.7, normalize=normalize, backend=backend), (codebook,))
    if backend != "reference":
        points = codebook.detach().clone().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda y: PackingEnergyFunction.apply(y, 0.7, backend), (points,))


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_compiles_without_graph_breaks(device, backend):
    def loss(codebook):
        return packing_energy(codebook, t=2.0, backend=backend).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    codebook = _codebook((2, 45, 8), device).requires_grad_(True)
    value = compiled(codebook)
    (grad,) = torch.autograd.grad(value, codebook)
    expected_value = loss(codebook)
    (expected_grad,) = torch.autograd.grad(expected_value, codebook)
    torch.testing.assert_close(value, expected_value)
    torch.testing.assert_close(grad, expected_grad)


# ---------------------------------------------------------------------------------------------
# Physics: minimizing the energy spreads the codewords
# ---------------------------------------------------------------------------------------------


def _min_pairwise_distance(points):
    dist = torch.cdist(points, points)
    return dist.masked_fill(torch.eye(len(points), dtype=torch.bool, device=points.device), math.inf).min()


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_gradient_descent_spreads_points(device, backend):
    """From a clumped random 3-D start, descent on E pushes close pairs apart: the smallest
    normalized pairwise distance grows and E falls, the drive toward dense packings."""
    start = torch.randn(48, 3, device=device)
    start[:8] = start[0] + 0.01 * torch.randn(8, 3, device=device)  # a tight clump
    codebook = start.clone().requires_grad_(True)
    optimizer = torch.optim.SGD([codebook], lr=2.0)
    energies = []
    for _ in range(40):
        optimizer.zero_grad()
        energy = packing_energy(codebook, t=2.0, backend=backend)
        energy.backward()
        optimizer.step()
        energies.append(energy.item())
    before = _min_pairwise_distance(normalize_codebook(start.unsqueeze(0), True)[0])
    after = _min_pairwise_distance(normalize_codebook(codebook.detach().unsqueeze(0), True)[0])
    assert after > 10 * before, f"min distance {before:.4f} -> {after:.4f}"
    assert energies[-1] < energies[0] - 0.1, f"energy {energies[0]:.4f} -> {energies[-1]:.4f}"


# ---------------------------------------------------------------------------------------------
# Backend choice and bad input
# ---------------------------------------------------------------------------------------------


def test_triton_refuses_float64(monkeypatch):
    if _backend._unavailable_reason("triton", "cpu") is not None:
        pytest.skip("the triton backend cannot run on CPU tensors here")
    codebook = torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="backend 'triton' cannot run packing_energy on torch.float64 inputs: it takes float32, bfloat16 or float16"):
        packing_energy(codebook, backend="triton")


@pytest.mark.skipif(not kepler.HAS_CPU_EXT, reason="kepler._C is not built")
def test_missing_compiled_kernel_is_an_unavailable_backend(monkeypatch):
    monkeypatch.delenv("KEPLER_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "compiled_kernel_registered", lambda op, device_type: False)
    codebook = torch.randn(5, 3)
    with pytest.raises(RuntimeError, match="backend 'cpu' is not available: kepler._C has no packing_energy kernel"):
        packing_energy(codebook, backend="cpu")
    torch.testing.assert_close(packing_energy(codebook), packing_energy_ref(codebook))


BAD_INPUTS = [
    (lambda: ([[0.0, 1.0]], {}), TypeError, "codebook must be a torch.Tensor, got list"),
    (lambda: (torch.randn(5), {}), ValueError, r"codebook must be \(K, d\) or \(G, K, d\), got shape \(5,\)"),
    (lambda: (torch.randn(1, 2, 3, 4), {}), ValueError, r"codebook must be .* got shape \(1, 2, 3, 4\)"),
    (lambda: (torch.ones(3, 2, dtype=torch.int64), {}), TypeError, "codebook must be float32, bfloat16, float16 or float64, got torch.int64"),
    (lambda: (torch.randn(1, 4), {}), ValueError, r"codebook needs at least 2 codewords \(K >= 2\) for pairwise energies, got K=1"),
    (lambda: (torch.randn(2, 0, 4), {}), ValueError, "got K=0"),
    (lambda: (torch.randn(3, 0), {}), ValueError, "codebook must have d >= 1 dimensions, got d=0"),
    (lambda: (torch.randn(3, 2), {"t": 0.0}), ValueError, "t must be finite and > 0, got 0.0"),
    (lambda: (torch.randn(3, 2), {"t": -1}), ValueError, "t must be finite and > 0, got -1"),
    (lambda: (torch.randn(3, 2), {"t": math.inf}), ValueError, "t must be finite and > 0, got inf"),
    (lambda: (torch.randn(3, 2), {"t": "1"}), TypeError, "t must be a real number, got str"),
    (lambda: (torch.randn(3, 2), {"t": True}), TypeError, "t must be a real number, got bool"),
    (lambda: (torch.randn(3, 2), {"normalize": 1}), TypeError, "normalize must be a bool, got int"),
]  # fmt: skip


@pytest.mark.parametrize("make_inputs, error, message", BAD_INPUTS)
def test_bad_inputs_are_named(make_inputs, error, message):
    codebook, kwargs = make_inputs()
    with pytest.raises(error, match=message):
        packing_energy(codebook, backend="reference", **kwargs)


def test_unavailable_backend_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        packing_energy(torch.randn(3, 4), backend="cuda")
    with pytest.raises(RuntimeError, match="backend 'triton' is not available"):
        packing_energy(torch.randn(3, 4), backend="triton")
    with pytest.raises(ValueError, match="unknown backend argument 'gpu'"):
        packing_energy(torch.randn(3, 4), backend="gpu")


@pytest.mark.parametrize("device", device_params())
def test_compiled_ops_check_their_input(device):
    if not (device == "cpu" and kepler.HAS_CPU_EXT or device == "cuda" and kepler.HAS_CUDA_EXT):
        pytest.skip(f"kepler._C has no {device} kernels here")
    points = torch.randn(2, 5, 3, device=device)
    with pytest.raises(RuntimeError, match=r"kepler::packing_energy: needs K >= 2 codewords, got K=1"):
        torch.ops.kepler.packing_energy(points[:, :1], 1.0)
    with pytest.raises(RuntimeError, match=r"kepler::packing_energy: t must be finite and > 0, got -1"):
        torch.ops.kepler.packing_energy(points, -1.0)
    with pytest.raises(RuntimeError, match=r"kepler::packing_energy: y must be 3-D \(G, K, d\), got a 2-D tensor"):
        torch.ops.kepler.packing_energy(points[0], 1.0)
    energy, row_lse = torch.ops.kepler.packing_energy(points, 1.0)
    with pytest.raises(RuntimeError, match=r"row_lse must be \(G, K\) = \(2, 5\)"):
        torch.ops.kepler.packing_energy_backward(torch.ones(2, device=device), points, 1.0, energy, row_lse[:, :4])


# ---------------------------------------------------------------------------------------------
# Properties (Hypothesis): random shapes, dtypes, layouts, magnitudes 1e-20..1e19, NaN/inf, ties
# ---------------------------------------------------------------------------------------------


@st.composite
def energy_cases(draw):
    """(codebook (K, d) or (G, K, d), t, normalize); "repeated" codebooks hold coincident codewords."""
    lead = draw(st.sampled_from([(), (1,), (3,)]))
    shape = (*lead, draw(st.integers(2, 40)), draw(st.integers(1, 40)))
    spec = draw(value_specs())
    normalize = draw(st.booleans())
    if not normalize:
        # Raw energies are -t ||y_i - y_j||^2 and gradients 2 t (y_i - y_j): kept within the
        # input dtype's range (normalized codebooks take every magnitude).
        spec = dataclasses.replace(spec, exponent=min(spec.exponent, 4 if spec.dtype == torch.float16 else 40))
    return spec.build(shape), draw(st.sampled_from([0.1, 1.0, 7.0])), normalize


# NaN/inf inputs make numpy (the Triton interpreter) warn; those warnings are expected here.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_random_inputs_match_the_float64_reference(device, backend, poisoned_empty):
    @settings(max_examples=property_examples(device, backend))
    @given(case=energy_cases())
    def check(case):
        codebook, t, normalize = case
        codebook = codebook.to(device)
        oracle = packing_energy_ref(codebook.double().cpu(), t, normalize)
        if codebook.isfinite().all() and oracle.abs().le(torch.finfo(torch.float32).max).all():
            # fixed weights: the global RNG would make an example's replay differ from its first run
            weights = torch.linspace(1.0, -0.5, max(codebook[..., 0, 0].numel(), 1), device=device)
            assert_matches_oracle(codebook, t, normalize, backend, weights.reshape(codebook.shape[:-2]))
        else:  # NaN/inf codewords (the gradient is NaN) or an energy past float32's range (-inf)
            energy = packing_energy(codebook, t=t, normalize=normalize, backend=backend).cpu().double()
            past_range = oracle.isfinite() & (oracle.abs() > torch.finfo(torch.float32).max)
            expected = torch.where(past_range, -torch.inf, oracle)
            torch.testing.assert_close(energy, expected, equal_nan=True, rtol=1e-5, atol=1e-6)

    check()
