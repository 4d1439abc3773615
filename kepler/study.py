"""``kepler study``: do the Kepler regularizers and the codebook partition help? Measured, not claimed.

A study trains a set of quantizer variants on the same data, step budget and seeds, evaluates each
on held-out images and writes, to its output folder:

* ``study.json``: everything (per run and aggregated over seeds, the weight sweep, the machine);
* ``study.md``: the design, the sweep, the results table (mean and spread over seeds) and each
  variant's difference to its reference with a seed-noise verdict;
* ``curves.png`` (validation PSNR and utilization against steps), ``usage.png`` (code usage per
  variant) and ``codewords_<variant>.png`` (the codewords of 3-D sub-codebooks).

The study config (``configs/study_sample.yaml``) names a trainer config every run starts from,
``common`` trainer overrides, the ``variants`` (trainer overrides each, and the reference each is
compared to) and the ``sweep``: a variant whose regularizer weight is ``sweep`` takes the weight the
sweep chose, never one written by hand. The sweep trains the sweep's base variant once per candidate
weight (and once with weight 0) for a shorter budget, and picks, per regularizer, the weight with
the best held-out PSNR among those that visibly change training (see :func:`select_weight`),
judged against a reference run of the same variant at weight 0 or at the sweep's ``reference``
weight for that key.

``--sweep-only`` runs just the sweep (``sweep.json``, ``sweep.md``); ``--readme README.md`` also writes
the results between the README's ``kepler-study`` markers.

Runs are independent processes (``jobs`` at a time, each with ``threads`` threads, by default
``cores // jobs``); a run
whose ``result.json`` matches its configuration is reused, so an interrupted study continues where
it stopped. ``--quick`` swaps in the config's ``quick`` block (a tiny model, a few steps) so every
variant and the sweep run end to end in a minute; the tests use it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

SWEEP_MARKER = "sweep"

# (key in a run's result, column header, digits): the results table, in order.
TABLE_METRICS = (
    ("psnr", "PSNR dB", 2),
    ("ssim", "SSIM", 3),
    ("l1", "L1", 4),
    ("utilization", "util.", 3),
    ("perplexity", "perplexity", 1),
    ("effective_bits", "eff. bits", 2),
    ("min_nn", "min NN", 3),
    ("mean_nn", "mean NN", 3),
    ("images_per_s", "img/s", 1),
)
# Differences to the reference variant shown in the comparison table.
COMPARED_METRICS = (("psnr", "PSNR dB", 2), ("utilization", "util.", 3), ("effective_bits", "eff. bits", 2))

DEFAULT_VISIBLE = {"psnr_db": 0.1, "perplexity_rel": 0.05, "utilization_abs": 0.05}


# ------------------------------------------------------------------------------------ config


def load_study_config(path: str | os.PathLike, quick: bool = False) -> dict:
    """The study config at ``path`` as plain containers, checked; with ``quick`` its ``quick`` block
    replaces ``seeds``/``jobs`` and is merged over ``common`` and ``sweep``.

    ``base`` (the trainer config) is resolved relative to the study config's folder.
    """
    from omegaconf import OmegaConf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"study config {path} does not exist")
    study = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(study, dict):
        raise ValueError(f"study config {path} must be a mapping")
    for key in ("base", "variants", "seeds"):
        if key not in study:
            raise ValueError(f"study config {path} has no {key!r} entry")
    # Relative to the study config's folder, kept as relative as the config path was given: the
    # path lands in study.json and in each run's result.json (the reuse check compares it).
    study["base"] = os.path.normpath(path.parent / study["base"]) if study["base"] else None
    study.setdefault("name", path.stem)
    study.setdefault("out", f"runs/{study['name']}")
    study.setdefault("jobs", 1)
    study.setdefault("common", {})
    study.setdefault("sweep", None)
    if quick:
        block = study.get("quick") or {}
        for key in ("seeds", "jobs", "threads", "out"):
            if key in block:
                study[key] = block[key]
        study["common"] = {**study["common"], **block.get("common", {})}
        if study["sweep"] is not None:
            sweep = dict(study["sweep"])
            sweep.update({k: v for k, v in block.get("sweep", {}).items() if k != "weights"})
            if "weights" in block.get("sweep", {}):
                sweep["weights"] = {**sweep["weights"], **block["sweep"]["weights"]}
            study["sweep"] = sweep
    study.pop("quick", None)
    study["quick"] = bool(quick)
    _check_study(study, path)
    return study


def _check_study(study: dict, path: Path) -> None:
    variants = study["variants"]
    if not isinstance(variants, dict) or not variants:
        raise ValueError(f"study config {path}: 'variants' must be a non-empty mapping")
    seeds = study["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"study config {path}: 'seeds' must be a non-empty list of ints, got {seeds!r}")
    if not isinstance(study["jobs"], int) or study["jobs"] < 1:
        raise ValueError(f"study config {path}: 'jobs' must be an int >= 1, got {study['jobs']!r}")
    swept_keys = set((study["sweep"] or {}).get("weights", {}))
    for name, variant in variants.items():
        settings = variant.get("set", {}) if isinstance(variant, dict) else None
        if settings is None or not isinstance(settings, dict):
            raise ValueError(f"study config {path}: variant {name!r} must be a mapping with a 'set' mapping")
        reference = variant.get("compare_to")
        if reference is not None and reference not in variants:
            raise ValueError(f"study config {path}: variant {name!r} compares to unknown variant {reference!r}")
        for key, value in settings.items():
            if value == SWEEP_MARKER and key not in swept_keys:
                raise ValueError(
                    f"study config {path}: variant {name!r} takes {key!r} from the sweep, "
                    f"but the sweep has no weights for it"
                )
    sweep = study["sweep"]
    if sweep is not None:
        if sweep.get("variant") not in variants:
            raise ValueError(f"study config {path}: the sweep's 'variant' must name a variant, got {sweep.get('variant')!r}")
        for key, weight in (sweep.get("reference") or {}).items():
            if key not in sweep.get("weights", {}) or weight in sweep["weights"][key]:
                raise ValueError(
                    f"study config {path}: the sweep's reference for {key!r} must name a swept key "
                    f"and a weight that is not one of its candidates, got {weight!r}"
                )
        for key, weights in sweep.get("weights", {}).items():
            if not isinstance(weights, list) or not weights or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0 for w in weights
            ):
                raise ValueError(
                    f"study config {path}: sweep weights for {key!r} must be a list of positive numbers "
                    f"(write 1.0e-3, not 1e-3, in YAML), got {weights!r}"
                )


def override_string(key: str, value) -> str:
    """``key=value`` as the trainer's :func:`kepler.train.config.load_config` parses it."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (list, tuple, dict)):
        text = json.dumps(value)
    else:
        text = str(value)
    return f"{key}={text}"


