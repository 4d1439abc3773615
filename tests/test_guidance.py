"""Classifier-free guidance: class dropout to a learned null class in training, the guided logits of
one batched forward, the identities at scales 1 and 0, and old priors (without a null class)."""

import numpy as np
import pytest
import torch
from test_code_transformer import ORDERS, random_indices, teacher_forced, tiny_prior
from test_prior_train import FACES, prior_config, tokenizer  # noqa: F401 (tokenizer: a fixture)

from kepler.cli import main
from kepler.io.checkpoint import load_checkpoint, save_checkpoint
from kepler.io.config import defaults
from kepler.models import CodeLayout, CodeTransformer, guide
from kepler.models.load import load_model
from kepler.models.logits import guidance_scale

LAYOUT = CodeLayout(2, 3, 2, 6, False)


def seeded(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------- class dropout


def test_class_dropout_defaults_to_a_null_class_for_class_conditional_priors_only():
    assert defaults("prior")["model"]["class_dropout"] is None  # configs say null: "the default for the prior"
    conditional = CodeTransformer(LAYOUT, num_classes=3, d_model=16, num_layers=1, num_heads=2)
    assert conditional.class_dropout == 0.1 and conditional.null_class == 3
    assert conditional.start_embedding.weight.shape == (4, 16) and conditional.config["class_dropout"] == 0.1
    unconditional = CodeTransformer(LAYOUT, d_model=16, num_layers=1, num_heads=2)
    assert unconditional.class_dropout == 0.0 and unconditional.null_class is None
    assert unconditional.start_embedding.weight.shape == (1, 16)
    without = CodeTransformer(LAYOUT, num_classes=3, class_dropout=0, d_model=16, num_layers=1, num_heads=2)
    assert without.null_class is None and without.start_embedding.weight.shape == (3, 16)


def test_class_dropout_errors():
    for bad in (1.0, -0.1, True, "0.1"):
        with pytest.raises(ValueError, match=f"^class_dropout must be null or a number in \\[0, 1\\), got {bad!r}$"):
            CodeTransformer(LAYOUT, num_classes=2, class_dropout=bad)
    with pytest.raises(ValueError, match=r"^class_dropout=0.1 drops class labels, but this CodeTransformer is "
                                         r"unconditional \(num_classes=0\)$"):
        CodeTransformer(LAYOUT, class_dropout=0.1)


def starts_seen(model: CodeTransformer, indices: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The start-token rows ``model``'s forward looks up for ``labels``."""
    seen = []
    hook = model.start_embedding.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    try:
        model(indices, labels)
    finally:
        hook.remove()
    return seen[0]


def test_class_dropout_rate_is_honoured_in_training():
    layout = CodeLayout(1, 1, 1, 4, True)
    model = tiny_prior(layout, "flat", num_classes=5, class_dropout=0.25)
    count = 4000
    labels = torch.arange(count) % 5
    indices = random_indices(layout, batch=count)
    torch.manual_seed(0)
    rows = starts_seen(model, indices, labels)
    dropped = rows == 5
    # Binomial(4000, 0.25): 1000 +- 27; five standard deviations either side.
    assert abs(int(dropped.sum()) - 1000) < 5 * 27.4
    assert torch.equal(rows[~dropped], labels[~dropped])  # the others keep their class
    assert not torch.equal(dropped, labels == 0)  # drawn per label, not per class
    torch.manual_seed(0)
    assert torch.equal(starts_seen(model, indices, labels), rows)  # from torch's seeded RNG (resume is exact)
    model.eval()
    assert torch.equal(starts_seen(model, indices, labels), labels)  # never in eval mode
    model = tiny_prior(layout, "flat", num_classes=5, class_dropout=0.0)
    assert torch.equal(starts_seen(model, indices, labels), labels)


def test_the_training_forward_with_class_dropout_compiles_without_graph_breaks():
    model = tiny_prior(LAYOUT, "flat", num_classes=3, class_dropout=0.5)
    indices, labels = random_indices(LAYOUT, batch=8), torch.arange(8) % 3
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # dynamo's graph capture, eager kernels
    torch.manual_seed(4)
    eager = model(indices, labels)
    torch.manual_seed(4)
    assert torch.equal(compiled(indices, labels), eager)


# ---------------------------------------------------------------------------------------- guidance


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("order", ORDERS)
def test_scale_1_gives_the_conditional_samples_and_0_the_null_class_ones(order, dtype):
    """Exactly: at these scales only the half of the batch they weigh runs (its rows round as they do
    without guidance); a linear schedule to 0 weighs both halves, and is not 0 at the first step."""
    torch.manual_seed(2)  # the prior's weights: ones under which the classes' samples differ in several codes
    model = tiny_prior(LAYOUT, order, num_classes=3).to(dtype)
    labels = torch.arange(8) % 3
    sampling = dict(temperature=1.5, top_k=4)
    conditional = model.generate(8, labels, generator=seeded(), **sampling)
    unconditional = model.generate(8, model.null_class, generator=seeded(), **sampling)
    assert not torch.equal(conditional, unconditional)
    for schedule in ("constant", "linear"):  # the linear schedule ends at the scale; at 1 it is 1 throughout
        assert torch.equal(model.generate(8, labels, generator=seeded(), cfg_scale=1.0, cfg_schedule=schedule,
                                          **sampling), conditional)
    assert torch.equal(model.generate(8, labels, generator=seeded(), cfg_scale=0.0, **sampling), unconditional)
    for scale, schedule in ((4.0, "constant"), (0.0, "linear")):
        guided = model.generate(8, labels, generator=seeded(), cfg_scale=scale, cfg_schedule=schedule, **sampling)
        assert not torch.equal(guided, conditional) and not torch.equal(guided, unconditional)


@pytest.mark.parametrize("schedule", ["constant", "linear"])
@pytest.mark.parametrize("order", ORDERS)
def test_guided_logits_are_one_batched_forward_of_both_twins(order, schedule):
    """Through the cache, the conditional rows and their null-class twins run as one batch of 2B (one
    trunk step a step), and the guided logits are those of two separate forwards, guided."""
    model = tiny_prior(LAYOUT, order, num_classes=3).double()
    labels, indices = torch.tensor([2, 0]), random_indices(LAYOUT)
    conditional, unconditional, guided = [], [], []
    model.decode(teacher_forced(indices, conditional), 2, labels)
    model.decode(teacher_forced(indices, unconditional), 2, model.null_class)
    batches = []
    step = model.decode_step
    model.decode_step = lambda inputs, position, cache: batches.append(len(inputs)) or step(inputs, position, cache)
    decoded = model.decode(teacher_forced(indices, guided), 2, labels, cfg_scale=2.5, cfg_schedule=schedule)
    assert torch.equal(decoded, indices) and batches == [4] * model.steps
    for token, (cond, uncond, got) in enumerate(zip(conditional, unconditional, guided)):
        expected = guide(cond, uncond, guidance_scale(2.5, schedule, token, LAYOUT.flat_length))
        # float64 rounding of a few dozen-term sums (a batch of 4 rounds unlike one of 2), relative to the logits.
        tolerance = 1e3 * torch.finfo(torch.float64).eps * float(expected.abs().max())
        torch.testing.assert_close(got, expected, rtol=0, atol=tolerance)


def test_guide_is_the_formula_and_exact_at_both_ends():
    conditional, unconditional = torch.randn(5, 7), torch.randn(5, 7)
    assert torch.equal(guide(conditional, unconditional, 1.0), conditional)
    assert torch.equal(guide(conditional, unconditional, 0.0), unconditional)
    for scale in (0.3, 2.0, 7.5):
        torch.testing.assert_close(guide(conditional, unconditional, scale),
                                   unconditional + scale * (conditional - unconditional))


def test_the_linear_schedule_rises_to_the_scale():
    assert [guidance_scale(3.0, "linear", token, 4) for token in range(4)] == [1.5, 2.0, 2.5, 3.0]
    assert [guidance_scale(3.0, "constant", token, 4) for token in range(4)] == [3.0] * 4


def test_guidance_errors():
    unconditional = tiny_prior(LAYOUT, "flat", spread=None)
    with pytest.raises(ValueError, match=r"^classifier-free guidance needs a class-conditional prior; this "
                                         r"CodeTransformer is unconditional \(num_classes=0\)$"):
        unconditional.generate(1, cfg_scale=2.0)
    without = tiny_prior(LAYOUT, "flat", spread=None, num_classes=2, class_dropout=0.0)
    with pytest.raises(ValueError, match=r"^classifier-free guidance needs the null class, which a prior trained "
                                         r"with class_dropout=0 does not have \(train with model.class_dropout > 0\)$"):
        without.generate(1, 0, cfg_scale=2.0)
    model = tiny_prior(LAYOUT, "flat", spread=None, num_classes=2)
    for bad in (-1.0, float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match=f"^cfg_scale must be a finite number >= 0, got {bad!r}$"):
            model.generate(1, 0, cfg_scale=bad)
    with pytest.raises(ValueError, match=r"^cfg_schedule must be one of 'constant', 'linear', got 'cosine'$"):
        model.generate(1, 0, cfg_scale=2.0, cfg_schedule="cosine")


# ---------------------------------------------------------------------------------------- trained priors

CONDITIONAL = [*FACES, "model.num_classes=2"]


@pytest.fixture(scope="module")
def guided_prior(tmp_path_factory, tokenizer):  # noqa: F811 (the fixture imported above)
    """A class-conditional prior on the faces, trained 4 steps with class dropout 0.5."""
    folder = tmp_path_factory.mktemp("guided")
    run = folder / "run"
    assert main(["prior", "train", str(prior_config(folder, tokenizer, 4)), f"run_dir={run}", *CONDITIONAL,
                 "model.class_dropout=0.5"]) == 0
    return run / "checkpoints" / "last.pt"


def test_a_trained_prior_learns_its_null_class(guided_prior):
    state = load_checkpoint(guided_prior)
    assert state["config"]["model"]["class_dropout"] == 0.5
    assert state["model"]["start_embedding.weight"].shape == (3, 32)
    # Every start-token row reached a batch: the null class's too (AdamW's first moment; decay is outside it).
    names = [name for name, _ in load_model(guided_prior).model.named_parameters()]
    first_moment = state["opt"]["state"][names.index("start_embedding.weight")]["exp_avg"]
    assert all(row.abs().sum() > 0 for row in first_moment)


def test_kepler_sample_guides(guided_prior, tmp_path, capsys):
    def sample(name, *options):
        assert main(["sample", str(guided_prior), "--num", "3", "--class", "1", "--seed", "5", "--device", "cpu",
                     "--out", str(tmp_path / name), *options]) == 0
        return [np.load(tmp_path / name / f"sample{i:04d}.npy") for i in range(3)]

    plain, scale_1 = sample("plain"), sample("scale_1", "--cfg-scale", "1")
    assert all(np.array_equal(a, b) for a, b in zip(plain, scale_1))
    # 4 steps of training tell the classes apart little (most at the first code): a large scale shows it.
    guided = sample("guided", "--cfg-scale", "20")
    assert not all(np.array_equal(a, b) for a, b in zip(plain, guided))
    sample("linear", "--cfg-scale", "4", "--cfg-schedule", "linear")
    assert "3 samples (seed 5, guidance scale 4 linear)" in capsys.readouterr().out
    assert main(["sample", str(guided_prior), "--class", "1", "--cfg-schedule", "linear", "--out",
                 str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == "kepler sample: error: --cfg-schedule needs --cfg-scale\n"


def test_a_prior_saved_before_class_dropout_loads_without_a_null_class(tmp_path, tokenizer, capsys):  # noqa: F811
    run = tmp_path / "run"
    assert main(["prior", "train", str(prior_config(tmp_path, tokenizer, 1)), f"run_dir={run}", *CONDITIONAL,
                 "model.class_dropout=0"]) == 0
    checkpoint = run / "checkpoints" / "last.pt"
    state = load_checkpoint(checkpoint)
    del state["config"]["model"]["class_dropout"]  # as priors were saved before the key existed
    save_checkpoint(state, checkpoint)
    prior = load_model(checkpoint).model
    assert prior.class_dropout == 0.0 and prior.null_class is None
    assert torch.equal(prior.start_embedding.weight, state["model"]["start_embedding.weight"])
    capsys.readouterr()
    assert main(["sample", str(checkpoint), "--class", "0", "--cfg-scale", "2", "--out", str(tmp_path / "s")]) == 2
    assert capsys.readouterr().err == ("kepler sample: error: classifier-free guidance needs the null class, which a "
                                       "prior trained with class_dropout=0 does not have (train with "
                                       "model.class_dropout > 0)\n")
    # The key says there is a null class, the weights have none: refused, naming the table.
    state["config"]["model"]["class_dropout"] = 0.1
    save_checkpoint(state, checkpoint)
    with pytest.raises(ValueError) as error:
        load_model(checkpoint)
    assert "'start_embedding.weight': (2, 32) in the file, (3, 32) in the model" in str(error.value)
