"""kepler study: the statistics by hand, the config checks, and the --quick mode end to end."""

import contextlib
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kepler.cli import main
from kepler.study import config, report, runner, stats

ROOT = Path(__file__).resolve().parents[1]
STUDY_CONFIG = ROOT / "kepler" / "configs" / "study_sample.yaml"
PRIOR_STUDY_CONFIG = ROOT / "kepler" / "configs" / "study_prior.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------ statistics


def test_summarize_matches_hand_computed_mean_and_sample_sd():
    s = stats.summarize([1.0, 2.0, 4.0])
    assert s["mean"] == pytest.approx(7 / 3)
    # ((1 - 7/3)^2 + (2 - 7/3)^2 + (4 - 7/3)^2) / (3 - 1) = (16 + 1 + 25) / 9 / 2 = 7/3
    assert s["sd"] == pytest.approx(math.sqrt(7 / 3))
    assert (s["min"], s["max"], s["n"], s["values"]) == (1.0, 4.0, 3, [1.0, 2.0, 4.0])


def test_summarize_two_seeds_and_one_seed():
    two = stats.summarize([20.0, 22.0])
    assert two["mean"] == 21.0
    assert two["sd"] == pytest.approx(math.sqrt(2.0))  # |a - b| / sqrt(2)
    one = stats.summarize([5.0])
    assert one["mean"] == 5.0 and one["sd"] is None and one["n"] == 1


def test_summarize_keeps_a_diverged_seed_visible():
    assert math.isnan(stats.summarize([1.0, float("nan")])["mean"])


def test_summarize_rejects_no_values():
    with pytest.raises(ValueError, match="at least one value"):
        stats.summarize([])


def test_aggregate_groups_by_variant_in_run_order():
    runs = [
        {"variant": "a", "metrics": {"psnr": 20.0, "utilization": 0.5}},
        {"variant": "b", "metrics": {"psnr": 10.0, "utilization": 1.0}},
        {"variant": "a", "metrics": {"psnr": 22.0, "utilization": 0.7}},
        {"variant": "b", "metrics": {"psnr": 13.0, "utilization": 1.0}},
    ]
    out = stats.aggregate(runs, ["psnr", "utilization"])
    assert out["a"]["psnr"]["values"] == [20.0, 22.0]
    assert out["a"]["psnr"]["mean"] == 21.0
    assert out["a"]["utilization"]["mean"] == pytest.approx(0.6)
    assert out["a"]["utilization"]["sd"] == pytest.approx(math.sqrt(0.02))
    assert out["b"]["psnr"]["mean"] == 11.5
    assert out["b"]["psnr"]["sd"] == pytest.approx(1.5 * math.sqrt(2.0))
    assert out["b"]["utilization"]["sd"] == 0.0


def test_aggregate_skips_a_metric_missing_in_any_run():
    runs = [{"variant": "a", "metrics": {"psnr": 1.0, "min_nn": None}}, {"variant": "a", "metrics": {"psnr": 2.0}}]
    assert set(stats.aggregate(runs, ["psnr", "min_nn"])["a"]) == {"psnr"}


def test_outside_seed_noise_is_range_overlap():
    a = stats.summarize([1.0, 2.0])
    assert stats.outside_seed_noise(a, stats.summarize([2.5, 3.0])) is True
    assert stats.outside_seed_noise(stats.summarize([2.5, 3.0]), a) is True
    assert stats.outside_seed_noise(a, stats.summarize([1.5, 3.0])) is False
    assert stats.outside_seed_noise(a, stats.summarize([3.0])) is None


# ------------------------------------------------------------------------------ weight choice

BASELINE = {"psnr": 20.0, "perplexity": 6.0, "utilization": 0.9}
THRESHOLDS = {"psnr_db": 0.1, "perplexity_rel": 0.05, "utilization_abs": 0.05}


def test_visible_change_names_each_metric_that_moved():
    assert stats.visible_change(dict(BASELINE), BASELINE, THRESHOLDS) == []
    moved = stats.visible_change({"psnr": 19.8, "perplexity": 6.6, "utilization": 0.96}, BASELINE, THRESHOLDS)
    assert moved == ["PSNR -0.20 dB", "perplexity +10.0%", "utilization +0.060"]