def bits_per_position(num_codes: int, partitions: int, scale: float = 1.0) -> float:
    """Bits one latent position costs: ``P * log2(K)`` with ``K = round(num_codes * scale)`` codes per
    sub-codebook (shared or not: each of the ``P`` sub-vectors gets its own index)."""
    codes = round(num_codes * scale)
    if codes < 1 or partitions < 1:
        raise ValueError(f"need num_codes * scale >= 1 and partitions >= 1, got {codes} codes, {partitions} partitions")
    return partitions * math.log2(codes)


def quantizer_layout(train_cfg) -> dict:
    """The code layout of a resolved trainer config: partitions, codes, sub-dimension, bits."""
    q = train_cfg.model.quantizer
    codes = round(q.num_codes * q.scale)
    return {
        "partitions": int(q.partitions),
        "num_codes": int(codes),
        "sub_dim": int(train_cfg.model.embed_dim) // int(q.partitions),
        "shared_codebook": bool(q.shared_codebook),
        "init": str(q.init),
        "kepler_kl_weight": float(q.kepler_kl_weight),
        "packing_weight": float(q.packing_weight),
        "bits": bits_per_position(int(q.num_codes), int(q.partitions), float(q.scale)),
    }


# ------------------------------------------------------------------------------------ statistics


def summarize(values: Sequence[float]) -> dict:
    """Mean and spread of one metric over seeds.

    Returns ``{"mean", "sd", "min", "max", "n", "values"}``; ``sd`` is the sample standard deviation
    (divisor ``n - 1``), None for a single value. Non-finite values are kept (they make the mean
    non-finite: a diverged seed must show).
    """
    values = [float(v) for v in values]
    if not values:
        raise ValueError("summarize needs at least one value")
    n = len(values)
    mean = math.fsum(values) / n
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "sd": sd, "min": min(values), "max": max(values), "n": n, "values": values}


def aggregate(runs: Iterable[Mapping], metrics: Iterable[str]) -> dict:
    """Per variant, :func:`summarize` of each metric over that variant's runs (in run order)."""
    metrics = list(metrics)
    grouped: dict[str, list[Mapping]] = {}
    for run in runs:
        grouped.setdefault(run["variant"], []).append(run)
    out = {}
    for variant, variant_runs in grouped.items():
        out[variant] = {
            m: summarize([r["metrics"][m] for r in variant_runs])
            for m in metrics
            if all(r["metrics"].get(m) is not None for r in variant_runs)
        }
    return out


def outside_seed_noise(a: Mapping, b: Mapping) -> bool | None:
    """True when the seed ranges ``[min, max]`` of two summaries do not overlap; None with one seed
    each (no noise estimate). With 2 seeds this is the most that can be said honestly."""
    if a["n"] < 2 or b["n"] < 2:
        return None
    return a["max"] < b["min"] or b["max"] < a["min"]


def _within_seed_noise(run: Mapping, baseline: Mapping, key: str) -> bool:
    """Whether both carry per-seed summaries (``"seeds"``, from :func:`summarize`) and
    :func:`outside_seed_noise` finds the change of ``key`` inside them; False with one seed."""
    a, b = run.get("seeds"), baseline.get("seeds")
    return a is not None and b is not None and outside_seed_noise(a[key], b[key]) is False


