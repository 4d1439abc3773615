"""CodeLayout (index map <-> sequence orders) and CodeTransformer (the code prior), tiny and on the CPU."""

import math

import pytest
import torch

from kepler.models import CodeLayout, CodeTransformer, filter_logits
from kepler.nn import KeplerQuantizer, Quantizer

ORDERS = ("flat", "factorized")
TINY = dict(d_model=16, num_layers=2, num_heads=2, mlp_ratio=2.0)


def tiny_prior(layout: CodeLayout, order: str, spread: float | None = 0.5, **options) -> CodeTransformer:
    """A 2-layer prior; ``spread`` re-draws every parameter from N(0, spread^2) so that logits vary by
    O(1) from code to code and step to step (at the 0.02 init they are all near zero, and a broken
    cache or filter could pass unnoticed)."""
    model = CodeTransformer(layout, order=order, **{**TINY, **options})
    if spread is not None:
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(0.0, spread)
    return model


def random_indices(layout: CodeLayout, batch: int = 2) -> torch.Tensor:
    shape = (batch, layout.height, layout.width, layout.tokens_per_position)
    return torch.randint(0, layout.codebook_size, shape)


def teacher_forced(indices: torch.Tensor, recorded: list):
    """A ``choose`` for :meth:`CodeTransformer.decode` that records each step's logits and picks the
    codes of ``indices``."""
    tokens = indices.reshape(indices.shape[0], -1)

    def choose(logits, token):
        recorded.append(logits)
        return tokens[:, token]

    return choose


# ---------------------------------------------------------------------------------------- layout


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-partition"])
@pytest.mark.parametrize("tokens", [1, 2, 4, 3])
def test_token_offsets_of_both_orders(tokens, shared):
    """A position's sub-code p with code k is token k (flat order, shared codebook) or p*K + k (the
    other three cases): the vocabularies the transformer embeds and reads out."""
    layout = CodeLayout(height=3, width=5, tokens_per_position=tokens, codebook_size=7, shared_codebook=shared)
    partition_offsets = [7 * p for p in range(tokens)]
    assert layout.partition_offsets().tolist() == partition_offsets
    assert layout.token_offsets("factorized").tolist() == partition_offsets
    assert layout.token_offsets("flat").tolist() == ([0] * tokens if shared else partition_offsets)
    assert layout.flat_vocab_size == (7 if shared else 7 * tokens) and layout.position_vocab_size == 7 * tokens
    assert layout.flat_length == 15 * tokens and layout.positions == 15
    with pytest.raises(ValueError, match="order must be one of 'flat', 'factorized', got 'raster'"):
        layout.token_offsets("raster")


def test_layout_from_any_protocol_quantizer():
    kepler = KeplerQuantizer(num_codes=16, dim=8, partitions=4, shared_codebook=False)
    assert CodeLayout.from_quantizer(kepler, (2, 3)) == CodeLayout(2, 3, 4, 16, False)
    # The bare protocol: only codebook_size, tokens_per_position and shared_codebook are read.
    bare = Quantizer(dim=6, codebook_size=9, tokens_per_position=3, shared_codebook=True)
    layout = CodeLayout.from_quantizer(bare, [4, 4])
    assert (layout.flat_length, layout.flat_vocab_size, layout.position_vocab_size) == (48, 9, 27)
    with pytest.raises(TypeError, match="quantizer must be a kepler.nn.Quantizer, got Linear"):
        CodeLayout.from_quantizer(torch.nn.Linear(2, 2), (2, 2))
    with pytest.raises(ValueError, match=r"latent_hw must be \(H, W\), got \(4,\)"):
        CodeLayout.from_quantizer(bare, (4,))


