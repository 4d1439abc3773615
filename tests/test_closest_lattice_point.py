"""kepler.closest_lattice_point: every backend against the reference, edge cases, registered ops.

Two oracles. The float32 reference (``closest_lattice_point_ref`` on the values the backend saw,
upcast exactly) fixes every rounding (see its module docstring), so on inputs off the Voronoi
boundaries a backend must return exactly its points, at every magnitude. On the boundaries (points
with two closest lattice points, drawn on purpose) a backend may take either: there it must return a
lattice point at the brute-force minimum distance.
"""

import math

import pytest
import torch

import kepler
from kepler import _backend
from kepler.kernels._common import KERNEL_DTYPES
from kepler.lattice import get_lattice
from kepler.ops.closest_lattice_point import closest_lattice_point, lattice_family
from kepler.reference.closest_lattice_point import closest_lattice_point_ref

from conftest import device_backend_params, device_params
from test_lattice_codes import boundary_inputs, brute_force_sq_dist

DEVICE_BACKENDS = device_backend_params()
LATTICES = ("Z1", "Z3", "Z5", "A2", "D3", "D4", "E8")
ROWS = (1, 7, 257)  # 7 and 257 are no multiple of any block size


def random_rows(rows: int, dim: int, scale: float, seed: int) -> torch.Tensor:
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)) * scale


def expected_points(x: torch.Tensor, lattice: str) -> torch.Tensor:
    """The float32 reference on exactly the values ``x`` holds."""
    family, _ = lattice_family(lattice)
    return closest_lattice_point_ref(x.cpu().float(), family)


def assert_lattice_points(points: torch.Tensor, lattice: str) -> None:
    coefficients = get_lattice(lattice).coefficients(points.double().cpu())
    # A2's points are float32-rounded with a float32 sqrt(3) (irrational): off by a few ulps of
    # the largest coordinate.
    atol = 1e-6 + 2.0**-18 * coefficients.abs().max().item()
    assert torch.allclose(coefficients, coefficients.round(), rtol=0, atol=atol), "not a lattice point"


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("lattice", LATTICES)
@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_float32_matches_reference_exactly(device, backend, lattice, rows, poisoned_empty):
    dim = get_lattice(lattice).dim
    # Scales from well inside the first shell to 2**30, past where float32 holds x - 1/2 exactly
    # (the reference's roundings still decide there, and every backend follows them).
    for seed, scale in enumerate((0.3, 3.0, 2.0**12, 2.0**20, 2.0**30)):
        x = random_rows(rows, dim, scale, seed).to(device)
        found = closest_lattice_point(x, lattice, backend=backend)
        assert found.dtype == torch.float32 and found.shape == x.shape and found.device == x.device
        torch.testing.assert_close(found.cpu(), expected_points(x, lattice), rtol=0, atol=0)
        if scale < 2.0**21:
            assert_lattice_points(found, lattice)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("lattice", LATTICES)
@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_low_precision_inputs_are_upcast(device, backend, lattice, dtype, poisoned_empty):
    x = random_rows(300, get_lattice(lattice).dim, 3.0, 1).to(device=device, dtype=dtype)
    found = closest_lattice_point(x, lattice, backend=backend)
    assert found.dtype == torch.float32
    torch.testing.assert_close(found.cpu(), expected_points(x, lattice), rtol=0, atol=0)