def test_visible_change_within_seed_noise_does_not_count():
    def seeds(psnr_values, perplexity_values):
        per_seed = {"psnr": stats.summarize(psnr_values), "perplexity": stats.summarize(perplexity_values),
                    "utilization": stats.summarize([0.9, 0.9])}
        return {**{k: v["mean"] for k, v in per_seed.items()}, "seeds": per_seed}

    baseline = seeds([19.5, 20.5], [5.9, 6.1])
    # PSNR mean -0.5 dB, but the seed ranges overlap; perplexity +20% with disjoint ranges.
    run = seeds([19.2, 19.8], [7.1, 7.3])
    assert stats.visible_change(run, baseline, THRESHOLDS) == ["perplexity +20.0%"]
    # Disjoint PSNR ranges count.
    assert stats.visible_change(seeds([18.0, 19.0], [5.9, 6.1]), baseline, THRESHOLDS) == ["PSNR -1.50 dB"]
    # One seed on either side: means and thresholds alone.
    one_seed = {k: v for k, v in run.items() if k != "seeds"}
    assert stats.visible_change(one_seed, baseline, THRESHOLDS) == ["PSNR -0.50 dB", "perplexity +20.0%"]


def test_select_weight_best_psnr_among_visible_changes():
    candidates = [
        (1e-3, {"psnr": 20.05, "perplexity": 6.0, "utilization": 0.9}),  # invisible, though best PSNR
        (1e-2, {"psnr": 19.5, "perplexity": 7.0, "utilization": 0.9}),
        (1e-1, {"psnr": 19.9, "perplexity": 6.0, "utilization": 1.0}),
        (1.0, {"psnr": 15.0, "perplexity": 3.0, "utilization": 0.5}),
    ]
    choice = stats.select_weight(candidates, BASELINE, THRESHOLDS)
    assert choice["weight"] == 1e-1
    assert choice["visible"][repr(1e-3)] == []
    assert "visibly change" in choice["rule"]


def test_select_weight_without_visible_change_takes_the_largest():
    candidates = [(w, dict(BASELINE)) for w in (1e-3, 1e-1, 1e-2)]
    choice = stats.select_weight(candidates, BASELINE, THRESHOLDS)
    assert choice["weight"] == 1e-1
    assert choice["rule"].startswith("no swept weight")


def test_select_weight_needs_candidates():
    with pytest.raises(ValueError, match="at least one candidate"):
        stats.select_weight([], BASELINE, THRESHOLDS)


# ------------------------------------------------------------------------------ config


def test_override_strings_round_trip_through_the_trainer_config():
    from kepler.io.config import load_config

    overrides = [
        config.override_string("model.quantizer.kepler_kl_weight", 1e-8),
        config.override_string("model.quantizer.ema_decay", None),
        config.override_string("model.quantizer.shared_codebook", False),
        config.override_string("model.quantizer.init", "lattice:fcc"),
        config.override_string("model.ch_mult", [1, 2]),
    ]
    cfg = load_config(None, overrides)
    q = cfg.model.quantizer
    assert q.kepler_kl_weight == 1e-8 and q.ema_decay is None and q.shared_codebook is False
    assert q.init == "lattice:fcc" and list(cfg.model.ch_mult) == [1, 2]


def test_default_study_variants_all_spend_12_bits():
    from kepler.nn import build_quantizer
    from kepler.io.config import load_config, to_dict

    cfg = config.load_study_config(STUDY_CONFIG)
    assert len(cfg["seeds"]) == 2
    for name, variant in cfg["variants"].items():
        settings = {k: (1.0 if v == config.SWEEP_MARKER else v) for k, v in variant["set"].items()}
        overrides = [config.override_string(k, v) for k, v in {**cfg["common"], **settings}.items()]
        train_cfg = load_config(cfg["base"], overrides)
        quantizer_cfg = to_dict(train_cfg.model.quantizer)
        layout = config.quantizer_layout(build_quantizer(quantizer_cfg, dim=train_cfg.model.embed_dim), quantizer_cfg)
        assert layout["bits"] == 12.0, name
    assert cfg["variants"]["kepler_kl_released"]["set"]["model.quantizer.kepler_kl_weight"] == 1e-8


def _write(tmp_path, text):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