def test_layout_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="CodeLayout.codebook_size must be an int >= 1, got 0"):
        CodeLayout(2, 2, 2, 0, True)
    layout = CodeLayout(2, 2, 2, 5, False)
    with pytest.raises(ValueError, match=r"indices must be \(B, H, W, P\) = \(B, 2, 2, 2\), got shape \(1, 2, 2, 3\)"):
        layout.check_indices(torch.zeros(1, 2, 2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"indices must hold codes in \[0, 5\), got \[5, 5\]"):
        layout.check_indices(torch.full((1, 2, 2, 2), 5))
    with pytest.raises(TypeError, match="indices must be an int32 or int64 torch.Tensor"):
        layout.check_indices(torch.zeros(1, 2, 2, 2))


# ---------------------------------------------------------------------------------------- model


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-partition"])
@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("order", ORDERS)
def test_kv_cache_gives_the_logits_of_full_recomputation(order, tokens, shared):
    layout = CodeLayout(2, 3, tokens, 5, shared)
    model = tiny_prior(layout, order, num_classes=3).double().eval()  # no class dropout: the labels as given
    indices, labels = random_indices(layout), torch.tensor([2, 0])
    full = model(indices, labels)  # (B, N, P, K), one causal pass
    assert full.shape == (2, 6, tokens, 5) and full.dtype == torch.float64
    # float64 rounding of a few dozen-term sums, relative to the logits' size.
    tolerance = 1e3 * torch.finfo(torch.float64).eps * float(full.detach().abs().max())
    for use_cache in (True, False):
        recorded = []
        decoded = model.decode(teacher_forced(indices, recorded), 2, labels, use_cache=use_cache)
        assert torch.equal(decoded, indices)
        stepped = torch.stack(recorded, dim=1).view_as(full)
        torch.testing.assert_close(stepped, full, rtol=0, atol=tolerance)


@pytest.mark.parametrize("order", ORDERS)
def test_cached_and_recomputed_sampling_agree_in_float32(order):
    layout = CodeLayout(3, 3, 2, 6, False)
    model = tiny_prior(layout, order)
    cached = model.generate(3, generator=torch.Generator().manual_seed(5))
    recomputed = model.generate(3, generator=torch.Generator().manual_seed(5), use_cache=False)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("order", ORDERS)
def test_sampling_is_deterministic_for_a_seed(order):
    layout = CodeLayout(3, 4, 2, 8, True)
    model = tiny_prior(layout, order, spread=None)  # near-uniform logits: two seeds agree only by chance
    first = model.generate(2, generator=torch.Generator().manual_seed(0))
    again = model.generate(2, generator=torch.Generator().manual_seed(0))
    other = model.generate(2, generator=torch.Generator().manual_seed(1))
    assert first.shape == (2, 3, 4, 2) and first.dtype == torch.int64
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert int(first.min()) >= 0 and int(first.max()) < 8


def test_filter_logits_support():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]])
    logits = probs.log()

    def support(filtered):
        return [set(torch.nonzero(torch.isfinite(row)).flatten().tolist()) for row in filtered]

    assert support(filter_logits(logits, top_k=2)) == [{0, 1}, {2, 3}]
    assert support(filter_logits(logits, top_p=0.7)) == [{0, 1}, {2, 3}]
    assert support(filter_logits(logits, top_p=0.9)) == [{0, 1, 2}, {1, 2, 3}]
    assert support(filter_logits(logits, top_p=0.01)) == [{0}, {3}]  # the most likely code always stays
    assert support(filter_logits(logits, top_k=3, top_p=0.7)) == [{0, 1}, {2, 3}]
    assert torch.equal(filter_logits(logits, top_k=4, top_p=1.0), logits)
    kept = filter_logits(logits, top_k=2)
    assert torch.equal(kept[torch.isfinite(kept)], logits[torch.isfinite(kept)])  # kept logits unchanged


def _rank_of_choice(model, samples):
    """Rank (0 = most likely) of each sampled code among its step's teacher-forced logits: (B, N, P)."""
    logits = model(samples)
    chosen = logits.gather(-1, samples.reshape(*logits.shape[:-1], 1))
    return (logits > chosen).sum(dim=-1)


