"""LatticeQuantizer: codes, decoding, gradients (straight-through, scales, rotation trick), errors."""

import math

import pytest
import torch

from kepler.lattice_codes import VoronoiCode, leech_shell
from kepler.nn import LatticeQuantizer, build_quantizer
from kepler.nn.rotation_trick import rotation_trick

CASES = [("E8", None, 16), ("D4", 3, 8), ("D3", 2, 6), ("A2", 4, 4), ("Z3", 5, 6)]


@pytest.mark.parametrize("lattice, q, dim", CASES)
@pytest.mark.parametrize("partition", ["group", "custom"])
def test_codes_are_the_voronoi_codes_of_the_scaled_sub_vectors(lattice, q, dim, partition):
    quantizer = LatticeQuantizer(dim=dim, lattice=lattice, q=q, partition=partition, scale=0.7, bound=False)
    code = VoronoiCode(lattice, q or 2)
    assert quantizer.codebook_size == code.size and quantizer.tokens_per_position == dim // code.dim
    z = torch.randn(3, dim, 4, 5) * 0.5
    out = quantizer(z)
    parts = quantizer.partition.partition(z)  # (B, L, P, n)
    expected = code.encode((parts / 0.7).reshape(-1, code.dim)).view(3, 4, 5, -1)
    assert torch.equal(out.indices, expected)
    torch.testing.assert_close(quantizer.partition.partition(out.z_q), 0.7 * code.decode(expected.reshape(-1))
                               .view(parts.shape), rtol=1e-6, atol=1e-6)
    decoded = quantizer.indices_to_latents(out.indices)
    assert torch.equal(decoded, out.z_q) and out.z_q.is_contiguous() and out.z_q.dtype == z.dtype
    assert int(quantizer.code_counts.sum()) == out.indices.numel()


def test_near_the_origin_the_codeword_is_the_nearest_of_the_explicit_codebook():
    quantizer = LatticeQuantizer(dim=16, lattice="E8", q=4, scale=0.5, bound=False)
    z = torch.randn(2, 16, 3, 3) * 0.3
    out = quantizer(z)
    rows = quantizer.sub_vectors(z)  # (P, N, 8)
    codewords = quantizer.codewords()  # (P, K, 8)
    best = torch.cdist(rows, codewords).amin(dim=-1)
    found = (rows - quantizer.sub_vectors(out.z_q)).norm(dim=-1)
    torch.testing.assert_close(found, best, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lattice, q", [("D4", 2), ("E8", 3), ("A2", 4)])
def test_bound_keeps_sub_vectors_inside_the_largest_codeword_norm(lattice, q):
    quantizer = LatticeQuantizer(dim=24 if lattice == "E8" else 8, lattice=lattice, q=q, scale=0.5)
    code = VoronoiCode(lattice, q)
    radius = code.codewords(torch.float64).norm(dim=-1).max().item()
    assert quantizer.bound and quantizer.bound_radius == pytest.approx(radius)
    z = (torch.randn(2, quantizer.dim, 3, 3) * 10).requires_grad_(True)  # far outside the code
    out = quantizer(z)
    parts = quantizer.partition.partition(z)
    norm = parts.norm(dim=-1, keepdim=True)
    bounded = parts * (0.5 * radius * torch.tanh(norm / (0.5 * radius)) / norm)
    assert (bounded.norm(dim=-1) <= 0.5 * radius * (1 + 1e-6)).all()
    expected = code.encode((bounded.detach() / 0.5).reshape(-1, code.dim)).view(out.indices.shape)
    assert torch.equal(out.indices, expected)
    # The straight-through gradient passes through the bound: d z_q / d z is the bound's Jacobian.
    g = torch.randn_like(z)
    (grad,) = torch.autograd.grad(out.z_q, z, g)
    (expected_grad,) = torch.autograd.grad(bounded, z, quantizer.partition.partition(g))
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)
    assert grad.abs().mean() < 0.5 * g.abs().mean()  # far out the bound flattens the gradient
    assert not LatticeQuantizer(dim=48, lattice="Leech").bound  # a spherical code does not wrap


