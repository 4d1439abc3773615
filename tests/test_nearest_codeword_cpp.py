"""C++/CUDA kernels of ``torch.ops.kepler.nearest_codeword`` called directly, against a float64
brute force: what the functional tests in test_nearest_codeword.py do not reach.

* every CPU micro-kernel (AVX2 4x8 for D <= 16 or so, AVX2 6x16 above, the portable one that
  ``KEPLER_DISABLE_AVX2=1`` forces) with shapes that cross task, code-block and panel boundaries;
* the second pass for rows whose winning score overflows to -inf;
* zero strides (expanded inputs), D = 0, G = 0, and results independent of the thread count;
* the launchers' own error messages.

Correctness criterion: the chosen codeword's exact distance is within the float32 rounding bound
of the search score ``||e||^2 - 2 z.e`` of the true minimum (ties and near-ties may pick either),
and ``sq_dist`` is the chosen codeword's distance to float32 accuracy.
"""

import pytest
import torch

import kepler
from conftest import device_params

pytestmark = pytest.mark.skipif(not kepler.HAS_CPU_EXT, reason="kepler._C is not built")

FLOAT32_EPS = torch.finfo(torch.float32).eps


def nearest_codeword_op(z, codebook):
    return torch.ops.kepler.nearest_codeword(z, codebook)


def assert_nearest(z, codebook, indices, sq_dist):
    """indices/sq_dist of the op are a nearest codeword of every row, up to float32 rounding."""
    groups, rows, dim = z.shape
    z64 = z.double().cpu()
    codes64 = codebook.double().cpu().expand(groups, -1, -1)
    indices = indices.cpu()
    sq_dist = sq_dist.cpu()
    assert indices.shape == (groups, rows) and indices.dtype == torch.int64
    assert sq_dist.shape == (groups, rows) and sq_dist.dtype == torch.float32
    if rows == 0:
        return
    assert int(indices.min()) >= 0 and int(indices.max()) < codebook.shape[1]
    dist = torch.cdist(z64, codes64) ** 2 if dim > 0 else torch.zeros(groups, rows, codebook.shape[1], dtype=torch.float64)
    # Rounding bound of the float32 search score of each code: ~(D + 2) eps * (|e|^2 + 2 sum |z_d e_d|).
    magnitude = (codes64**2).sum(-1)[:, None, :] + 2 * z64.abs() @ codes64.abs().transpose(1, 2)
    bound = (dim + 2) * FLOAT32_EPS * magnitude
    chosen = dist.gather(2, indices[..., None])[..., 0]
    best, best_index = dist.min(dim=2)
    slack = bound.gather(2, indices[..., None])[..., 0] + bound.gather(2, best_index[..., None])[..., 0]
    assert bool((chosen - best <= slack).all()), f"max excess {(chosen - best - slack).max().item()}"
    assert torch.allclose(sq_dist.double(), chosen, rtol=(dim + 1) * FLOAT32_EPS, atol=1e-30)