@pytest.mark.parametrize("order", ORDERS)
def test_top_k_and_top_p_restrict_what_is_sampled(order):
    layout = CodeLayout(4, 4, 2, 8, False)
    model = tiny_prior(layout, order).double()
    generator = torch.Generator().manual_seed(0)
    # A high temperature spreads the draws: without the filter, many would land outside the top 3.
    unfiltered = model.generate(4, temperature=5.0, generator=generator)
    assert (_rank_of_choice(model, unfiltered) >= 3).any()
    top3 = model.generate(4, temperature=5.0, top_k=3, generator=generator)
    assert (_rank_of_choice(model, top3) < 3).all()
    # Nucleus: each sampled code is inside the smallest set of likeliest codes reaching top_p.
    nucleus = model.generate(4, temperature=5.0, top_p=0.5, generator=generator)
    logits = model(nucleus) / 5.0
    probs = torch.softmax(logits, dim=-1)
    chosen = probs.gather(-1, nucleus.reshape(*probs.shape[:-1], 1))
    more_likely_mass = (probs * (probs > chosen)).sum(dim=-1)
    assert (more_likely_mass < 0.5).all()
    # top_k=1 and a tiny top_p are greedy decoding, whatever the seed.
    greedy = model.decode(lambda step_logits, token: step_logits.argmax(dim=-1), 2)
    for seed in (0, 1):
        assert torch.equal(model.generate(2, top_k=1, generator=torch.Generator().manual_seed(seed)), greedy)
        assert torch.equal(model.generate(2, top_p=1e-9, generator=torch.Generator().manual_seed(seed)), greedy)