def visible_change(run: Mapping, baseline: Mapping, thresholds: Mapping) -> list[str]:
    """The held-out metrics in which ``run`` differs from ``baseline`` by at least ``thresholds``
    (``psnr_db`` absolute dB, ``perplexity_rel`` relative, ``utilization_abs`` absolute), comparing
    seed means; when both come from 2+ seeds (per-seed summaries under ``"seeds"``), a metric also
    counts only if the two seed ranges do not overlap, so a change within seed noise is not "visible"."""
    reasons = []
    d_psnr = run["psnr"] - baseline["psnr"]
    if abs(d_psnr) >= thresholds["psnr_db"] and not _within_seed_noise(run, baseline, "psnr"):
        reasons.append(f"PSNR {d_psnr:+.2f} dB")
    if baseline["perplexity"] > 0:
        rel = run["perplexity"] / baseline["perplexity"] - 1.0
        if abs(rel) >= thresholds["perplexity_rel"] and not _within_seed_noise(run, baseline, "perplexity"):
            reasons.append(f"perplexity {100 * rel:+.1f}%")
    d_util = run["utilization"] - baseline["utilization"]
    if abs(d_util) >= thresholds["utilization_abs"] and not _within_seed_noise(run, baseline, "utilization"):
        reasons.append(f"utilization {d_util:+.3f}")
    return reasons


def select_weight(candidates: Sequence[tuple[float, Mapping]], baseline: Mapping, thresholds: Mapping) -> dict:
    """Pick a regularizer weight from sweep results.

    Args:
        candidates: ``(weight, metrics)`` per swept weight; metrics hold held-out ``psnr``,
            ``perplexity`` and ``utilization``.
        baseline: the same metrics of the weight-0 run (same variant, seeds and budget).
        thresholds: see :func:`visible_change`.

    Returns ``{"weight", "rule", "visible": {weight: reasons}}``: the weight with the best PSNR among
    those that visibly change training; when none does, the largest weight (and the rule says so).
    """
    if not candidates:
        raise ValueError("select_weight needs at least one candidate weight")
    visible = {w: visible_change(m, baseline, thresholds) for w, m in candidates}
    changing = [(w, m) for w, m in candidates if visible[w]]
    if changing:
        weight = max(changing, key=lambda wm: (wm[1]["psnr"], -wm[0]))[0]
        rule = "best held-out PSNR among the weights that visibly change training"
    else:
        weight = max(w for w, _ in candidates)
        rule = "no swept weight visibly changed training: the largest one"
    return {"weight": weight, "rule": rule, "visible": {repr(w): r for w, r in visible.items()}}


# ------------------------------------------------------------------------------------ one run


def _normalized(codebook):
    """Centred, unit-RMS-radius copy of each (sub-)codebook ``(..., K, d)``: distances comparable
    across models whose latents have different scales."""
    centred = codebook - codebook.mean(dim=-2, keepdim=True)
    radius = centred.square().sum(dim=-1).mean(dim=-1, keepdim=True).sqrt().clamp_min(1e-12)
    return centred / radius.unsqueeze(-1)


def _held_out_counts(model, dataset, batch_size: int):
    """Per-partition code counts ``(P, K)`` of the model over ``dataset`` (no gradient)."""
    import torch

    from kepler.data import collate

    quantizer = model.quantize
    counts = torch.zeros(quantizer.partitions, quantizer.codebook_size, dtype=torch.int64)
    saved = quantizer.usage_counts.clone()
    try:
        for start in range(0, len(dataset), batch_size):
            images, _ = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            indices = model.encode_to_indices(images).reshape(-1, quantizer.partitions)
            for p in range(quantizer.partitions):
                counts[p] += torch.bincount(indices[:, p], minlength=quantizer.codebook_size)
    finally:
        quantizer.usage_counts.copy_(saved)
    return counts


def _curves(log_path: Path) -> dict:
    curves = {"step": [], "psnr": [], "utilization": []}
    for line in log_path.read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "eval":
            for key in curves:
                curves[key].append(record[key])
    return curves