# D picks the micro-kernel and its unrolled specializations (8, 16, 32, 64) or the generic loop;
# K crosses the 16-code panels and, for the larger D, the L2-sized code blocks; N crosses tasks.
@pytest.mark.parametrize(
    "groups, code_groups, rows, codes, dim",
    [
        (1, 1, 37, 53, 1),
        (2, 1, 301, 131, 8),
        (2, 2, 97, 1031, 12),
        (1, 1, 2053, 67, 16),
        (3, 3, 41, 130, 23),
        (1, 1, 61, 259, 32),
        (2, 1, 29, 1500, 64),
        (1, 1, 17, 600, 257),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cpu_kernels_match_brute_force(cpu_kernel, groups, code_groups, rows, codes, dim, dtype):
    z = torch.randn(groups, rows, dim).to(dtype)
    codebook = torch.randn(code_groups, codes, dim).to(dtype)
    indices, sq_dist = nearest_codeword_op(z, codebook)
    assert_nearest(z, codebook, indices, sq_dist)


def test_cpu_exact_ties_keep_the_lowest_index(cpu_kernel):
    # Every code is duplicated 3 panels later; rows sit exactly on some codes.
    base = torch.randn(1, 40, 16)
    codebook = torch.cat([base, base[:, :9]], dim=1)  # codes 40..48 repeat codes 0..8
    z = torch.cat([codebook[:, [3, 8, 45, 47]], torch.randn(1, 5, 16)], dim=1)
    indices, _ = nearest_codeword_op(z, codebook)
    assert indices[0, :4].tolist() == [3, 8, 5, 7]
    # All codes identical: index 0 for every row.
    same = torch.randn(1, 1, 16).expand(1, 70, 16).contiguous()
    indices, _ = nearest_codeword_op(torch.randn(1, 9, 16), same)
    assert indices.eq(0).all()


@pytest.mark.parametrize("dim", [2, 40], ids=["narrow", "wide"])
def test_cpu_rows_whose_winning_score_overflows_to_minus_inf_are_rescanned(cpu_kernel, dim):
    # z . e overflows float32 for code 1 (score -inf), which must not win; code 2 is the finite best.
    codebook = torch.zeros(1, 3, dim)
    codebook[0, 1] = 1e10
    codebook[0, 2] = 1.0
    z = torch.ones(1, 50, dim)
    z[0, ::7] = 1e30
    indices, sq_dist = nearest_codeword_op(z, codebook)
    assert indices.eq(2).all()
    assert torch.isinf(sq_dist[0, ::7]).all()  # (1e30 - 1)^2 * dim overflows float32
    assert sq_dist[0, 1] == 0


def test_cpu_rows_without_a_finite_score_get_index_zero(cpu_kernel):
    codebook = torch.randn(1, 33, 8)
    z = torch.randn(1, 6, 8)
    z[0, 1, 3] = float("nan")
    z[0, 4, 0] = float("inf")
    indices, sq_dist = nearest_codeword_op(z, codebook)
    assert indices[0, 1] == 0 and indices[0, 4] == 0
    assert torch.isnan(sq_dist[0, 1]) and torch.isinf(sq_dist[0, 4])
    finite_rows = [0, 2, 3, 5]
    assert_nearest(z[:, finite_rows], codebook, indices[:, finite_rows], sq_dist[:, finite_rows])


def test_cpu_nan_codeword_never_wins(cpu_kernel):
    codebook = torch.randn(1, 40, 24)
    codebook[0, 0, 5] = float("nan")
    codebook[0, 17] = float("inf")
    z = torch.randn(1, 30, 24)
    indices, sq_dist = nearest_codeword_op(z, codebook)
    assert not indices.eq(0).any() and not indices.eq(17).any()
    keep = [k for k in range(40) if k not in (0, 17)]
    position_in_keep = torch.full((40,), -1, dtype=torch.int64)
    position_in_keep[keep] = torch.arange(len(keep))
    assert_nearest(z, codebook[:, keep], position_in_keep[indices], sq_dist)


def test_cpu_zero_strides_and_degenerate_sizes(cpu_kernel):
    # Expanded (stride 0) inputs are read in place.
    z = torch.randn(1, 1, 20).expand(3, 25, 20)
    codebook = torch.randn(1, 1, 20).expand(1, 9, 20)
    indices, sq_dist = nearest_codeword_op(z, codebook)
    assert indices.eq(0).all()
    assert_nearest(z, codebook, indices, sq_dist)
    # D = 0: every distance is 0, every row picks code 0.
    indices, sq_dist = nearest_codeword_op(torch.randn(2, 5, 0), torch.randn(2, 7, 0))
    assert indices.eq(0).all() and sq_dist.eq(0).all()
    # G = 0 and N = 0: empty outputs of the right shape.
    for z_shape in [(0, 4, 3), (2, 0, 3)]:
        indices, sq_dist = nearest_codeword_op(torch.randn(z_shape), torch.randn(1, 5, 3))
        assert indices.shape == z_shape[:2] and sq_dist.shape == z_shape[:2]
    # K = 1.
    indices, sq_dist = nearest_codeword_op(torch.randn(2, 11, 5), torch.randn(2, 1, 5))
    assert indices.eq(0).all()


def test_cpu_result_does_not_depend_on_the_thread_count():
    z = torch.randn(2, 700, 16)
    codebook = torch.randn(2, 300, 16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = nearest_codeword_op(z, codebook)
        torch.set_num_threads(max(2, threads))
        multi = nearest_codeword_op(z, codebook)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single[0], multi[0]) and torch.equal(single[1], multi[1])


BAD_INPUTS = [
    (lambda: (torch.randn(4, 3), torch.randn(1, 5, 3)), r"z must be 3-D \(G, N, D\), got a 2-D tensor"),
    (lambda: (torch.randn(1, 4, 3), torch.randn(5, 3)), r"codebook must be 3-D \(Gc, K, D\), got a 2-D tensor"),
    (lambda: (torch.randn(1, 4, 3), torch.randn(1, 5, 2)), r"same D, got z D=3 and codebook D=2"),
    (lambda: (torch.randn(3, 4, 3), torch.randn(2, 5, 3)), r"Gc must be 1 or G=3, got Gc=2"),
    (lambda: (torch.randn(1, 4, 3), torch.randn(1, 5, 3).half()), r"same dtype, got Float and Half"),
    (lambda: (torch.randn(1, 4, 3).double(), torch.randn(1, 5, 3).double()), r"float32, bfloat16 or float16, got Double"),
    (lambda: (torch.randn(1, 4, 3), torch.randn(1, 0, 3)), r"at least one codeword \(K >= 1\), got K=0"),
]


@pytest.mark.parametrize("make_inputs, message", BAD_INPUTS)
@pytest.mark.parametrize("device", device_params())
def test_launcher_checks_name_the_problem(device, make_inputs, message):
    z, codebook = (t.to(device) for t in make_inputs())
    with pytest.raises(RuntimeError, match=message):
        nearest_codeword_op(z, codebook)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.skipif(not kepler.HAS_CUDA_EXT, reason="kepler._C was built without CUDA kernels")
@pytest.mark.parametrize(
    "groups, code_groups, rows, codes, dim",
    [(1, 1, 1, 1, 1), (2, 1, 129, 65, 8), (3, 3, 70, 200, 17), (1, 1, 300, 1000, 64), (2, 2, 5, 130, 300)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cuda_kernel_matches_brute_force(groups, code_groups, rows, codes, dim, dtype):
    z = torch.randn(groups, rows, 2 * dim, device="cuda").to(dtype)[..., ::2]  # strided rows
    codebook = torch.randn(code_groups, codes, dim, device="cuda").to(dtype)
    indices, sq_dist = nearest_codeword_op(z, codebook)
    assert_nearest(z, codebook, indices, sq_dist)
    # Same winners as the CPU kernel wherever the float32 scores are not near-ties.
    cpu_indices, _ = nearest_codeword_op(z.cpu(), codebook.cpu())
    assert indices.cpu().eq(cpu_indices).float().mean() > 0.99


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.skipif(not kepler.HAS_CUDA_EXT, reason="kepler._C was built without CUDA kernels")
def test_cuda_kernel_ties_and_non_finite():
    base = torch.randn(1, 70, 8)
    codebook = torch.cat([base, base[:, :5]], dim=1)
    codebook[0, 2, 0] = float("nan")
    z = torch.cat([codebook[:, [1, 3, 72]], torch.full((1, 1, 8), float("nan"))], dim=1)
    indices, sq_dist = nearest_codeword_op(z.cuda(), codebook.cuda())
    # Code 72 repeats code 2, whose NaN copy never wins; the NaN row gets index 0.
    assert indices[0].tolist() == [1, 3, 72, 0]
    assert sq_dist[0, :3].eq(0).all() and torch.isnan(sq_dist[0, 3])