def test_class_conditioning():
    layout = CodeLayout(2, 2, 2, 6, True)
    conditional = tiny_prior(layout, "flat", num_classes=4).eval()  # no class dropout: the labels as given
    indices = random_indices(layout)
    assert not torch.allclose(conditional(indices, torch.tensor([0, 0])), conditional(indices, torch.tensor([3, 3])))
    # One int stands for the whole batch.
    torch.testing.assert_close(conditional(indices, 3), conditional(indices, torch.tensor([3, 3])), rtol=0, atol=0)
    samples = conditional.generate(3, class_labels=1, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (3, 2, 2, 2)
    required = r"class_labels are required: this CodeTransformer is class-conditional \(num_classes=4\)"
    with pytest.raises(ValueError, match=required):
        conditional.generate(1)
    with pytest.raises(ValueError, match=r"class_labels must be in \[0, 4\) or 4 \(the null class\), got \[0, 5\]"):
        conditional(indices, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"class_labels must be \(2,\), got shape \(3,\)"):
        conditional(indices, torch.tensor([0, 1, 2]))
    unconditional = tiny_prior(layout, "flat")
    message = r"class_labels given to an unconditional CodeTransformer \(num_classes=0\)"
    with pytest.raises(ValueError, match=message):
        unconditional.generate(1, class_labels=0)
    with pytest.raises(ValueError, match=message):
        unconditional.nll(indices, torch.tensor([0, 0]))


@pytest.mark.parametrize("order", ORDERS)
def test_gradient_reaches_every_parameter(order):
    model = tiny_prior(CodeLayout(2, 2, 3, 5, False), order, spread=None, num_classes=2, dropout=0.1)
    indices = random_indices(model.layout, batch=4)
    model.loss(indices, torch.tensor([0, 1, 0, 1])).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and bool(param.grad.abs().sum() > 0), name


@pytest.mark.parametrize("order", ORDERS)
def test_nll_in_nats_and_bits(order):
    layout = CodeLayout(2, 3, 2, 5, True)
    model = tiny_prior(layout, order).double()
    indices = random_indices(layout, batch=3)
    nats = model.nll(indices)
    log_probs = torch.log_softmax(model(indices), dim=-1)
    expected = -log_probs.gather(-1, indices.reshape(3, 6, 2, 1)).reshape(3, -1).sum(dim=1)
    torch.testing.assert_close(nats, expected)
    torch.testing.assert_close(nats.mean() / layout.flat_length, model.loss(indices))
    # A prior whose readout is zero is uniform: exactly log2(K) bits per token.
    readout = model.readout if order == "flat" else model.head.readout
    with torch.no_grad():
        readout.weight.zero_()
        readout.bias.zero_()
    bits_per_token = model.nll(indices) / layout.flat_length / math.log(2)
    torch.testing.assert_close(bits_per_token, torch.full((3,), math.log2(5), dtype=torch.float64))


def test_constructor_and_sampling_errors():
    layout = CodeLayout(2, 2, 2, 4, True)
    with pytest.raises(ValueError, match="order must be one of 'flat', 'factorized', got 'zigzag'"):
        CodeTransformer(layout, order="zigzag")
    with pytest.raises(ValueError, match="d_model=20 must be a multiple of num_heads=8"):
        CodeTransformer(layout, d_model=20)
    with pytest.raises(ValueError, match="num_classes must be an int >= 0, got -1"):
        CodeTransformer(layout, num_classes=-1)
    with pytest.raises(TypeError, match="layout must be a CodeLayout, got dict"):
        CodeTransformer({"height": 2})
    model = tiny_prior(layout, "flat", spread=None)
    for temperature in (0, float("inf"), float("nan"), -1.0):  # inf made every logit tie: top-k was ignored
        with pytest.raises(ValueError, match=f"temperature must be a finite number > 0, got {temperature}"):
            model.generate(1, temperature=temperature)
    with pytest.raises(ValueError, match="top_k must be an int >= 1"):
        model.generate(1, top_k=0)
    with pytest.raises(ValueError, match=r"top_p must be a number in \(0, 1\], got 1.5"):
        model.generate(1, top_p=1.5)
    with pytest.raises(ValueError, match="num must be an int >= 1, got 0"):
        model.generate(0)


def test_decode_restores_training_mode():
    model = tiny_prior(CodeLayout(1, 2, 1, 3, True), "flat", spread=None, dropout=0.5)
    model.train()
    model.generate(1)
    assert model.training


# ---------------------------------------------------------------------------------------- compile


@pytest.mark.slow
@pytest.mark.parametrize("order", ORDERS)
def test_training_forward_compiles_without_graph_breaks(order):
    layout = CodeLayout(2, 2, 2, 5, False)
    model = tiny_prior(layout, order, num_classes=3)
    indices, labels = random_indices(layout), torch.tensor([1, 2])
    compiled = torch.compile(model, fullgraph=True)
    torch.manual_seed(0)  # the class dropout's draws: the same in both runs (inductor's own RNG off)
    eager = model(indices, labels).detach()
    tolerance = 1e3 * torch.finfo(torch.float32).eps * float(eager.abs().max())
    torch.manual_seed(0)
    with torch._inductor.config.patch(fallback_random=True):
        torch.testing.assert_close(compiled(indices, labels).detach(), eager, rtol=0, atol=tolerance)


@pytest.mark.slow
def test_cached_decode_step_compiles_without_graph_breaks():
    layout = CodeLayout(2, 2, 2, 5, True)
    model = tiny_prior(layout, "flat", num_classes=2)
    eager = model.generate(2, 1, generator=torch.Generator().manual_seed(3))
    model.decode_step = torch.compile(model.decode_step, fullgraph=True)
    compiled = model.generate(2, 1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(compiled, eager)


# ---------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("order", ORDERS)
def test_bf16_autocast_on_cuda(order):
    layout = CodeLayout(2, 3, 2, 5, False)
    model = tiny_prior(layout, order).cuda()
    indices = random_indices(layout).cuda()
    full = model(indices)
    assert full.dtype == torch.float32
    assert all(buffer.dtype == torch.bfloat16 for buffer in model.new_cache(2).keys)
    recorded = []
    model.decode(teacher_forced(indices, recorded), 2)
    # bf16 rounding (8 bits of mantissa) of the activations, a few layers deep, relative to the logits' size.
    tolerance = 16 * torch.finfo(torch.bfloat16).eps * float(full.detach().abs().max())
    torch.testing.assert_close(torch.stack(recorded, dim=1).view_as(full), full, rtol=0, atol=tolerance)
    generator = torch.Generator(device="cuda").manual_seed(0)
    first = model.generate(2, generator=generator)
    assert torch.equal(first, model.generate(2, generator=torch.Generator(device="cuda").manual_seed(0)))
