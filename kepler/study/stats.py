"""Statistics over seeds: summaries, seed-noise checks, and the sweep's choice of a regularizer weight.

With 2 seeds, whether the seed ranges ``[min, max]`` overlap is the most that can be said honestly:
a change inside them is reported as within seed noise, and does not count as visible.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from kepler.study.config import sweep_references

DEFAULT_VISIBLE = {"psnr_db": 0.1, "perplexity_rel": 0.05, "utilization_abs": 0.05}


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