def run_one(job: Mapping) -> dict:
    """Train, evaluate and summarize one run; writes and returns its ``result.json``.

    ``job``: ``{"variant", "seed", "base", "overrides", "runtime", "run_dir"}`` (plain values: it crosses a
    process boundary). A ``result.json`` already in ``run_dir`` with the same base config path and
    overrides is reused; anything else there is deleted and the run starts from scratch.
    """
    import torch

    from kepler.data import build_dataset
    from kepler.metrics import effective_bits, packing_report
    from kepler.train.config import load_config
    from kepler.train.evaluate import evaluate, load_model
    from kepler.train.trainer import train

    run_dir = Path(job["run_dir"])
    result_path = run_dir / "result.json"
    if result_path.is_file():
        cached = json.loads(result_path.read_text())
        if cached.get("overrides") == list(job["overrides"]) and cached.get("base") == job["base"]:
            cached["reused"] = True
            return cached
    if run_dir.exists():  # a stale or interrupted run: start it again from scratch
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    overrides = list(job["overrides"]) + list(job.get("runtime", ())) + [f"run_dir={run_dir}", f"seed={job['seed']}"]
    cfg = load_config(job["base"], overrides)
    started = time.perf_counter()
    with open(run_dir / "console.log", "w") as console, contextlib.redirect_stdout(console):
        train(cfg)
        checkpoint = run_dir / "checkpoints" / "last.pt"
        evaluation = evaluate(checkpoint, data=str(cfg.data.val), out=run_dir, device=str(cfg.device),
                              batch_size=int(cfg.data.val_batch_size), max_images=cfg.data.val_max_images,
                              print_table=False)
    held_out = next(iter(evaluation["resolutions"].values()))
    train_metrics = json.loads((run_dir / "metrics.json").read_text())

    model, _ = load_model(checkpoint)
    dataset = build_dataset(str(cfg.data.val), "val", int(cfg.data.size), cfg.data.resize)
    if cfg.data.val_max_images is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(int(cfg.data.val_max_images), len(dataset))))
    counts = _held_out_counts(model, dataset, int(cfg.data.val_batch_size))
    codebook = model.quantize.codebook.detach().double()
    grouped = codebook if codebook.dim() == 3 else codebook.unsqueeze(0)
    packing = packing_report(_normalized(grouped)).to_dict()
    layout = quantizer_layout(cfg)
    result = {
        "variant": job["variant"],
        "seed": int(job["seed"]),
        "run_dir": str(run_dir),
        "base": job["base"],
        "overrides": list(job["overrides"]),
        "layout": layout,
        "metrics": {
            "psnr": held_out["psnr"],
            "ssim": held_out["ssim"],
            "l1": held_out["l1"],
            "baseline_psnr": held_out["baseline_psnr"],
            "utilization": held_out["utilization"],
            "perplexity": held_out["perplexity"],
            "effective_bits": effective_bits(counts),
            "min_nn": min(_as_list(packing["min_nn_distance"])),
            "mean_nn": sum(_as_list(packing["mean_nn_distance"])) / len(_as_list(packing["mean_nn_distance"])),
            "images_per_s": train_metrics["train_images_per_s"],
        },
        "held_out_images": held_out["images"],
        "packing_raw": evaluation["packing"],
        "packing_normalized": packing,
        "curves": _curves(run_dir / "log.jsonl"),
        "usage_counts": counts.tolist(),
        "codewords": codebook.float().tolist() if layout["sub_dim"] == 3 else None,
        "wall_s": time.perf_counter() - started,
    }
    result_path.write_text(json.dumps(result))
    return result


def _as_list(value) -> list[float]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


# ------------------------------------------------------------------------------------ scheduling


def threads_per_run(study: Mapping) -> int:
    """The config's ``threads``, else the cores shared out over the runs at a time."""
    return study.get("threads") or max(1, (os.cpu_count() or 1) // study["jobs"])


def _jobs_for(study: dict, variant: str, settings: Mapping, seeds: Iterable[int], run_root: Path,
              extra: Sequence[str] = ()) -> list[dict]:
    overrides = [override_string(k, v) for k, v in study["common"].items()]
    overrides += [override_string(k, v) for k, v in settings.items()]
    overrides += list(extra) + [f"name={variant}"]
    # How the run is executed, not what it computes: not part of the reuse check.
    runtime = [f"train.threads={threads_per_run(study)}", "train.progress=false"]
    return [
        {"variant": variant, "seed": seed, "base": study["base"], "overrides": overrides, "runtime": runtime,
         "run_dir": str(run_root / variant / f"seed{seed}")}
        for seed in seeds
    ]


class _Runner:
    """Runs jobs in-process (``jobs == 1``) or in a spawn pool; prints a line per finished run."""

    def __init__(self, jobs: int):
        self.pool = ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) if jobs > 1 else None

    def submit(self, job: dict):
        if self.pool is not None:
            return self.pool.submit(run_one, job)
        done = Future()
        done.set_result(run_one(job))
        return done

    @staticmethod
    def result(future, job: dict) -> dict:
        result = future.result()
        m = result["metrics"]
        note = " (reused)" if result.get("reused") else f" in {result['wall_s'] / 60:.1f} min"
        print(f"kepler study: {job['variant']} seed {job['seed']}: PSNR {m['psnr']:.2f} dB, "
              f"utilization {m['utilization']:.3f}{note}", flush=True)
        return result

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()


def sweep_references(sweep: Mapping) -> dict:
    """Per swept key, the weight its candidates are judged against: the config's ``reference`` for
    that key, else 0 (the regularizer off)."""
    references = sweep.get("reference") or {}
    return {key: float(references.get(key, 0.0)) for key in sweep["weights"]}