def test_leech_shell_picks_the_largest_inner_product():
    quantizer = build_quantizer({"type": "lattice", "lattice": "Leech", "scale": 2.0}, dim=48)
    assert quantizer.codebook_size == 196560 and quantizer.tokens_per_position == 2
    assert quantizer.codewords() is None and quantizer.sub_vectors(torch.zeros(1, 48, 1, 1)) is None
    assert "shell" not in quantizer.state_dict()
    z = torch.randn(2, 48, 2, 3)
    out = quantizer(z)
    rows = quantizer.partition.partition(z).reshape(-1, 24)
    products = rows @ leech_shell().T
    chosen = products.gather(1, out.indices.reshape(-1, 1)).squeeze(1)
    torch.testing.assert_close(chosen, products.amax(dim=1))
    torch.testing.assert_close(quantizer.partition.partition(out.z_q).reshape(-1, 24).norm(dim=1),
                               torch.full((24,), 2.0))
    assert torch.equal(quantizer.indices_to_latents(out.indices), out.z_q)


def test_gradients_straight_through_commitment_and_scales():
    quantizer = LatticeQuantizer(dim=8, lattice="D4", q=4, scale=0.8, beta=0.5, bound=False)
    z = torch.randn(2, 8, 3, 3, requires_grad=True)
    out = quantizer(z)
    g = torch.randn_like(z)
    grad_z, grad_log_scale = torch.autograd.grad((out.z_q * g).sum() + out.loss, (z, quantizer.log_scale))
    commitment = 0.5 * 2 * (z - out.z_q).detach() / z.numel()
    torch.testing.assert_close(grad_z, g + commitment)
    unit = quantizer.partition.partition(out.z_q.detach()) / 0.8  # codewords at the lattice's scale
    expected = (quantizer.partition.partition(g) * unit).sum(dim=(0, 1, 3)) * 0.8  # d/d log s = s d/d s
    torch.testing.assert_close(grad_log_scale, expected, rtol=1e-5, atol=1e-5)


def test_fixed_scale_and_rotation_trick():
    quantizer = LatticeQuantizer(dim=16, lattice="E8", scale=0.6, learn_scale=False, beta=0.0, rotation_trick=True,
                                 bound=False)
    assert not quantizer.log_scale.requires_grad
    z = torch.randn(2, 16, 2, 2, requires_grad=True)
    out = quantizer(z)
    g = torch.randn_like(z)
    (grad,) = torch.autograd.grad(out.z_q, z, g)
    parts = quantizer.partition.partition(z.detach()).requires_grad_(True)
    reference = rotation_trick(parts, quantizer.partition.partition(out.z_q.detach()))
    (expected,) = torch.autograd.grad(reference, parts, quantizer.partition.partition(g))
    torch.testing.assert_close(quantizer.partition.partition(grad), expected)
    assert not torch.allclose(grad, g)


def test_bfloat16_latents_and_empty_batch():
    quantizer = LatticeQuantizer(dim=8, lattice="E8")
    out = quantizer(torch.randn(2, 8, 2, 2, dtype=torch.bfloat16))
    assert out.z_q.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    assert torch.equal(quantizer.indices_to_latents(out.indices).to(torch.bfloat16), out.z_q)
    empty = quantizer(torch.zeros(0, 8, 2, 2))
    assert empty.indices.shape == (0, 2, 2, 1) and empty.loss.item() == 0


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(dim=12, lattice="E8"), ValueError, "dim=12 must be a multiple of lattice E8's dimension 8"),
        (dict(dim=24, lattice="Leech", q=2), ValueError, "the Leech shell is a fixed code of 196560 codewords; q must be null, got 2"),
        (dict(dim=8, lattice="E8", q=1), ValueError, "q must be >= 2, got 1"),
        (dict(dim=8, lattice="E8", q=8), ValueError, r"LatticeQuantizer would have 16777216 codes per token; at most 1048576 \(2\*\*20\) are supported"),
        (dict(dim=8, lattice="E9"), ValueError, "unknown lattice name 'E9'"),
        (dict(dim=8, lattice="E8", scale=0.0), ValueError, "scale must be > 0.0, got 0.0"),
        (dict(dim=8, lattice="E8", learn_scale=1), TypeError, "learn_scale must be a bool, got int"),
        (dict(dim=8, lattice="E8", bound="yes"), TypeError, "bound must be a bool, got str"),
    ],
)
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        LatticeQuantizer(**kwargs)


