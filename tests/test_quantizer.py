"""KeplerQuantizer: equivalence with the released quantizer's math, round trips, training
machinery (EMA, dead codes, data inits), regularizers, autocast, compile and state dicts."""

import math

import pytest
import torch

import kepler
from conftest import backend_params
from kepler.nn import KeplerQuantizer, QuantizerOutput
from kepler.nn.codebook import KMEANS_ITERATIONS


# ------------------------------------------------------------------------------------------
# A plain-PyTorch transcription of the released VectorQuantizer_kepler.forward with its
# GroupPartition / CustomPartition (no remap, no Kepler loss): the oracle of the equivalence tests.


def released_partition(name, z_bhwc, partitions):
    batch, height, width, channels = z_bhwc.shape
    if name == "group":
        return z_bhwc.reshape(-1, channels // partitions)
    paired = z_bhwc.reshape(batch, height, width, channels // 2, 2).permute(0, 1, 2, 4, 3).contiguous()
    return paired.reshape(-1, channels // partitions)


def released_unpartition(name, rows, shape_bhwc):
    batch, height, width, channels = shape_bhwc
    if name == "group":
        return rows.reshape(shape_bhwc)
    paired = rows.reshape(batch, height, width, 2, channels // 2).permute(0, 1, 2, 4, 3).contiguous()
    return paired.reshape(batch, height, width, -1)


def released_forward(z, weight, name, partitions, beta, legacy):
    """(z_q after straight-through, loss, indices (rows,), codewords z_q before it (B, H, W, C))."""
    z = z.permute(0, 2, 3, 1).contiguous()
    rows = released_partition(name, z, partitions)
    distances = (
        torch.sum(rows**2, dim=1, keepdim=True)
        + torch.sum(weight**2, dim=1)
        - 2 * torch.einsum("bd,dn->bn", rows, weight.t())
    )
    indices = torch.argmin(distances, dim=1)
    z_q = released_unpartition(name, torch.nn.functional.embedding(indices, weight), z.shape)
    if legacy:
        loss = torch.mean((z_q.detach() - z) ** 2) + beta * torch.mean((z_q - z.detach()) ** 2)
    else:
        loss = beta * torch.mean((z_q.detach() - z) ** 2) + torch.mean((z_q - z.detach()) ** 2)
    codewords = z_q
    z_q = z + (z_q - z).detach()
    return z_q.permute(0, 3, 1, 2).contiguous(), loss, indices, codewords


# ------------------------------------------------------------------------------------------


def make_quantizer(**kwargs):
    options = dict(num_codes=32, dim=16, partitions=4)
    options.update(kwargs)
    return KeplerQuantizer(**options)


def spread_codebook(quantizer):
    """A codebook spread like the latents, so many codes are used (released init is tiny)."""
    with torch.no_grad():
        quantizer.codebook.normal_()
    return quantizer


# float32 on every backend; float64 runs on the reference backend only.
BACKEND_DTYPES = [
    pytest.param(param.values[0], torch.float32, marks=param.marks, id=f"{param.id}-float32")
    for param in backend_params()
] + [pytest.param("reference", torch.float64, id="reference-float64")]


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("name", ["group", "custom"])
def test_matches_released_quantizer(name, legacy, backend, dtype):
    quantizer = make_quantizer(partition=name, legacy=legacy, beta=0.3, backend=backend)
    quantizer = spread_codebook(quantizer).to(dtype)
    z = torch.randn(3, 16, 5, 7, dtype=dtype, requires_grad=True)
    weight = quantizer.codebook.detach().clone().requires_grad_(True)
    z_ref = z.detach().clone().requires_grad_(True)

    out = quantizer(z)
    ref_zq, ref_loss, ref_indices, ref_codewords = released_forward(z_ref, weight, name, 4, 0.3, legacy)

    assert out.indices.shape == (3, 5, 7, 4) and out.indices.dtype == torch.int64
    assert torch.equal(out.indices.reshape(-1), ref_indices)
    # Our z_q is exactly the codewords; the released z + (z_q - z) rounds around them.
    assert torch.equal(out.z_q, ref_codewords.permute(0, 3, 1, 2))
    scale = z.detach().abs().max()
    tol = dict(rtol=1e-6, atol=1e-6 * scale) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.z_q, ref_zq, **tol)
    torch.testing.assert_close(out.loss.to(dtype), ref_loss, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)

    upstream = torch.randn_like(ref_zq)
    (out.loss + (out.z_q * upstream).sum()).backward()
    (ref_loss + (ref_zq * upstream).sum()).backward()
    torch.testing.assert_close(z.grad, z_ref.grad, **tol)
    grad_scale = weight.grad.abs().max()
    torch.testing.assert_close(
        quantizer.codebook.grad, weight.grad, rtol=tol["rtol"], atol=tol["rtol"] * grad_scale
    )


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("name", ["group", "custom", "layer"])
def test_get_codebook_entry_inverts_forward(name, shared, backend):
    quantizer = spread_codebook(make_quantizer(partition=name, shared_codebook=shared, backend=backend))
    z = torch.randn(2, 16, 4, 4)
    out = quantizer(z)
    assert torch.equal(quantizer.get_codebook_entry(out.indices), out.z_q)
    flat = out.indices.reshape(-1)
    assert torch.equal(quantizer.get_codebook_entry(flat, shape=(2, 4, 4, 16)), out.z_q)
    assert torch.equal(quantizer.get_codebook_entry(out.indices, (2, 4, 4, 16)), out.z_q)


@pytest.mark.parametrize("name", ["group", "custom", "layer"])
def test_per_partition_codebooks_search_their_own_partition(name):
    quantizer = spread_codebook(make_quantizer(partition=name, shared_codebook=False))
    assert quantizer.codebook.shape == (4, 32, 4)
    z = torch.randn(2, 16, 4, 4)
    out = quantizer(z)
    parts = quantizer.partition.partition(z)  # (B, L, P, d)
    for p in range(4):
        distances = torch.cdist(parts[:, :, p].reshape(-1, 4).double(), quantizer.codebook[p].double())
        expected = distances.argmin(dim=1).view(2, 4, 4)
        assert torch.equal(out.indices[..., p], expected)


def test_output_unpacks_like_taming_and_has_named_fields():
    quantizer = make_quantizer()
    out = quantizer(torch.randn(2, 16, 3, 3))
    assert isinstance(out, QuantizerOutput)
    z_q, loss, (perplexity, min_encodings, indices, utilization) = out
    assert min_encodings is None
    assert out.indices is indices and out.perplexity is perplexity and out.utilization is utilization
    assert loss.shape == () and loss.dtype == torch.float32
    assert perplexity.shape == () and utilization.shape == ()


@pytest.mark.parametrize("legacy", [True, False])
def test_loss_weights_and_gradient_split(legacy):
    beta = 0.4
    quantizer = spread_codebook(make_quantizer(legacy=legacy, beta=beta))
    z = torch.randn(2, 16, 3, 3, requires_grad=True)
    out = quantizer(z)
    out.loss.backward()
    residual = z.detach() - out.z_q.detach()
    mse = residual.square().mean()
    commitment, codebook_term = (1.0, beta) if legacy else (beta, 1.0)
    torch.testing.assert_close(out.loss, (commitment + codebook_term) * mse)
    torch.testing.assert_close(z.grad, commitment * 2 * residual / residual.numel())
    # The codebook term pulls each used code towards its sub-vectors.
    parts = quantizer.partition.partition(residual).reshape(-1, 4)
    expected = torch.zeros_like(quantizer.codebook).index_add_(0, out.indices.reshape(-1), parts)
    torch.testing.assert_close(quantizer.codebook.grad, -codebook_term * 2 * expected / residual.numel())


def test_scale_sets_the_real_codebook_size():
    quantizer = spread_codebook(make_quantizer(num_codes=20, scale=1.5))
    assert quantizer.codebook.shape == (30, 4) and quantizer.codebook_size == 30
    assert quantizer.code_counts.shape == (4, 30) and quantizer.codebook_entries == 30
    out = quantizer(torch.randn(4, 16, 4, 4))
    assert int(out.indices.max()) < 30
    used = int((quantizer.code_counts.sum(dim=0) > 0).sum())
    assert out.utilization.item() == pytest.approx(used / 30)


def test_usage_statistics_and_perplexity():
    quantizer = spread_codebook(make_quantizer(shared_codebook=False))
    out = quantizer(torch.randn(3, 16, 4, 4))
    assert quantizer.code_counts.shape == (4, 32) and quantizer.codebook_entries == 4 * 32
    for p in range(4):
        assert torch.equal(quantizer.code_counts[p], torch.bincount(out.indices[..., p].reshape(-1), minlength=32))
    assert out.perplexity.shape == (4,)
    for p in range(4):
        counts = torch.bincount(out.indices[..., p].reshape(-1), minlength=32).double()
        probs = counts / counts.sum()
        entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
        assert out.perplexity[p].item() == pytest.approx(math.exp(entropy.item()), rel=1e-5)
    quantizer(torch.randn(3, 16, 4, 4))
    assert int(quantizer.code_counts.sum()) == 2 * 3 * 4 * 4 * 4
    assert quantizer.codebook_utilization() == (quantizer.code_counts > 0).float().mean()
    quantizer.reset_usage()
    assert int(quantizer.code_counts.sum()) == 0
    assert quantizer.codebook_utilization() == 0


def test_empty_batch():
    quantizer = make_quantizer()
    z = torch.randn(0, 16, 3, 3, requires_grad=True)
    out = quantizer(z)
    assert out.z_q.shape == z.shape and out.indices.shape == (0, 3, 3, 4)
    assert out.loss.item() == 0.0
    out.loss.backward()


def test_bfloat16_autocast():
    quantizer = spread_codebook(make_quantizer())
    z = torch.randn(2, 16, 3, 3, requires_grad=True)
    reference = quantizer(z.detach().to(torch.bfloat16).float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        latent = torch.nn.functional.conv2d(z, torch.eye(16).view(16, 16, 1, 1))
        assert latent.dtype == torch.bfloat16
        out = quantizer(latent)
    assert out.z_q.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    assert torch.equal(out.indices, reference.indices)
    (out.loss + out.z_q.float().sum()).backward()
    assert torch.isfinite(z.grad).all() and torch.isfinite(quantizer.codebook.grad).all()


def test_state_dict_round_trip():
    options = dict(shared_codebook=False, ema_decay=0.9, dead_code_threshold=1, init="kmeans")
    quantizer = make_quantizer(**options)
    z = torch.randn(2, 16, 4, 4)
    quantizer(z)
    quantizer(z)
    clone = make_quantizer(**options)
    clone.load_state_dict(quantizer.state_dict())
    for name, tensor in quantizer.state_dict().items():
        assert torch.equal(clone.state_dict()[name], tensor), name
    quantizer.eval()
    clone.eval()
    # The loaded quantizer is initialized: no second k-means on this batch.
    other = torch.randn(2, 16, 4, 4) * 5
    assert torch.equal(clone(other).z_q, quantizer(other).z_q)


def test_ema_updates_codebook_towards_assigned_means():
    decay = 0.8
    quantizer = spread_codebook(make_quantizer(ema_decay=decay))
    assert not quantizer.codebook.requires_grad
    with torch.no_grad():
        quantizer.upkeep.ema_embed_sum.copy_(quantizer.codebook)
    before = quantizer.codebook.detach().clone()
    z = torch.randn(4, 16, 4, 4, requires_grad=True)
    out = quantizer(z)
    rows = quantizer.partition.partition(z.detach()).reshape(-1, 4)
    index = out.indices.reshape(-1)
    counts = torch.bincount(index, minlength=32).float()
    sums = torch.zeros(32, 4).index_add_(0, index, rows)
    cluster = decay * torch.ones(32) + (1 - decay) * counts
    embed = decay * before + (1 - decay) * sums
    total = cluster.sum()
    smoothed = (cluster + 1e-5) / (total + 32 * 1e-5) * total
    torch.testing.assert_close(quantizer.codebook.detach(), embed / smoothed.unsqueeze(1))
    # Loss: the commitment term only; backward uses this step's codebook (taken before the update).
    torch.testing.assert_close(out.loss, (z.detach() - out.z_q).square().mean())
    out.loss.backward()
    torch.testing.assert_close(z.grad, 2 * (z.detach() - out.z_q) / z.numel())
    # Evaluation does not move the codebook.
    quantizer.eval()
    frozen = quantizer.codebook.detach().clone()
    quantizer(z)
    assert torch.equal(quantizer.codebook, frozen)


@pytest.mark.parametrize("shared", [True, False])
def test_dead_codes_are_reseeded_from_current_latents(shared):
    quantizer = make_quantizer(shared_codebook=shared, dead_code_threshold=1, dead_code_window=2)
    groups = 1 if shared else 4
    with torch.no_grad():
        quantizer.codebook.fill_(100.0)
        quantizer.codebook.view(-1, 32, 4)[:, 0] = 0.0  # only code 0 of each codebook is ever used
    first = torch.randn(2, 16, 3, 3)
    quantizer(first)
    quantizer(first)
    assert torch.equal(quantizer.codebook.view(-1, 32, 4)[:, 1:], torch.full((groups, 31, 4), 100.0))
    # Third forward starts a new window: codes 1.. were unused in the last two, they take rows of
    # this batch; code 0 (used) stays.
    current = torch.randn(2, 16, 3, 3)
    quantizer(current)
    rows = quantizer.sub_vectors(current)
    codebook = quantizer.codebook.detach().view(-1, 32, 4)
    assert torch.equal(codebook[:, 0], torch.zeros(groups, 4))
    for group in range(groups):
        for code in codebook[group, 1:]:
            assert (rows[group] == code).all(dim=1).any()
    assert int(quantizer.upkeep.window_steps) == 1


def test_a_code_used_exactly_the_threshold_times_is_alive():
    """Codes used fewer than dead_code_threshold times in a window are re-seeded; a code used exactly
    that often is not (< against <= at the boundary)."""
    quantizer = make_quantizer(num_codes=4, dim=4, partitions=1, dead_code_threshold=3, dead_code_window=1)
    with torch.no_grad():
        quantizer.codebook.copy_(torch.eye(4) * 10.0)
    near = torch.eye(4)[[0, 0, 0, 1, 1, 2, 2, 2]] * 10.0 + 0.01  # code 0: 3 uses, 1: 2, 2: 3, 3: none
    quantizer(near.view(2, 2, 2, 4).permute(0, 3, 1, 2))
    assert quantizer.upkeep.window_counts.view(-1).tolist() == [3, 2, 3, 0]
    before = quantizer.codebook.detach().clone()
    quantizer(torch.randn(2, 4, 2, 2))  # the window ended: codes 1 and 3 (under 3 uses) take new rows
    after = quantizer.codebook.detach()
    assert torch.equal(after[[0, 2]], before[[0, 2]])
    assert not torch.equal(after[1], before[1]) and not torch.equal(after[3], before[3])


def test_kmeans_init_finds_separated_clusters():
    quantizer = make_quantizer(num_codes=4, dim=4, partitions=1, init="kmeans")
    centres = torch.tensor([[5.0, 0, 0, 0], [0, 5.0, 0, 0], [0, 0, 5.0, 0], [0, 0, 0, 5.0]])
    labels = torch.arange(4).repeat(16)
    z = (centres[labels] + 0.01 * torch.randn(64, 4)).view(4, 4, 4, 4).permute(0, 3, 1, 2)
    out = quantizer(z)
    assert bool(quantizer.upkeep.initialized)
    found = quantizer.codebook.detach()
    assert torch.cdist(found, centres).min(dim=0).values.max() < 0.05
    assert out.loss.item() < 1e-3
    assert KMEANS_ITERATIONS >= 1


@pytest.mark.parametrize(
    "options",
    [
        dict(shared_codebook=False),
        dict(shared_codebook=False, ema_decay=0.9, dead_code_threshold=1, init="kmeans"),
    ],
    ids=["plain", "ema-deadcode-kmeans"],
)
def test_torch_compile_fullgraph_training_matches_eager(options):
    eager = spread_codebook(make_quantizer(**options))
    traced = make_quantizer(**options)
    compiled_training_matches_eager(eager, traced, (2, 16, 3, 3))


def compiled_training_matches_eager(eager, traced, shape: tuple[int, ...], steps: int = 3) -> None:
    """``traced`` (given ``eager``'s state), compiled whole, trains ``steps`` training forwards +
    backwards on random latents of ``shape`` as ``eager`` does: the same indices and z_q, the loss and
    every buffer and parameter (codebooks, EMA sums, counts) within float32 rounding after each step."""
    traced.load_state_dict(eager.state_dict())
    compiled = torch.compile(traced.train(), fullgraph=True, backend="aot_eager")
    eager.train()
    for step in range(steps):
        z = torch.randn(shape)
        torch.manual_seed(step)  # the same random picks (re-seeded codes, quantize dropout) on both
        expected = eager(z.clone().requires_grad_(True))
        (expected.loss + expected.z_q.sum()).backward()
        torch.manual_seed(step)
        z_compiled = z.clone().requires_grad_(True)
        out = compiled(z_compiled)
        assert torch.equal(out.indices, expected.indices) and torch.equal(out.z_q, expected.z_q)
        torch.testing.assert_close(out.loss, expected.loss)
        (out.loss + out.z_q.sum()).backward()
        assert z_compiled.grad is not None
        state = traced.state_dict()
        for name, value in eager.state_dict().items():
            torch.testing.assert_close(state[name], value, msg=f"step {step}: {name}")


@pytest.mark.parametrize("init", ["kmeans", "lattice:D4"])
def test_data_dependent_init_refuses_non_finite_rows(init):
    quantizer = make_quantizer(num_codes=8, init=init).eval()  # eval: the init still runs on the first forward
    z = torch.randn(2, 16, 3, 3)
    z[0, 5, 1, 1] = float("nan")
    z[1, 0, 0, 2] = float("inf")
    with pytest.raises(ValueError, match=r"^codebook initialization \(" + init.split(":")[0] + r"\): 2 of the first "
                       r"batch's 288 values are not finite \(NaN or inf\); the codebook would keep them$"):
        quantizer(z)
    assert not bool(quantizer.upkeep.initialized) and torch.isfinite(quantizer.codebook).all()
    quantizer(torch.randn(2, 16, 3, 3))
    assert bool(quantizer.upkeep.initialized) and torch.isfinite(quantizer.codebook).all()


def test_inference_mode():
    quantizer = spread_codebook(make_quantizer()).eval()
    z = torch.randn(2, 16, 3, 3)
    with torch.inference_mode():
        out = quantizer(z)
        assert torch.equal(quantizer.get_codebook_entry(out.indices), out.z_q)
    assert int(quantizer.code_counts.sum()) == 2 * 3 * 3 * 4


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(dim=18), ValueError, r"dim=18 must be divisible by partitions=4"),
        (dict(partition="rows"), ValueError, r"partition must be one of"),
        (dict(scale=0.01), ValueError, r"leaves round\(num_codes \* scale\) = 0 codes"),
        (dict(scale=-1.0), ValueError, r"scale must be > 0"),
        (dict(beta=-0.1), ValueError, r"beta must be >= 0"),
        (dict(init="random"), ValueError, r"init must be 'uniform', 'kmeans' or 'lattice:<name>'"),
        (dict(kl_prior="flat"), ValueError, r"kl_prior must be 'grid' or 'lattice:<name>'"),
        (dict(ema_decay=1.0), ValueError, r"ema_decay must be in \(0, 1\)"),
        (dict(num_codes=2.5), TypeError, r"num_codes must be an int"),
        (dict(dead_code_window=0), ValueError, r"dead_code_window must be >= 1"),
        (dict(ema_decay=0.9, packing_weight=0.1), ValueError, r"need a gradient-trained codebook"),
    ],
)
def test_constructor_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        make_quantizer(**kwargs)


@pytest.mark.parametrize("name", ["scale", "beta", "kepler_kl_weight", "packing_weight", "packing_t", "ema_decay",
                                  "dead_code_threshold", "entropy_weight", "entropy_gamma", "entropy_temperature"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_constructor_refuses_non_finite_numbers(name, value):
    # nan passed every range check (and switched features off), inf made losses inf or overflowed.
    with pytest.raises(ValueError, match=rf"^{name} must be a finite number, got {value}$"):
        make_quantizer(**{name: value})


def test_forward_errors():
    with pytest.raises(ValueError, match=r"z has C=8 channels but the quantizer has dim=16"):
        make_quantizer()(torch.randn(1, 8, 2, 2))
    with pytest.raises(ValueError, match=r"z must be \(B, C, H, W\)"):
        make_quantizer()(torch.randn(1, 16, 2))
    with pytest.raises(ValueError, match=r"layer partition: sub-vectors of H\*W/partitions=2\*4/4"):
        make_quantizer(partition="layer")(torch.randn(1, 16, 2, 4))
    with pytest.raises(ValueError, match=r"must be divisible by partitions=4"):
        make_quantizer(partition="layer")(torch.randn(1, 16, 3, 5))
    with pytest.raises(ValueError, match=r"needs shape=\(B, H, W, C\)"):
        make_quantizer().get_codebook_entry(torch.zeros(8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"indices has 8 entries"):
        make_quantizer().get_codebook_entry(torch.zeros(8, dtype=torch.int64), (1, 2, 2, 16))


def test_top_level_export():
    assert kepler.KeplerQuantizer is KeplerQuantizer


def test_lattice_init_is_the_lattice_scaled_to_the_batch():
    quantizer = make_quantizer(num_codes=25, init="lattice:D4")  # origin + the 24 minimal vectors
    z = torch.randn(3, 16, 4, 4) * 2 + 1
    quantizer(z)
    rows = quantizer.partition.partition(z).reshape(-1, 4).double()
    mean = rows.mean(dim=0)
    spread = (rows - mean).square().sum(dim=1).mean().sqrt()
    codebook = quantizer.codebook.detach().double()
    torch.testing.assert_close(codebook[0], mean, rtol=1e-6, atol=1e-6)
    offsets = codebook - mean
    torch.testing.assert_close(offsets.square().sum(dim=1).mean().sqrt(), spread, rtol=1e-5, atol=0)
    # D4's minimal vectors all have the same length and the same minimal distance to each other.
    lengths = offsets[1:].norm(dim=1)
    torch.testing.assert_close(lengths, lengths[0].expand(24), rtol=1e-5, atol=0)
    distances = torch.cdist(codebook, codebook) + torch.eye(25, dtype=torch.float64) * 1e9
    torch.testing.assert_close(distances.min(dim=1).values, lengths[0].expand(25), rtol=1e-5, atol=0)


def test_lattice_init_needs_the_sub_vector_dimension():
    with pytest.raises(ValueError, match=r"lattice 'E8' lives in dimension 8, but the codebook's sub-vectors have dim/partitions=4"):
        make_quantizer(init="lattice:E8")


# A transcription of the released KeplerLoss.forward (its kl_weight applied by the caller).
def released_kepler_kl(z_q_bhwc, prior_points):
    p = z_q_bhwc.reshape(z_q_bhwc.shape[0], -1)
    p = (p - p.mean(dim=1, keepdim=True)) / p.var(dim=1, keepdim=True)
    p = torch.softmax(p, dim=1)
    q = prior_points.reshape(1, -1).repeat(p.shape[0], 1)
    q = (q - q.mean(dim=1, keepdim=True)) / q.var(dim=1, keepdim=True)
    q = torch.softmax(q[:, : p.shape[1]], dim=1)
    return torch.sum(p * torch.log(p / q + 1e-5), dim=1).mean()


def loss_and_grads(quantizer, z):
    z = z.clone().requires_grad_(True)
    quantizer.codebook.grad = None
    out = quantizer(z)
    (out.loss + out.z_q.sum()).backward()
    return out, z.grad, quantizer.codebook.grad.clone()


# 16 codes x 64 prior columns = 1024 values: a latent of 8x8x16 uses all of them (the released
# setting), 4x4x16 the first 256 (cropped after standardizing the whole prior, as released).
@pytest.mark.parametrize("side", [8, 4])
def test_kepler_kl_term_matches_released_kepler_loss(side):
    weight = 0.7
    plain = spread_codebook(make_quantizer(num_codes=16))
    regularized = make_quantizer(num_codes=16, kepler_kl_weight=weight)
    assert regularized.kl_prior_points.shape == (16, 64)
    regularized.codebook.data.copy_(plain.codebook.data)
    z = torch.randn(2, 16, side, side)
    base, base_z_grad, base_codebook_grad = loss_and_grads(plain, z)
    out, z_grad, codebook_grad = loss_and_grads(regularized, z)

    codebook = plain.codebook.detach().double().requires_grad_(True)
    codewords = torch.nn.functional.embedding(base.indices.reshape(-1), codebook)
    z_q = codewords.view(2, side, side, 16)  # group partition: (b, h, w, p) rows are (B, H, W, C)
    expected = released_kepler_kl(z_q, regularized.kl_prior_points.double())
    expected.backward()
    torch.testing.assert_close(out.loss - base.loss, weight * expected.float(), rtol=1e-4, atol=1e-6)
    # The KL reaches the codebook only.
    assert torch.equal(z_grad, base_z_grad)
    scale = codebook.grad.abs().max().item() * weight
    torch.testing.assert_close(
        codebook_grad - base_codebook_grad, weight * codebook.grad.float(), rtol=1e-3, atol=1e-4 * scale
    )


def test_kepler_kl_prior_leaves_the_global_rng_alone_and_follows_the_seed():
    torch.manual_seed(3)
    plain = make_quantizer(num_codes=16)
    after_plain = torch.rand(4)
    torch.manual_seed(3)
    regularized = make_quantizer(num_codes=16, kepler_kl_weight=1.0)
    # Same codebook init and the same next random numbers: the prior drew nothing from torch.
    assert torch.equal(regularized.codebook, plain.codebook)
    assert torch.equal(torch.rand(4), after_plain)
    torch.manual_seed(3)
    assert torch.equal(make_quantizer(num_codes=16, kepler_kl_weight=1.0).kl_prior_points, regularized.kl_prior_points)
    starts = {
        int(make_quantizer(num_codes=16, kepler_kl_weight=1.0, kl_prior_seed=seed).kl_prior_points[0, :16]
            @ (2 ** torch.arange(15, -1, -1)).float())
        for seed in range(4)
    }
    assert len(starts) > 1  # the seed picks the prior's start row
    with pytest.raises(ValueError, match="kl_prior_seed must be >= 0"):
        make_quantizer(num_codes=16, kepler_kl_weight=1.0, kl_prior_seed=-1)
    with pytest.raises(ValueError, match="kl_prior_seed must be >= 0"):
        make_quantizer(num_codes=16, kl_prior_seed=-1)  # checked even while the KL is off


def test_kepler_kl_prior_tiles_past_its_end_and_takes_lattices():
    regularized = make_quantizer(num_codes=4, kepler_kl_weight=1.0, kl_prior="lattice:D4")
    assert regularized.kl_prior_points.shape == (4, 4)  # 16 prior values for 16 * 3 * 3 latents
    out = regularized(torch.randn(2, 16, 3, 3))
    assert torch.isfinite(out.loss)
    logq = regularized._kl_prior_logq(40)
    assert logq.shape == (1, 40)
    torch.testing.assert_close(logq.exp().sum(), torch.tensor(1.0))


def test_packing_term_is_the_codebook_packing_energy():
    from kepler.reference.packing_energy import packing_energy_ref

    weight, t = 0.3, 2.0
    plain = spread_codebook(make_quantizer(shared_codebook=False))
    regularized = make_quantizer(shared_codebook=False, packing_weight=weight, packing_t=t)
    regularized.codebook.data.copy_(plain.codebook.data)
    z = torch.randn(2, 16, 3, 3)
    base, base_z_grad, base_codebook_grad = loss_and_grads(plain, z)
    out, z_grad, codebook_grad = loss_and_grads(regularized, z)
    codebook = plain.codebook.detach().double().requires_grad_(True)
    expected = packing_energy_ref(codebook, t=t).mean()
    expected.backward()
    torch.testing.assert_close(out.loss - base.loss, weight * expected.float(), rtol=1e-5, atol=1e-6)
    assert torch.equal(z_grad, base_z_grad)
    torch.testing.assert_close(codebook_grad - base_codebook_grad, weight * codebook.grad.float(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_partition"])
def test_entropy_term_is_the_code_entropy_of_each_partition(shared):
    """The entropy loss is entropy_weight * (per_sample - gamma * batch) of each partition's
    sub-vectors against its codebook, averaged over partitions; both entropies land in loss_terms;
    its gradient reaches the sub-vectors and the codebook."""
    from kepler.reference.code_entropy import code_entropy_ref

    weight, gamma, temperature = 0.2, 0.8, 0.5
    plain = spread_codebook(make_quantizer(shared_codebook=shared))
    regularized = make_quantizer(
        shared_codebook=shared, entropy_weight=weight, entropy_gamma=gamma, entropy_temperature=temperature
    )
    regularized.codebook.data.copy_(plain.codebook.data)
    assert plain.loss_term_names() == () and regularized.loss_term_names() == ("entropy_per_sample", "entropy_batch")
    z = torch.randn(2, 16, 3, 3)
    base, base_z_grad, base_codebook_grad = loss_and_grads(plain, z)
    out, z_grad, codebook_grad = loss_and_grads(regularized, z)

    z64 = z.double().requires_grad_(True)
    codebook = plain.codebook.detach().double().requires_grad_(True)
    rows = z64.view(2, 4, 4, 3, 3).permute(1, 0, 3, 4, 2).reshape(4, 18, 4)  # (P, B*H*W, d): group partition
    per_sample, batch = code_entropy_ref(rows, codebook, temperature)
    expected = (per_sample - gamma * batch).mean()
    expected.backward()
    torch.testing.assert_close(out.loss - base.loss, weight * expected.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(regularized.loss_terms["entropy_per_sample"], per_sample.mean().float())
    torch.testing.assert_close(regularized.loss_terms["entropy_batch"], batch.mean().float())
    torch.testing.assert_close(z_grad - base_z_grad, weight * z64.grad.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(codebook_grad - base_codebook_grad, weight * codebook.grad.float(), rtol=1e-4, atol=1e-6)


def test_entropy_term_with_an_ema_codebook_reaches_the_sub_vectors_only():
    quantizer = make_quantizer(entropy_weight=0.5, ema_decay=0.9)
    z = torch.randn(2, 16, 3, 3, requires_grad=True)
    quantizer(z).loss.backward()
    assert z.grad.abs().sum() > 0 and quantizer.codebook.grad is None


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_partition"])
def test_l2_norm_searches_by_cosine_and_quantizes_to_unit_codewords(shared):
    """l2_norm: each sub-vector takes the codeword of the largest cosine similarity (not the nearest
    by distance), z_q holds unit codewords that indices_to_latents reproduces, the loss is the
    distance between unit vectors, and the gradient reaches z through the normalization."""
    quantizer = spread_codebook(make_quantizer(shared_codebook=shared, l2_norm=True))
    with torch.no_grad():  # codeword norms far apart, so cosine and Euclidean nearest differ
        quantizer.codebook.mul_(torch.rand(quantizer.codebook.shape[:-1]).unsqueeze(-1) * 10 + 0.1)
    z = torch.randn(2, 16, 3, 3, requires_grad=True)
    out = quantizer(z)
    rows = z.detach().view(2, 4, 4, 3, 3).permute(1, 0, 3, 4, 2).reshape(4, 18, 4)  # (P, positions, d)
    codebook = quantizer.codebook.detach().expand(4, -1, -1) if shared else quantizer.codebook.detach()
    cosine = torch.nn.functional.normalize(rows, dim=-1) @ torch.nn.functional.normalize(codebook, dim=-1).transpose(1, 2)
    expected = cosine.argmax(dim=-1).view(4, 2, 3, 3).permute(1, 2, 3, 0)
    assert torch.equal(out.indices, expected)
    euclidean = torch.cdist(rows, codebook).argmin(dim=-1).view(4, 2, 3, 3).permute(1, 2, 3, 0)
    assert not torch.equal(out.indices, euclidean)  # the test can tell the two searches apart
    parts = out.z_q.detach().view(2, 4, 4, 3, 3)
    torch.testing.assert_close(parts.norm(dim=2), torch.ones(2, 4, 3, 3))
    torch.testing.assert_close(quantizer.indices_to_latents(out.indices), out.z_q.detach())
    unit_rows = torch.nn.functional.normalize(rows, dim=-1).reshape(4, 2, 3, 3, 4).permute(1, 0, 4, 2, 3).reshape(2, 16, 3, 3)
    vq = (out.z_q.detach() - unit_rows).square().mean()
    torch.testing.assert_close(out.loss, (1 + quantizer.beta) * vq)
    out.z_q.sum().backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    words = quantizer.codewords()
    torch.testing.assert_close(words.norm(dim=-1), torch.ones(words.shape[:-1]))
    torch.testing.assert_close(quantizer.sub_vectors(z.detach()).norm(dim=-1), torch.ones(words.shape[0], 72 // words.shape[0]))


def test_l2_norm_with_an_ema_codebook_and_kmeans_init():
    quantizer = make_quantizer(l2_norm=True, ema_decay=0.9, init="kmeans")
    z = torch.randn(4, 16, 3, 3) * 5
    for _ in range(3):
        out = quantizer(z)
    assert torch.isfinite(out.loss) and quantizer.codebook_utilization() > 0.2
    torch.testing.assert_close(quantizer.codewords().norm(dim=-1), torch.ones(1, 32))