def sweep_jobs(study: dict, run_root: Path) -> list[tuple[str, float, dict]]:
    """``(swept key, weight, job)`` per sweep run: each key's candidate weights and its reference
    weight (one shared run, key ``""``, for the keys judged against weight 0)."""
    sweep = study["sweep"]
    base_settings = {k: v for k, v in study["variants"][sweep["variant"]]["set"].items() if v != SWEEP_MARKER}
    extra = [f"train.max_steps={sweep['max_steps']}"] if "max_steps" in sweep else []
    if "eval_every" in sweep:
        extra.append(f"train.eval_every={sweep['eval_every']}")
    seeds = sweep.get("seeds", [study["seeds"][0]])
    references = sweep_references(sweep)
    jobs = []
    if 0.0 in references.values():
        jobs += [("", 0.0, job) for job in _jobs_for(study, "weight0", base_settings, seeds, run_root / "sweep", extra)]
    for key, weights in sweep["weights"].items():
        short = key.rsplit(".", 1)[-1]
        for weight in weights + ([references[key]] if references[key] else []):
            settings = {**base_settings, key: weight}
            name = f"{short}={weight:g}"
            jobs += [(key, float(weight), job) for job in _jobs_for(study, name, settings, seeds, run_root / "sweep", extra)]
    return jobs


def _seed_mean(results: Sequence[Mapping]) -> dict:
    """Seed means of the sweep metrics, and each one's :func:`summarize` over seeds under ``"seeds"``."""
    keys = ("psnr", "perplexity", "utilization", "effective_bits", "ssim", "l1")
    per_seed = {k: summarize([r["metrics"][k] for r in results]) for k in keys}
    return {**{k: v["mean"] for k, v in per_seed.items()}, "seeds": per_seed}


def summarize_sweep(study: dict, sweep_results: Sequence[tuple[str, float, dict]]) -> dict:
    """Per swept key: every weight's held-out metrics (seed mean), the reference run's, and the selection."""
    sweep = study["sweep"]
    thresholds = {**DEFAULT_VISIBLE, **sweep.get("visible", {})}
    by_weight: dict[tuple[str, float], list[dict]] = {}
    for key, weight, result in sweep_results:
        by_weight.setdefault((key, weight), []).append(result)
    out = {"variant": sweep["variant"], "thresholds": thresholds, "max_steps": sweep.get("max_steps"),
           "note": sweep.get("note", ""),
           "seeds": sweep.get("seeds", [study["seeds"][0]]), "params": {}}
    for key, reference in sweep_references(sweep).items():
        baseline = _seed_mean(by_weight[(key, reference)] if reference else by_weight[("", 0.0)])
        candidates = sorted((w, _seed_mean(by_weight[(key, float(w))])) for w in sweep["weights"][key])
        selection = select_weight(candidates, baseline, thresholds)
        out["params"][key] = {"reference_weight": reference, "reference": baseline,
                              "candidates": [{"weight": w, **m} for w, m in candidates], **selection}
    return out


def run_sweep_only(study: dict, out: Path) -> dict:
    """Only the weight sweep (``--sweep-only``): its summary, as :func:`summarize_sweep` gives it.
    A later full study reuses these runs."""
    if study["sweep"] is None:
        raise ValueError("the study config has no 'sweep' section")
    runner = _Runner(study["jobs"])
    try:
        pending = [(k, w, job, runner.submit(job)) for k, w, job in sweep_jobs(study, out / "runs")]
        results = [(k, w, runner.result(f, job)) for k, w, job, f in pending]
    finally:
        runner.close()
    return summarize_sweep(study, results)


def run_study(study: dict, out: Path) -> dict:
    """Run the sweep and every variant x seed (see the module docstring); returns ``study.json``'s content."""
    started = time.perf_counter()
    run_root = out / "runs"
    runner = _Runner(study["jobs"])
    try:
        pending_sweep = []
        if study["sweep"] is not None:
            pending_sweep = [(k, w, job, runner.submit(job)) for k, w, job in sweep_jobs(study, run_root)]
        independent, dependent = [], []
        for name, variant in study["variants"].items():
            (dependent if SWEEP_MARKER in variant["set"].values() else independent).append(name)
        pending = []
        for name in independent:
            for job in _jobs_for(study, name, study["variants"][name]["set"], study["seeds"], run_root):
                pending.append((job, runner.submit(job)))
        sweep_summary = None
        if pending_sweep:
            sweep_results = [(k, w, runner.result(f, job)) for k, w, job, f in pending_sweep]
            sweep_summary = summarize_sweep(study, sweep_results)
        for name in dependent:
            settings = {
                k: (sweep_summary["params"][k]["weight"] if v == SWEEP_MARKER else v)
                for k, v in study["variants"][name]["set"].items()
            }
            for job in _jobs_for(study, name, settings, study["seeds"], run_root):
                pending.append((job, runner.submit(job)))
        runs = [runner.result(f, job) for job, f in pending]
    finally:
        runner.close()
    order = list(study["variants"])
    runs.sort(key=lambda r: (order.index(r["variant"]), r["seed"]))
    return {
        "name": study["name"],
        "quick": study["quick"],
        "config": study,
        "machine": machine_info(study),
        "wall_minutes": (time.perf_counter() - started) / 60,
        "sweep": sweep_summary,
        "variants": {
            name: {"label": v.get("label", name), "compare_to": v.get("compare_to"),
                   "note": v.get("note", ""), "layout": next(r["layout"] for r in runs if r["variant"] == name)}
            for name, v in study["variants"].items()
        },
        "summary": aggregate(runs, [m for m, _, _ in TABLE_METRICS] + ["baseline_psnr"]),
        "runs": runs,
    }