def test_latent_errors_name_the_shape():
    quantizer = LatticeQuantizer(dim=8, lattice="E8")
    with pytest.raises(ValueError, match="z has C=4 channels but the quantizer has dim=8"):
        quantizer(torch.zeros(1, 4, 2, 2))
    assert math.isclose(quantizer.scale.item(), 1.0)


@pytest.mark.parametrize("config", [dict(lattice="E8", q=2), dict(lattice="D4", q=3, rotation_trick=True),
                                    dict(lattice="Leech")], ids=["e8", "d4-rotation", "leech"])
def test_torch_compile_fullgraph_matches_eager(config):
    dim = 24 if config["lattice"] == "Leech" else 16
    eager = LatticeQuantizer(dim=dim, scale=0.8, **config)
    traced = LatticeQuantizer(dim=dim, scale=0.8, **config)
    compiled = torch.compile(traced, fullgraph=True, backend="aot_eager")
    for step in range(2):
        z = torch.randn(2, dim, 3, 3, generator=torch.Generator().manual_seed(step))
        expected = eager(z.clone().requires_grad_(True))
        z_compiled = z.clone().requires_grad_(True)
        out = compiled(z_compiled)
        assert torch.equal(out.indices, expected.indices) and torch.equal(out.z_q, expected.z_q)
        torch.testing.assert_close(out.loss, expected.loss)
        (out.loss + out.z_q.sum()).backward()
        assert z_compiled.grad is not None and traced.log_scale.grad is not None
    assert torch.equal(traced.code_counts, eager.code_counts)


@pytest.mark.parametrize("config", [dict(lattice="E8", q=3), dict(lattice="D4", q=2), dict(lattice="Leech")],
                         ids=["e8", "d4", "leech"])
def test_scales_start_from_the_first_training_batch(config):
    quantizer = LatticeQuantizer(dim=48, **config)  # scale=None: from the data
    z = torch.randn(2, 48, 5, 5) * 0.01  # a fresh encoder's small latents
    quantizer.eval()
    quantizer(z)
    assert torch.equal(quantizer.scale, torch.ones(quantizer.partitions))  # not in eval mode
    quantizer.train()
    out = quantizer(z)
    parts = quantizer.partition.partition(z)  # (B, L, P, n)
    rms = parts.square().sum(dim=-1).mean(dim=(0, 1)).sqrt()
    torch.testing.assert_close(quantizer.scale, rms / quantizer.codeword_rms, rtol=1e-5, atol=0)
    # Small latents are spread over the code, not all coded as its origin.
    assert out.info.indices.unique().numel() > 10
    # Set once: a later batch, a reload or a copy keeps the scales.
    before = quantizer.scale.clone()
    quantizer(z * 100)
    assert torch.equal(quantizer.scale, before)
    reloaded = LatticeQuantizer(dim=48, **config)
    reloaded.load_state_dict(quantizer.state_dict())
    reloaded.train()(z * 100)
    assert torch.equal(reloaded.scale, before)


def test_a_fixed_start_scale_is_kept():
    quantizer = LatticeQuantizer(dim=8, lattice="E8", scale=0.5).train()
    quantizer(torch.randn(2, 8, 3, 3))
    assert torch.allclose(quantizer.scale, torch.full((1,), 0.5))
    with pytest.raises(ValueError, match=r"^lattice scale initialization: 32 of the first batch's 32 values are not finite \(NaN or inf\); "
                       "the scales would be NaN$"):
        LatticeQuantizer(dim=8, lattice="E8").train()(torch.full((1, 8, 2, 2), float("nan")))