def test_load_study_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        config.load_study_config(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="no 'variants' entry"):
        config.load_study_config(_write(tmp_path, "base: x.yaml\nseeds: [0]\n"))
    with pytest.raises(ValueError, match="takes 'model.quantizer.packing_weight' from the sweep"):
        config.load_study_config(_write(
            tmp_path, "base: x.yaml\nseeds: [0]\nvariants:\n  a:\n    set: {model.quantizer.packing_weight: sweep}\n"))
    with pytest.raises(ValueError, match="compares to unknown variant 'b'"):
        config.load_study_config(_write(tmp_path, "base: x.yaml\nseeds: [0]\nvariants:\n  a: {set: {}, compare_to: b}\n"))
    with pytest.raises(ValueError, match=r"write 1.0e-3, not 1e-3"):
        config.load_study_config(_write(
            tmp_path,
            "base: x.yaml\nseeds: [0]\nvariants:\n  a: {set: {}}\n"
            "sweep: {variant: a, weights: {model.quantizer.packing_weight: ['1e-3']}}\n"))
    with pytest.raises(ValueError, match="'seeds' must be a non-empty list of ints"):
        config.load_study_config(_write(tmp_path, "base: x.yaml\nseeds: []\nvariants:\n  a: {set: {}}\n"))


def test_base_is_relative_to_the_study_config_and_stays_relative(tmp_path, monkeypatch):
    # The path is written into study.json and every run's result.json: no machine paths there.
    (tmp_path / "studies").mkdir()
    (tmp_path / "studies" / "mine.yaml").write_text("base: train.yaml\nseeds: [0]\nvariants:\n  a: {set: {}}\n")
    monkeypatch.chdir(tmp_path)
    assert config.load_study_config(Path("studies") / "mine.yaml")["base"] == str(Path("studies") / "train.yaml")


def test_a_builtin_base_is_kept_as_its_name(tmp_path, monkeypatch):
    # The built-in study, by name or by path: its base is the built-in name, the same in a checkout
    # and in an installed package.
    monkeypatch.chdir(ROOT)
    assert config.load_study_config("study_sample")["base"] == "sample"
    assert config.load_study_config(STUDY_CONFIG.relative_to(ROOT))["base"] == "sample"
    # A study of one's own can name a built-in base when no file of that name is beside it.
    mine = tmp_path / "mine.yaml"
    mine.write_text("base: sample\nseeds: [0]\nvariants:\n  a: {set: {}}\n")
    assert config.load_study_config(mine)["base"] == "sample"


def test_quick_block_replaces_budget_and_keeps_variants():
    full = config.load_study_config(STUDY_CONFIG)
    quick = config.load_study_config(STUDY_CONFIG, quick=True)
    assert quick["quick"] and not full["quick"]
    assert list(quick["variants"]) == list(full["variants"])
    assert quick["common"]["train.max_steps"] < full["common"]["train.max_steps"]
    assert quick["common"]["model.quantizer.init"] == "uniform"  # merged, not replaced
    assert set(quick["sweep"]["weights"]) == set(full["sweep"]["weights"])


# ------------------------------------------------------------------------------ one run