def machine_info(study: Mapping) -> dict:
    import torch

    return {
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "parallel_runs": study["jobs"],
        "threads_per_run": threads_per_run(study),
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


# ------------------------------------------------------------------------------------ report


def _fmt(summary: Mapping | None, digits: int) -> str:
    if summary is None:
        return "-"
    if summary["sd"] is None:
        return f"{summary['mean']:.{digits}f}"
    return f"{summary['mean']:.{digits}f} ± {summary['sd']:.{digits}f}"


def _layout_text(layout: Mapping) -> str:
    kind = "shared" if layout["shared_codebook"] or layout["partitions"] == 1 else "per-partition"
    return f"{layout['partitions']} x {layout['sub_dim']}-d, K={layout['num_codes']} ({kind})"


def _regularizer_text(layout: Mapping) -> str:
    parts = []
    if layout["kepler_kl_weight"]:
        parts.append(f"Kepler KL {layout['kepler_kl_weight']:g}")
    if layout["packing_weight"]:
        parts.append(f"packing {layout['packing_weight']:g}")
    return ", ".join(parts) or "none"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _header_lines(result: Mapping, command: str) -> list[str]:
    study, machine = result["config"], result["machine"]
    seeds = study["seeds"]
    return [
        f"Command: `{command}`  ",
        f"Machine: {machine['processor']}, {machine['cpu_count']} cores; {machine['parallel_runs']} run(s) at a time, "
        f"{machine['threads_per_run']} thread(s) each; torch {machine['torch']}, Python {machine['python']}.  ",
        f"Wall time: {result['wall_minutes']:.1f} min. Seeds: {', '.join(map(str, seeds))}. "
        f"Values are mean ± sample standard deviation over the {len(seeds)} seeds.",
        "",
    ]


def _results_lines(result: Mapping, heading: str) -> list[str]:
    """The results table and the differences to each reference, under ``heading``-level titles."""
    summary = result["summary"]
    lines = [f"{heading} Results", "", f"Held-out images per run: {result['runs'][0]['held_out_images']}.", ""]
    rows = []
    for name, v in result["variants"].items():
        stats = summary[name]
        rows.append([f"`{name}`", f"{v['layout']['bits']:.1f}"] + [_fmt(stats.get(m), d) for m, _, d in TABLE_METRICS])
    lines += _table(["variant", "bits"] + [h for _, h, _ in TABLE_METRICS], rows)
    lines += ["", f"{heading} Differences to the reference variant", "",
              "Outside seed noise = the seeds' [min, max] ranges of the two variants do not overlap "
              "(with 2 seeds this is weak evidence either way).", ""]
    rows = []
    for name, v in result["variants"].items():
        reference = v["compare_to"]
        if reference is None:
            continue
        row = [f"`{name}` vs `{reference}`"]
        for m, _, d in COMPARED_METRICS:
            a, b = summary[name][m], summary[reference][m]
            verdict = outside_seed_noise(a, b)
            tag = {True: "outside noise", False: "within noise", None: "one seed"}[verdict]
            row.append(f"{a['mean'] - b['mean']:+.{d}f} ({tag})")
        rows.append(row)
    lines += _table(["variant vs reference"] + [f"Δ {h}" for _, h, _ in COMPARED_METRICS], rows)
    return lines


def _sweep_lines(sweep: Mapping) -> list[str]:
    """The weight sweep section: the rule, each key's reference run, candidates and choice."""
    lines = ["## Weight sweep", "",
             f"Variant `{sweep['variant']}`, {sweep['max_steps'] or 'full'} steps, seed(s) "
             f"{', '.join(map(str, sweep['seeds']))}. A weight *visibly changes training* when a held-out "
             f"metric moves from the reference run (same variant, seeds and budget at the reference weight) "
             f"by at least {sweep['thresholds']['psnr_db']} dB PSNR, "
             f"{100 * sweep['thresholds']['perplexity_rel']:.0f}% perplexity or "
             f"{sweep['thresholds']['utilization_abs']} utilization"
             + (" (seed means), and the two runs' seed ranges of that metric do not overlap."
                if len(sweep["seeds"]) > 1 else "."), ""]
    if sweep.get("note"):
        lines += [sweep["note"].strip(), ""]
    for key, param in sweep["params"].items():
        ref = param["reference"]
        lines += [f"`{key}`: reference weight {param['reference_weight']:g} (PSNR {ref['psnr']:.2f} dB, "
                  f"utilization {ref['utilization']:.3f}, perplexity {ref['perplexity']:.2f}); "
                  f"chosen {param['weight']:g} ({param['rule']}).", ""]
        rows = []
        for c in param["candidates"]:
            reasons = param["visible"][repr(c["weight"])]
            chosen = " **chosen**" if c["weight"] == param["weight"] else ""
            rows.append([f"{c['weight']:g}{chosen}", f"{c['psnr']:.2f}", f"{c['utilization']:.3f}",
                         f"{c['perplexity']:.2f}", f"{c['effective_bits']:.2f}", "; ".join(reasons) or "no"])
        lines += _table(["weight", "PSNR dB", "util.", "perplexity", "eff. bits", "visible change"], rows)
        lines.append("")
    return lines


def render_markdown(result: Mapping, command: str) -> str:
    """``study.md`` from :func:`run_study`'s result."""
    study, summary = result["config"], result["summary"]
    title = f"# Codebook study: {result['name']}"
    lines = [title + (" (quick mode: a smoke test, not a result)" if result["quick"] else ""), ""]
    lines += _header_lines(result, command)
    if study.get("description"):
        lines += [study["description"].strip(), ""]
    lines += ["## Variants", ""]
    rows = []
    for name, v in result["variants"].items():
        layout = v["layout"]
        rows.append([f"`{name}`", v["label"], _layout_text(layout), f"{layout['bits']:.1f}", layout["init"],
                     _regularizer_text(layout), f"`{v['compare_to']}`" if v["compare_to"] else "-"])
    header = ["variant", "what", "code layout (P x d, K)", "bits/position", "init", "regularizer", "compared to"]
    lines += _table(header, rows)
    lines.append("")
    if result["sweep"] is not None:
        lines += _sweep_lines(result["sweep"])
    lines += _results_lines(result, "##")
    lines += ["", "## Plots", "", "![validation curves](curves.png)", "", "![code usage](usage.png)", ""]
    for name, v in result["variants"].items():
        if v["layout"]["sub_dim"] == 3:
            lines += [f"![codewords of {name}](codewords_{name}.png)", ""]
    lines += ["## How to read the columns", "",
              "- PSNR, SSIM, L1: held-out reconstructions in [0, 1] (L1 in [-1, 1] units), averaged per image. "
              f"The mean-colour baseline (each image painted its own mean colour) scores "
              f"{summary[next(iter(summary))]['baseline_psnr']['mean']:.2f} dB: a variant below it reconstructs "
              "worse than that trivial baseline, so differences between such variants say little about "
              "converged tokenizers.",
              "- util.: fraction of codebook entries used at least once on the held-out images; perplexity: "
              "exp(entropy) of the code distribution as the quantizer reports it (pooled over partitions for a "
              "shared codebook, mean over partitions otherwise). Both are bounded by the number of held-out "
              "sub-vectors, so a 4096-code plain codebook cannot be fully used by a few thousand positions.",
              "- eff. bits: sum over partitions of the entropy (bits) of each partition's code distribution on "
              "the held-out images: what an entropy coder would spend per position, comparable across layouts.",
              "- min NN / mean NN: the packing report's minimum and mean nearest-neighbour distance between "
              "codewords, after centring each (sub-)codebook and scaling it to unit RMS radius (latent scales "
              "differ between models); the minimum over sub-codebooks and the mean of their means.",
              "- img/s: training throughput of one run (images per second), with the runs sharing the machine as above.",
              ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(result: Mapping, path: Path) -> Path:
    """Validation PSNR and utilization against steps: one line (seed mean) per variant, seed range shaded."""
    import numpy as np

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in result["variants"]:
        runs = [r for r in result["runs"] if r["variant"] == name]
        steps = runs[0]["curves"]["step"]
        if not steps or any(r["curves"]["step"] != steps for r in runs):
            continue
        for ax, key in zip(axes, ("psnr", "utilization")):
            values = np.array([r["curves"][key] for r in runs], dtype=float)
            (line,) = ax.plot(steps, values.mean(axis=0), marker="o", markersize=3, label=name)
            if len(runs) > 1:
                ax.fill_between(steps, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.15)
    axes[0].set_ylabel("validation PSNR (dB)")
    axes[1].set_ylabel("validation codebook utilization")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="best")
    fig.suptitle("Held-out metrics during training (mean over seeds, range shaded)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_usage(result: Mapping, path: Path) -> Path:
    """One panel per variant: held-out usage frequency of each codebook entry, most used first
    (summed over seeds; over partitions for a shared codebook, all P x K entries otherwise)."""
    import numpy as np

    plt = _pyplot()
    names = list(result["variants"])
    columns = min(3, len(names))
    rows = math.ceil(len(names) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        runs = [r for r in result["runs"] if r["variant"] == name]
        counts = np.sum([np.array(r["usage_counts"], dtype=float) for r in runs], axis=0)  # (P, K)
        layout = result["variants"][name]["layout"]
        entries = counts.sum(axis=0) if layout["shared_codebook"] else counts.reshape(-1)
        freq = np.sort(entries)[::-1] / max(entries.sum(), 1.0)
        if len(freq) > 64:  # a large codebook: ranks on a log axis, or its tail is invisible
            ax.step(np.arange(1, len(freq) + 1), freq, where="mid", color="tab:blue")
            ax.set_xscale("log")
        else:
            ax.bar(np.arange(1, len(freq) + 1), freq, width=1.0, color="tab:blue")
        used = (entries > 0).mean()
        ax.set_title(f"{name}\n{len(entries)} entries, {100 * used:.0f}% used", fontsize=9)
        ax.set_xlabel("codebook entry, most used first", fontsize=8)
        ax.set_ylabel("share of held-out uses", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_codewords(result: Mapping, name: str, path: Path) -> Path:
    """3-D scatter of a variant's final codewords (first seed), one colour per sub-codebook."""
    import numpy as np

    plt = _pyplot()
    run = next(r for r in result["runs"] if r["variant"] == name)
    codewords = np.array(run["codewords"], dtype=float)
    groups = codewords if codewords.ndim == 3 else codewords[None]
    fig = plt.figure(figsize=(5.5, 5))
    ax = fig.add_subplot(projection="3d")
    for g, points in enumerate(groups):
        label = f"partition {g}" if len(groups) > 1 else "shared codebook"
        ax.scatter(points[:, 0], points[:, 1], points[:, 2], s=30, label=label)
    ax.set_title(f"{name}: codewords (seed {run['seed']})", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


README_BEGIN = "<!-- kepler-study:begin (generated by `kepler study --readme`; edit outside these markers) -->"
README_END = "<!-- kepler-study:end -->"


def update_readme(readme: Path, result: Mapping, command: str, out: Path) -> Path:
    """Write the study's command, machine, results and differences between the README's
    ``README_BEGIN``/``README_END`` markers (appended under a "Results" heading when absent); the
    text around the markers (the reading of the results) is left alone."""
    body = _header_lines(result, command) + _results_lines(result, "###")
    body += ["", f"Full report with the design, the weight sweep and the plots: `{out / 'study.md'}`."]
    block = "\n".join([README_BEGIN, *body, README_END])
    text = readme.read_text() if readme.exists() else ""
    if README_BEGIN in text and README_END in text:
        head, rest = text.split(README_BEGIN, 1)
        text = head + block + rest.split(README_END, 1)[1]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + "## Results\n\n" + block + "\n"
    readme.write_text(text)
    return readme


def write_outputs(result: dict, out: Path, command: str) -> list[Path]:
    """``study.json``, ``study.md`` and the plots into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    result["command"] = command
    written = [plot_curves(result, out / "curves.png"), plot_usage(result, out / "usage.png")]
    for name, v in result["variants"].items():
        if v["layout"]["sub_dim"] == 3:
            written.append(plot_codewords(result, name, out / f"codewords_{name}.png"))
    (out / "study.json").write_text(json.dumps(result, indent=1))
    (out / "study.md").write_text(render_markdown(result, command))
    return [out / "study.json", out / "study.md"] + written


# ------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``kepler study`` arguments."""
    parser.add_argument("config", help="study config (YAML), e.g. configs/study_sample.yaml")
    parser.add_argument("--quick", action="store_true",
                        help="the config's quick block: tiny model, a few steps per variant (a smoke test)")
    parser.add_argument("--out", default=None, help="output folder (default: the config's 'out')")
    parser.add_argument("--jobs", type=int, default=None, help="runs at a time (default: the config's 'jobs')")
    parser.add_argument("--sweep-only", action="store_true",
                        help="run only the weight sweep; writes sweep.json and sweep.md (the study reuses its runs)")
    parser.add_argument("--readme", default=None, metavar="README",
                        help="also write the results between the kepler-study markers of this README "
                             "(finished runs are reused, so this is quick after a study)")


def main(args: argparse.Namespace) -> int:
    study = load_study_config(args.config, quick=args.quick)
    if args.jobs is not None:
        if args.jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
        study["jobs"] = args.jobs
    out = Path(args.out or study["out"])
    command = "kepler study " + " ".join(
        [str(args.config)] + (["--quick"] if args.quick else []) + ([f"--out {args.out}"] if args.out else [])
        + ([f"--jobs {args.jobs}"] if args.jobs is not None else [])
    )
    print(f"kepler study: {len(study['variants'])} variants x {len(study['seeds'])} seeds"
          + (" + a weight sweep" if study["sweep"] else "") + f", {study['jobs']} run(s) at a time -> {out}",
          flush=True)
    if args.sweep_only:
        summary = run_sweep_only(study, out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "sweep.json").write_text(json.dumps(summary, indent=1))
        title = [f"# Weight sweep: {study['name']}", "", f"Command: `{command} --sweep-only`", ""]
        (out / "sweep.md").write_text("\n".join(title + _sweep_lines(summary)[2:]))
        for key, param in summary["params"].items():
            print(f"kepler study: {key} = {param['weight']:g} ({param['rule']})")
        print(f"kepler study: wrote {out / 'sweep.json'}, {out / 'sweep.md'}")
        return 0
    previous_path = out / "study.json"
    previous = json.loads(previous_path.read_text()) if previous_path.is_file() else None
    result = run_study(study, out)
    if previous is not None and all(r.get("reused") for r in result["runs"]):
        # Nothing was trained: report the study that did the work, not this bookkeeping pass.
        result["wall_minutes"], result["machine"] = previous["wall_minutes"], previous["machine"]
        command = previous.get("command", command)
    written = write_outputs(result, out, command)
    if args.readme:
        written.append(update_readme(Path(args.readme), result, command, out))
    print(f"kepler study: done in {result['wall_minutes']:.1f} min; wrote " + ", ".join(str(p) for p in written))
    return 0