@pytest.mark.parametrize("lattice", LATTICES)
@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_voronoi_boundaries_give_a_point_at_the_minimum_distance(device, backend, lattice):
    boundary = boundary_inputs(lattice)
    nudge = torch.randn(boundary.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 1e-6
    for x64 in (boundary, boundary + nudge, boundary - nudge):
        x = x64.float()
        found = closest_lattice_point(x.to(device), lattice, backend=backend).cpu()
        assert_lattice_points(found, lattice)
        exact = x.double()
        found_sq = (exact - found.double()).square().sum(1)
        # float32 inputs and A2's float32-rounded spacing: a few ulps of a distance below ~4.
        torch.testing.assert_close(found_sq, brute_force_sq_dist(lattice, exact), rtol=0, atol=1e-5)


@pytest.mark.parametrize("lattice", ("D4", "E8", "A2"))
@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_layouts_and_leading_dimensions(device, backend, lattice):
    dim = get_lattice(lattice).dim
    buffer = random_rows(40, 3 * dim + 5, 3.0, 2).to(device)
    views = {
        "offset columns": buffer[:, 5 : 5 + dim],
        "row step": buffer[::3, :dim],
        "column-major": buffer[:, :dim].t().contiguous().t(),
        "leading dims": buffer[:, : 2 * dim].reshape(40, 2, dim).transpose(0, 1),
    }
    for name, x in views.items():
        found = closest_lattice_point(x, lattice, backend=backend)
        assert found.shape == x.shape, name
        expected = expected_points(x.reshape(-1, dim), lattice).reshape(x.shape)
        torch.testing.assert_close(found.cpu(), expected, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("lattice", LATTICES)
@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_non_finite_rows_give_nan_rows(device, backend, lattice):
    dim = get_lattice(lattice).dim
    x = random_rows(6, dim, 3.0, 4)
    x[1, dim - 1] = math.nan
    x[3, 0] = math.inf
    x[4, :] = -math.inf
    found = closest_lattice_point(x.to(device), lattice, backend=backend).cpu()
    bad = torch.tensor([False, True, False, True, True, False])
    assert found[bad].isnan().all()
    torch.testing.assert_close(found[~bad], expected_points(x[~bad], lattice), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_empty_rows(device, backend, dtype):
    found = closest_lattice_point(torch.empty(0, 8, device=device, dtype=dtype), "E8", backend=backend)
    assert found.shape == (0, 8) and found.dtype == torch.float32


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_result_does_not_require_grad(device, backend):
    x = torch.randn(5, 4, device=device, requires_grad=True)
    assert not closest_lattice_point(x, "D4", backend=backend).requires_grad


def test_float64_runs_on_the_reference_only(monkeypatch):
    monkeypatch.delenv("KEPLER_BACKEND", raising=False)
    x = torch.randn(9, 8, dtype=torch.float64) * 3
    found = closest_lattice_point(x, "E8")
    assert found.dtype == torch.float64
    torch.testing.assert_close(found, closest_lattice_point_ref(x, "E8"), rtol=0, atol=0)
    for backend in [b for b in kepler.available_backends("cpu") if b != "reference"]:
        with pytest.raises(
            TypeError, match=f"backend '{backend}' cannot run closest_lattice_point on torch.float64 inputs"
        ):
            closest_lattice_point(x, "E8", backend=backend)


def test_errors():
    with pytest.raises(ValueError, match=r"lattice 'Leech' has no closest-point algorithm here; lattices with one: Z<n>, A2"):
        closest_lattice_point(torch.zeros(2, 24), "Leech")
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., 8\) for lattice 'E8', got shape \(4, 3\)"):
        closest_lattice_point(torch.zeros(4, 3), "E8")
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., 4\) for lattice 'D4', got shape \(\)"):
        closest_lattice_point(torch.tensor(1.0), "D4")
    with pytest.raises(TypeError, match="x must be float32, bfloat16, float16 or float64, got torch.int64"):
        closest_lattice_point(torch.zeros(4, 4, dtype=torch.int64), "D4")
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        closest_lattice_point([[0.0] * 4], "D4")
    with pytest.raises(ValueError, match="unknown lattice name 'F4'"):
        closest_lattice_point(torch.zeros(4, 4), "F4")
    with pytest.raises(ValueError, match="closest_lattice_point_ref: lattice must be one of Z, D, A2, E8, got 'B'"):
        closest_lattice_point_ref(torch.zeros(4, 4), "B")
    with pytest.raises(ValueError, match=r"closest_lattice_point_ref: E8 takes rows of 8, got x of shape \(4, 4\)"):
        closest_lattice_point_ref(torch.zeros(4, 4), "E8")
    with pytest.raises(ValueError, match=r"closest_lattice_point_ref: A2 takes rows of 2, got x of shape \(4, 8\)"):
        closest_lattice_point_ref(torch.zeros(4, 8), "A2")


def _registered_ops(device):
    ops = []
    if device == "cpu" and kepler.HAS_CPU_EXT or device == "cuda" and kepler.HAS_CUDA_EXT:
        if _backend.compiled_kernel_registered("closest_lattice_point", device):
            ops.append(torch.ops.kepler.closest_lattice_point.default)
    if _backend._unavailable_reason("triton", device) is None:
        ops.append(torch.ops.kepler.closest_lattice_point_triton.default)
    return ops


@pytest.mark.parametrize("family, dim", [("Z", 3), ("D", 4), ("A2", 2), ("E8", 8)])
@pytest.mark.parametrize("device", device_params())
def test_opcheck(device, family, dim):
    ops = _registered_ops(device)
    if not ops:
        pytest.skip(f"no kepler closest_lattice_point op can run on {device} here")
    x = torch.randn(37, dim, device=device) * 3
    for op in ops:
        torch.library.opcheck(op, (x, family), test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
        torch.library.opcheck(op, (x[:0], family), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("family, dim", [("A2", 3), ("E8", 4)])
@pytest.mark.parametrize("device", device_params())
def test_registered_ops_check_the_row_length(device, family, dim):
    ops = _registered_ops(device)
    if not ops:
        pytest.skip(f"no kepler closest_lattice_point op can run on {device} here")
    for op in ops:
        with pytest.raises(Exception, match=f"{family} takes rows of {2 if family == 'A2' else 8}"):
            op(torch.zeros(3, dim, device=device), family)
        with pytest.raises(Exception, match=r"lattice must be one of Z, D, A2, E8, got 'B'"):
            op(torch.zeros(3, dim, device=device), "B")


@pytest.mark.parametrize("family, dim", [("Z", 1), ("D", 1), ("D", 2), ("Z", 6), ("D", 17), ("D", 300), ("D", 1024)])
@pytest.mark.parametrize("device", device_params())
def test_registered_ops_take_any_row_length_for_z_and_d(device, family, dim):
    """Z^n and D_n at widths the lattice names do not reach: one element, non-powers of two, wide
    rows (the Triton kernel holds up to 1024 in one tile), with half-integral rows for ties."""
    ops = _registered_ops(device)
    if not ops:
        pytest.skip(f"no kepler closest_lattice_point op can run on {device} here")
    x = random_rows(9, dim, 3.0, dim)
    x[::3] = torch.round(x[::3] * 2) / 2  # ties in rounding and in D_n's largest residual
    for op in ops:
        torch.testing.assert_close(op(x.to(device), family).cpu(), closest_lattice_point_ref(x, family), rtol=0, atol=0)


def test_triton_op_refuses_rows_wider_than_its_tile():
    if _backend._unavailable_reason("triton", "cpu"):
        pytest.skip("the triton launchers need TRITON_INTERPRET=1 for CPU tensors")
    with pytest.raises(ValueError, match=r"D takes rows of at most 1024 here, got x of shape \(2, 1025\)"):
        torch.ops.kepler.closest_lattice_point_triton(torch.zeros(2, 1025), "D")


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_compiles_without_graph_breaks(device, backend):
    def quantize(x):
        return closest_lattice_point(x / 0.5, "E8", backend=backend) * 0.5

    torch._dynamo.reset()
    compiled = torch.compile(quantize, fullgraph=True)
    x = torch.randn(2, 33, 8, device=device)
    torch.testing.assert_close(compiled(x), quantize(x), rtol=0, atol=0)


@pytest.mark.skipif(not kepler.HAS_CPU_EXT, reason="kepler._C is not built")
def test_missing_compiled_kernel_is_an_unavailable_backend(monkeypatch):
    monkeypatch.delenv("KEPLER_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "compiled_kernel_registered", lambda op, device_type: False)
    x = torch.randn(5, 4)
    with pytest.raises(RuntimeError, match="backend 'cpu' is not available: kepler._C has no closest_lattice_point kernel"):
        closest_lattice_point(x, "D4", backend="cpu")
    torch.testing.assert_close(closest_lattice_point(x, "D4"), closest_lattice_point_ref(x, "D"))