def test_run_log_holds_the_kepler_records_of_the_run_only(tmp_path):
    logger = logging.getLogger("kepler")
    level = logger.level
    logger.setLevel(logging.WARNING)  # as in a pool worker, where nothing lets INFO through
    try:
        logger.info("before the run")
        with runner._logged_to(tmp_path / "console.log"):
            logger.info("during the run")
            logging.getLogger("kepler.train").warning("a child logger's warning")
            logger.debug("a debug detail")
        logger.info("after the run")
        assert logger.level == logging.WARNING
    finally:
        logger.setLevel(level)
    assert (tmp_path / "console.log").read_text() == "during the run\na child logger's warning\n"


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    assert main(["study", str(STUDY_CONFIG), "--quick", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_quick_study_writes_every_output(quick_study):
    result = json.loads((quick_study / "study.json").read_text())
    variants = list(config.load_study_config(STUDY_CONFIG)["variants"])
    assert list(result["variants"]) == variants
    assert sorted({(r["variant"], r["seed"]) for r in result["runs"]}) == sorted((v, s) for v in variants for s in (0, 1))
    table = (quick_study / "study.md").read_text()
    for name in variants:
        assert f"| `{name}` | 12.0 |" in table
    for plot in ["curves.png", "usage.png", "codewords_kepler_3d.png", "codewords_kepler_fcc.png"]:
        data = (quick_study / plot).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, plot
    for run in result["runs"]:  # each run's log records, captured while it ran
        assert Path(run["run_dir"], "console.log").read_text(), run["run_dir"]
    for name in variants:
        summary = result["summary"][name]
        for metric, _, _ in report.TABLE_METRICS:
            assert summary[metric]["n"] == 2 and math.isfinite(summary[metric]["mean"]), (name, metric)


@pytest.mark.slow
def test_quick_study_weights_come_from_the_sweep(quick_study):
    result = json.loads((quick_study / "study.json").read_text())
    sweep = result["sweep"]
    swept = [("kepler_kl", "model.quantizer.kepler_kl_weight"), ("kepler_packing", "model.quantizer.packing_weight")]
    for variant, key in swept:
        chosen = sweep["params"][key]["weight"]
        assert chosen in [c["weight"] for c in sweep["params"][key]["candidates"]]
        field = key.rsplit(".", 1)[-1]
        assert result["variants"][variant]["layout"][field] == chosen
    assert "## Weight sweep" in (quick_study / "study.md").read_text()


@pytest.mark.slow
def test_quick_study_reuses_finished_runs(quick_study):
    cfg = config.load_study_config(STUDY_CONFIG, quick=True)
    again = runner.run_study(cfg, quick_study)
    assert all(r.get("reused") for r in again["runs"])


@pytest.mark.slow
def test_readme_section_is_generated_between_markers(quick_study, tmp_path):
    before = json.loads((quick_study / "study.json").read_text())
    readme = tmp_path / "README.md"
    begin, end = report.readme_markers(before["name"])
    other = "\n".join(report.readme_markers("another_study"))
    markers = f"{begin}\nold table\n{end}\n\n{other}"
    readme.write_text(f"# kepler\n\nintro\n\n## Results\n\n{markers}\n\nOur reading.\n")
    assert main(["study", str(STUDY_CONFIG), "--quick", "--out", str(quick_study), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# kepler\n\nintro\n\n## Results\n\n") and text.endswith("\n\nOur reading.\n")
    assert "old table" not in text and "| `kepler_fcc` | 12.0 |" in text
    assert other in text  # another study's section is left alone
    # every run was reused: the README reports the study that trained them
    assert f"Wall time: {before['wall_minutes']:.1f} min" in text
    assert f"Command: `{before['command']}`" in text


@pytest.mark.slow
def test_sweep_only_reuses_the_study_sweep_and_agrees(quick_study, capsys):
    assert main(["study", str(STUDY_CONFIG), "--quick", "--out", str(quick_study), "--sweep-only"]) == 0
    assert "(reused)" in capsys.readouterr().out
    sweep = json.loads((quick_study / "sweep.json").read_text())
    full = json.loads((quick_study / "study.json").read_text())["sweep"]
    assert {k: p["weight"] for k, p in sweep["params"].items()} == {k: p["weight"] for k, p in full["params"].items()}
    assert (quick_study / "sweep.md").read_text().startswith("# Weight sweep")


def test_equal_bits_study_variants_load_and_spend_their_budget():
    import torch

    from kepler.models import VQModel
    from kepler.io.config import load_config, to_dict

    study = config.load_study_config(ROOT / "kepler" / "configs" / "study_equal_bits.yaml")
    types = set()
    for name, variant in study["variants"].items():
        overrides = [config.override_string(k, v) for k, v in {**study["common"], **variant["set"]}.items()]
        cfg = to_dict(load_config(study["base"], overrides))
        with torch.device("meta"):
            quantizer = VQModel.from_config(cfg["model"]).quantize
        layout = config.quantizer_layout(quantizer, cfg["model"]["quantizer"])
        types.add(layout["type"])
        budget = int(name.rsplit("_", 1)[1])
        # Equal bits where the code allows it (FSQ 8,8,8,5,5,5 is 15.97); the Leech shell's single code is 17.6 bits.
        assert budget - 0.05 <= layout["bits"] <= budget + (1.6 if name.startswith("leech") else 0.7), name
        if layout["type"] == "residual":  # stages of the whole 32-d latent, P = 1 each
            assert layout["sub_dim"] == 32 and layout["stages"] == layout["partitions"] > 1, name
    assert types == {"kepler", "fsq", "lfq", "lattice", "residual"}


def test_recipe_study_variants_spend_12_bits_with_the_weights_ema_on_but_one():
    import torch

    from kepler.models import VQModel
    from kepler.io.config import load_config, to_dict

    study = config.load_study_config(ROOT / "kepler" / "configs" / "study_recipe.yaml")
    without_ema = []
    for name, variant in study["variants"].items():
        overrides = [config.override_string(k, v) for k, v in {**study["common"], **variant["set"]}.items()]
        cfg = to_dict(load_config(study["base"], overrides))
        with torch.device("meta"):
            quantizer = VQModel.from_config(cfg["model"]).quantize
        assert config.quantizer_layout(quantizer, cfg["model"]["quantizer"])["bits"] == 12.0, name
        assert cfg["model"]["quantizer"]["init"] == "uniform", name  # the start under which plain VQ collapses
        if cfg["train"]["ema_decay"] is None:
            without_ema.append(name)
    assert without_ema == ["plain_vq_no_ema"]


# ------------------------------------------------------------------------------ a prior per run


def test_prior_block_is_optional_and_resolved_like_base(tmp_path):
    assert config.load_study_config(STUDY_CONFIG)["prior"] is None
    study = config.load_study_config(PRIOR_STUDY_CONFIG)
    assert study["prior"]["config"] == "prior_sample"  # a built-in config is kept as its name
    assert study["prior"]["set"]["train.time_limit_minutes"] is None  # one step budget for every variant
    quick = config.load_study_config(PRIOR_STUDY_CONFIG, quick=True)
    assert quick["prior"]["set"]["train.max_steps"] < study["prior"]["set"]["train.max_steps"]
    assert quick["prior"]["set"]["train.time_limit_minutes"] is None  # merged, not replaced
    (tmp_path / "my_prior.yaml").write_text("name: my_prior\n")
    (tmp_path / "mine.yaml").write_text("base: sample\nseeds: [0]\nvariants:\n  a: {set: {}}\n"
                                        "prior: {config: my_prior.yaml}\n")
    assert config.load_study_config(tmp_path / "mine.yaml")["prior"] == {"config": str(tmp_path / "my_prior.yaml"),
                                                                         "set": {}}


def test_prior_block_errors(tmp_path):
    head = "base: sample\nseeds: [0]\nvariants:\n  a: {set: {}}\n"
    with pytest.raises(ValueError, match=r"'prior' must be a mapping whose 'config' names a prior config .* got 7"):
        config.load_study_config(_write(tmp_path, head + "prior: 7\n"))
    with pytest.raises(ValueError, match=r"'prior' must be a mapping whose 'config' names .* got \{'set': \{\}\}"):
        config.load_study_config(_write(tmp_path, head + "prior: {set: {}}\n"))
    with pytest.raises(ValueError, match=r"the prior's 'set' must be a mapping of prior config overrides, got \[1\]"):
        config.load_study_config(_write(tmp_path, head + "prior: {config: prior_sample, set: [1]}\n"))
    def prior_setting(key):
        return _write(tmp_path, head + f"prior: {{config: prior_sample, set: {{{key}: 1}}}}\n")

    with pytest.raises(ValueError, match=r"the prior sets 'data.size', which follows the tokenizer run's config .* "
                                         r"set it under 'common'"):
        config.load_study_config(prior_setting("data.size"))
    for key in ("tokenizer.checkpoint", "seed"):
        with pytest.raises(ValueError, match=rf"the prior sets '{key}', which each run sets \(tokenizer.checkpoint, "
                                             r"run_dir, seed, name: the run's tokenizer, folder, seed and name\)"):
            config.load_study_config(prior_setting(key))
    # The prior's config and overrides load before any run trains, however late the first prior would.
    with pytest.raises(ValueError, match=r"study.yaml: prior: unknown config key 'train.max_step' in overrides"):
        config.load_study_config(prior_setting("train.max_step"))
    with pytest.raises(FileNotFoundError, match=r"study.yaml: prior: config file \S*no_prior.yaml does not exist"):
        config.load_study_config(_write(tmp_path, head + "prior: {config: no_prior.yaml}\n"))
    # The quick block's prior overrides are checked too.
    with pytest.raises(ValueError, match=r"the prior sets 'data.val'"):
        config.load_study_config(_write(tmp_path, head + "prior: {config: prior_sample}\nquick: {prior: {data.val: x}}\n"),
                                 quick=True)


def test_without_a_prior_the_tables_and_jobs_are_as_before(tmp_path):
    study = config.load_study_config(STUDY_CONFIG)
    assert report.table_metrics(study) == report.TABLE_METRICS
    assert report.compared_metrics(study) == report.COMPARED_METRICS
    assert all(job["prior"] is None for job in runner._jobs_for(study, "kepler", {}, [0, 1], tmp_path, prior=True))
    with_prior = config.load_study_config(PRIOR_STUDY_CONFIG)
    assert report.table_metrics(with_prior)[-2:] == report.PRIOR_METRICS
    jobs = runner._jobs_for(with_prior, "kepler", {}, [0], tmp_path, prior=True)
    assert jobs[0]["prior"] == {"config": "prior_sample",
                                "overrides": ["train.max_steps=2000", "train.time_limit_minutes=null"]}
    # The sweep's runs train no prior.
    assert runner._jobs_for(with_prior, "kepler", {}, [0], tmp_path)[0]["prior"] is None


@pytest.fixture(scope="module")
def quick_prior_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("prior_study")
    assert main(["study", str(PRIOR_STUDY_CONFIG), "--quick", "--out", str(out)]) == 0
    return out


def _prior_checkpoint_times(out: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in sorted(out.glob("runs/*/seed*/prior/checkpoints/last.pt"))}


@pytest.mark.slow
def test_quick_prior_study_reports_bits_per_image(quick_prior_study):
    result = json.loads((quick_prior_study / "study.json").read_text())
    assert sorted((r["variant"], r["seed"]) for r in result["runs"]) == [("kepler", 0), ("kepler", 1),
                                                                         ("plain_vq", 0), ("plain_vq", 1)]
    for run in result["runs"]:
        prior, m = run["prior"], run["metrics"]
        # 16x16 crops, f4: 4x4 positions of P tokens each
        assert prior["tokens_per_map"] == 4 * 4 * run["layout"]["partitions"]
        assert set(runner.PRIOR_RESULT_METRICS) <= set(m)
        assert math.isfinite(m["prior_bits_per_image"]) and m["prior_bits_per_image"] > 0
        assert m["prior_bits_per_image"] == m["prior_bits_per_token"] * prior["tokens_per_map"]
        assert m["unigram_bits_per_image"] == prior["unigram_bits_per_token"] * prior["tokens_per_map"]
        assert prior["steps"] == 2 and Path(prior["run_dir"]) == Path(run["run_dir"]) / "prior"
        # The prior modelled this run's tokenizer, on the tokenizer run's held-out images.
        metrics = json.loads(Path(prior["run_dir"], "metrics.json").read_text())
        assert metrics["tokenizer"] == str(Path(run["run_dir"]) / "checkpoints" / "last.pt")
        assert metrics["val_maps"] == run["held_out_images"] == 4
    for name in ("plain_vq", "kepler"):
        bits = result["summary"][name]["prior_bits_per_image"]
        assert bits["n"] == 2 and bits["values"] == [r["metrics"]["prior_bits_per_image"]
                                                     for r in result["runs"] if r["variant"] == name]
    text = (quick_prior_study / "study.md").read_text()
    assert "| img/s | bits/img | unigram bits/img |" in text
    assert "| Δ eff. bits | Δ bits/img |" in text
    delta = (result["summary"]["kepler"]["prior_bits_per_image"]["mean"]
             - result["summary"]["plain_vq"]["prior_bits_per_image"]["mean"])
    assert f"| {delta:+.1f} (" in text.split("| Δ bits/img |", 1)[1]


@pytest.mark.slow
def test_quick_prior_study_readme_shows_bits_per_image(quick_prior_study, tmp_path, capsys):
    readme = tmp_path / "README.md"
    assert main(["study", str(PRIOR_STUDY_CONFIG), "--quick", "--out", str(quick_prior_study),
                 "--readme", str(readme)]) == 0
    assert capsys.readouterr().out.count("bits/image (reused)") == 4
    text = readme.read_text()
    begin, end = report.readme_markers("study_prior")
    block = text.split(begin, 1)[1].split(end, 1)[0]
    assert "| bits/img | unigram bits/img |" in block and "| Δ bits/img |" in block
    assert "under a prior trained on each run's own codes (`prior_sample`" in block


@pytest.mark.slow
def test_quick_prior_study_reuses_finished_priors(quick_prior_study):
    before = _prior_checkpoint_times(quick_prior_study)
    assert len(before) == 4
    again = runner.run_study(config.load_study_config(PRIOR_STUDY_CONFIG, quick=True), quick_prior_study)
    assert all(r.get("reused") for r in again["runs"])
    assert _prior_checkpoint_times(quick_prior_study) == before


@pytest.mark.slow
def test_a_changed_prior_config_retrains_only_the_prior(quick_prior_study, tmp_path):
    import shutil

    out = tmp_path / "study"
    shutil.copytree(quick_prior_study, out)
    tokenizers = {str(p): p.stat().st_mtime_ns for p in out.glob("runs/*/seed*/checkpoints/last.pt")}
    study = config.load_study_config(PRIOR_STUDY_CONFIG, quick=True)
    study["prior"]["set"]["train.max_steps"] = 3
    again = runner.run_study(study, out)
    assert all(r.get("tokenizer_reused") and not r.get("reused") for r in again["runs"])
    assert all(r["prior"]["steps"] == 3 and "train.max_steps=3" in r["prior"]["overrides"] for r in again["runs"])
    assert {str(p): p.stat().st_mtime_ns for p in out.glob("runs/*/seed*/checkpoints/last.pt")} == tokenizers
    # The same study without its prior: the tokenizer runs are reused and lose their priors.
    study["prior"] = None
    bare = runner.run_study(study, out)
    assert all(r.get("reused") and r["prior"] is None for r in bare["runs"])
    assert not any(set(runner.PRIOR_RESULT_METRICS) & set(r["metrics"]) for r in bare["runs"])
    assert not list(out.glob("runs/*/seed*/prior"))
    assert "prior_bits_per_image" not in bare["summary"]["kepler"]
    assert "bits/img" not in report.render_markdown(bare, "kepler study")


def _write_pid_then_sleep(path: str) -> None:
    """A pool job that stands for a long run: says which worker it is on, then keeps it busy."""
    Path(path).write_text(str(os.getpid()))
    time.sleep(120)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):  # a zombie still answers kill(pid, 0): it has stopped running
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers follow the study's death on Linux only")
def test_pool_workers_die_with_a_killed_study(tmp_path):
    pid_file = tmp_path / "worker.pid"
    study_script = tmp_path / "study.py"  # a file with a main guard: what a spawn pool's parent needs
    study_script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        if __name__ == "__main__":
            from test_study import _write_pid_then_sleep
            from kepler.study import runner
            with runner._Runner(2) as pool:
                pool.pool.submit(_write_pid_then_sleep, {str(pid_file)!r})
                time.sleep(120)
    """))
    study = subprocess.Popen([sys.executable, str(study_script)])
    try:
        deadline = time.monotonic() + 60
        while not pid_file.is_file() or not pid_file.read_text():
            assert time.monotonic() < deadline, "the worker never started"
            time.sleep(0.1)
        worker = int(pid_file.read_text())
    finally:
        study.kill()  # SIGKILL: the study runs no cleanup of its own
        study.wait()
    deadline = time.monotonic() + 30
    while _pid_alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = _pid_alive(worker)
    if alive:
        os.kill(worker, signal.SIGKILL)
    assert not alive, "the busy worker outlived the killed study"


def _write_pid_and_stop_on_sigterm(pid_file: str) -> str:
    """A stand-in run that stops on SIGTERM and returns, restoring the handler before it, as the
    trainer does: records its worker's pid (one line a run), then waits for the signal."""
    stopped = []
    previous = signal.signal(signal.SIGTERM, lambda *_: stopped.append(True))
    try:
        with open(pid_file, "a") as out:
            out.write(f"{os.getpid()}\n")
        deadline = time.monotonic() + 120
        while not stopped and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return pid_file


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers follow the study's death on Linux only")
def test_workers_whose_runs_stop_on_sigterm_end_with_a_killed_study(tmp_path):
    """The death signal comes as each thread of the study ends, while getppid() still names it: a
    worker whose run stopped on the first one took the job the executor had queued for it and trained
    it to the end as an orphan, or waited idle for good. Both workers must end."""
    pid_file = tmp_path / "runs.pid"
    study_script = tmp_path / "study.py"
    study_script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        if __name__ == "__main__":
            from test_study import _write_pid_and_stop_on_sigterm
            from kepler.study import runner
            with runner._Runner(2, work=_write_pid_and_stop_on_sigterm) as pool:
                for _ in range(6):
                    pool.submit({str(pid_file)!r})
                time.sleep(120)
    """))
    study = subprocess.Popen([sys.executable, str(study_script)])
    try:
        deadline = time.monotonic() + 60
        while not pid_file.is_file() or len(set(pid_file.read_text().split())) < 2:
            assert time.monotonic() < deadline, "the two workers never started"
            time.sleep(0.1)
        workers = sorted(set(int(pid) for pid in pid_file.read_text().split()))
    finally:
        study.kill()
        study.wait()
    deadline = time.monotonic() + 30
    while any(_pid_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = [w for w in workers if _pid_alive(w)]
    for worker in alive:
        os.kill(worker, signal.SIGKILL)
    assert not alive, f"workers {alive} outlived the killed study; runs started: {pid_file.read_text().split()}"


def test_in_process_each_run_is_handed_over_as_it_ends(monkeypatch):
    """jobs: 1 ran every run first and printed their lines after (with an ETA that meant nothing)."""
    events = []
    def work(job):
        events.append(("ran", job))
        return {"job": job}

    with runner._Runner(1, on_result=lambda result: events.append(("handed over", result["job"])), work=work) as pool:
        results = [pool.result(pool.submit(job)) for job in (1, 2)]
    assert events == [("ran", 1), ("handed over", 1), ("ran", 2), ("handed over", 2)]
    assert results == [{"job": 1}, {"job": 2}]


def test_planned_runs_counts_the_sweep_and_every_variant_and_seed():
    study = config.load_study_config(STUDY_CONFIG, quick=True)
    sweep = len(runner.sweep_jobs(study, Path("runs")))
    assert sweep > 0
    assert runner.planned_runs(study) == sweep + len(study["variants"]) * len(study["seeds"])
    assert runner.planned_runs(study, sweep_only=True) == sweep


def test_an_interrupted_study_starts_no_further_runs():
    with pytest.raises(KeyboardInterrupt), runner._Runner(2) as pool:
        futures = [pool.pool.submit(time.sleep, 0.5) for _ in range(8)]
        raise KeyboardInterrupt
    assert all(f.done() for f in futures)
    assert any(f.cancelled() for f in futures)


def test_select_variants_adds_references_and_keeps_the_sweep_only_when_needed():
    study = config.load_study_config(STUDY_CONFIG)
    kept = config.select_variants(study, ["kepler_e8"])
    assert list(kept["variants"]) == ["kepler", "kepler_e8"]  # its reference added, the config's order kept
    assert kept["sweep"] is None  # neither takes a swept weight
    assert kept["variants"]["kepler_e8"]["compare_to"] == "kepler"
    assert kept["variants"]["kepler"]["compare_to"] is None  # plain_vq is not in the selection
    assert config.select_variants(study, ["kepler_kl"])["sweep"] == study["sweep"]
    assert list(study["variants"])[0] == "plain_vq"  # the loaded study is left whole
    with pytest.raises(ValueError, match="unknown variant.*nope; its variants are plain_vq, kepler,"):
        config.select_variants(study, ["kepler", "nope"])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--variants", "nope"], "unknown variant(s) nope"),
        (["--variants", ","], "unknown variant(s) (none given)"),
        (["--variants", "kepler", "--readme", "README.md"], "--variants runs part of a study: --readme"),
        (["--variants", "kepler", "--sweep-only"], "--variants runs part of a study: --sweep-only"),
    ],
)
def test_variants_option_errors(extra, message, tmp_path, capsys):
    assert main(["study", str(STUDY_CONFIG), "--quick", "--out", str(tmp_path), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_study_of_some_variants_trains_their_runs_for_the_full_study(tmp_path, capsys):
    assert main(["study", str(STUDY_CONFIG), "--quick", "--out", str(tmp_path), "--variants", "kepler_e8"]) == 0
    # A line per run as it ends, with the count, the time per run and the ETA (plain on a terminal too).
    done = re.findall(r"^kepler study: kepler(?:_e8)? seed \d: PSNR .* in \d+\.\d min; (\d)/4 runs, "
                      r"\d+\.\d (?:runs/s|s/run), ETA \d+:\d\d:\d\d$", capsys.readouterr().out, re.MULTILINE)
    assert done == ["1", "2", "3", "4"]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["kepler", "kepler_e8"]
    report = json.loads((tmp_path / "variants_kepler_e8" / "study.json").read_text())
    assert list(report["variants"]) == ["kepler", "kepler_e8"] and report["sweep"] is None
    assert report["command"].endswith("--variants kepler_e8")
    assert not (tmp_path / "study.json").exists()  # the whole study's report is not replaced by a part
    study = config.load_study_config(STUDY_CONFIG, quick=True)
    jobs = runner._jobs_for(study, "kepler_e8", study["variants"]["kepler_e8"]["set"], study["seeds"],
                            tmp_path / "runs", prior=True)
    assert all(runner.run_one(job).get("reused") for job in jobs)  # what the full study would do with them


def test_ctrl_c_during_a_study_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    """SIGINT reaches the main thread as KeyboardInterrupt: it was a traceback."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_study", interrupted)
    assert main(["study", str(STUDY_CONFIG), "--quick", "--out", str(tmp_path)]) == 130
    assert capsys.readouterr().err == "kepler study: interrupted\n"
