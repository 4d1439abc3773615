"""train.compile: the compiled training forwards give the eager run's losses, step by step, within
float32 rounding (inductor fuses and reorders float32 arithmetic; nothing else may differ)."""

import json
from pathlib import Path

import pytest
import torch._dynamo

from kepler.cli import main
from test_prior_train import prior_config, train_tokenizer
from test_train import EVERY_OPTION, tiny_config

STEPS = 5


def train_losses(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k.endswith("loss") or k.startswith("entropy") or k == "lecam"}
            for r in records if r["event"] == "train"]


def fresh_dynamo() -> None:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()


def compiled_graphs() -> int:
    """Graphs dynamo captured in this process since the last :func:`fresh_dynamo`."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def assert_same_losses(eager: list[dict], compiled: list[dict]) -> None:
    """The first step's losses within float32 rounding (1e-6 relative); the later steps' within that
    rounding as four optimizer steps amplify it (1e-4 relative; measured: up to 1.5e-5)."""
    assert len(eager) == len(compiled) == STEPS
    for step, (a, b) in enumerate(zip(eager, compiled), start=1):
        assert a.keys() == b.keys(), step
        rel = 1e-6 if step == 1 else 1e-4
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=rel, abs=1e-7), (step, key)


def test_compiled_tokenizer_training_matches_eager(tmp_path, dino_weights):
    # Every option at once, the GAN from step 0: the DINO discriminator's two compiled forwards,
    # LeCam, the entropy op, l2-normalized codes, the weights' EMA and the adaptive weight's
    # gradients through the compiled generator.
    config = tiny_config(tmp_path, steps=STEPS, disc_start=0)
    options = [option.format(dino_weights=dino_weights) for option in EVERY_OPTION]
    runs = {}
    fresh_dynamo()
    for compiled in (False, True):
        assert compiled_graphs() == 0  # the eager run compiled nothing
        runs[compiled] = tmp_path / f"compile_{compiled}"
        assert main(["train", str(config), f"run_dir={runs[compiled]}", *options, "train.eval_every=5",
                     f"train.compile={compiled}"]) == 0
    assert compiled_graphs() >= 3  # the tokenizer (in pieces where it breaks) and both discriminator forwards
    eager, compiled = train_losses(runs[False]), train_losses(runs[True])
    assert {"loss", "d_loss", "g_loss", "quant_loss", "lecam", "entropy_batch"} <= eager[0].keys()
    assert_same_losses(eager, compiled)


def test_compiled_prior_training_matches_eager(tmp_path):
    tokenizer = train_tokenizer(tmp_path, partitions=2)
    config = prior_config(tmp_path, tokenizer, steps=STEPS)
    runs = {}
    fresh_dynamo()
    for compiled in (False, True):
        assert compiled_graphs() == 0
        runs[compiled] = tmp_path / f"prior_compile_{compiled}"
        # No dropout: the compiled graph draws its masks from another generator than eager does.
        assert main(["prior", "train", str(config), f"run_dir={runs[compiled]}", "model.dropout=0",
                     "train.eval_every=5", f"train.compile={compiled}"]) == 0
    assert compiled_graphs() >= 1  # whole graphs (fullgraph), recompiled where a shape changes
    assert_same_losses(train_losses(runs[False]), train_losses(runs[True]))
