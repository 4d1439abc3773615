"""The study's written report: ``study.md``, ``sweep.md``, the README block, and the files a study writes.

Everything here formats :func:`kepler.study.runner.run_study`'s result (or the sweep summary of
:func:`kepler.study.stats.summarize_sweep`); nothing is computed that the result does not hold.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from kepler.study.plots import plot_codewords, plot_curves, plot_usage
from kepler.study.stats import outside_seed_noise

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
# A study with a prior (see kepler.study): the prior's held-out bits per image, and the unigram
# baseline's, after the results table's columns; the first also in the comparison table.
PRIOR_METRICS = (("prior_bits_per_image", "bits/img", 1), ("unigram_bits_per_image", "unigram bits/img", 1))


def table_metrics(study: Mapping) -> tuple:
    """The results table's ``(key, header, digits)`` of a study config: :data:`TABLE_METRICS`, and
    :data:`PRIOR_METRICS` when it has a prior."""
    return TABLE_METRICS + (PRIOR_METRICS if study.get("prior") else ())


def compared_metrics(study: Mapping) -> tuple:
    """The comparison table's ``(key, header, digits)``: :data:`COMPARED_METRICS`, and the prior's
    bits per image when the study has a prior."""
    return COMPARED_METRICS + (PRIOR_METRICS[:1] if study.get("prior") else ())


def _fmt(summary: Mapping | None, digits: int) -> str:
    if summary is None:
        return "-"
    if summary["sd"] is None:
        return f"{summary['mean']:.{digits}f}"
    return f"{summary['mean']:.{digits}f} ± {summary['sd']:.{digits}f}"


def _layout_text(layout: Mapping) -> str:
    stages = layout.get("stages", 1)  # absent from studies run before residual quantizers
    if stages > 1:
        kind = "one codebook" if layout["shared_codebook"] else "per stage"
        return f"{stages} stages of {layout['partitions'] // stages} x {layout['sub_dim']}-d, K={layout['num_codes']} ({kind})"
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
    summary, study = result["summary"], result["config"]
    lines = [f"{heading} Results", "", f"Held-out images per run: {result['runs'][0]['held_out_images']}.", ""]
    if study.get("prior"):
        lines += [_prior_text(result), ""]
    metrics, compared = table_metrics(study), compared_metrics(study)
    rows = []
    for name, v in result["variants"].items():
        stats = summary[name]
        rows.append([f"`{name}`", f"{v['layout']['bits']:.1f}"] + [_fmt(stats.get(m), d) for m, _, d in metrics])
    lines += _table(["variant", "bits"] + [h for _, h, _ in metrics], rows)
    lines += ["", f"{heading} Differences to the reference variant", "",
              "Outside seed noise = the seeds' [min, max] ranges of the two variants do not overlap "
              "(with 2 seeds this is weak evidence either way).", ""]
    rows = []
    for name, v in result["variants"].items():
        reference = v["compare_to"]
        if reference is None:
            continue
        row = [f"`{name}` vs `{reference}`"]
        for m, _, d in compared:
            a, b = summary[name][m], summary[reference][m]
            verdict = outside_seed_noise(a, b)
            tag = {True: "outside noise", False: "within noise", None: "one seed"}[verdict]
            row.append(f"{a['mean'] - b['mean']:+.{d}f} ({tag})")
        rows.append(row)
    lines += _table(["variant vs reference"] + [f"Δ {h}" for _, h, _ in compared], rows)
    return lines


def _prior_text(result: Mapping) -> str:
    """What the bits-per-image columns measure: the prior's config, budget and held-out maps."""
    study, run = result["config"], result["runs"][0]
    overrides = ", ".join(f"`{o}`" for o in run["prior"]["overrides"]) or "no overrides"
    return (f"bits/img: held-out bits per image (negative log-likelihood of a whole code map: bits per token x "
            f"tokens per map) under a prior trained on each run's own codes (`{study['prior']['config']}`, "
            f"{overrides}; {run['prior']['steps']} steps), on the same held-out images as PSNR. Comparable across "
            "code layouts, unlike bits per token. unigram bits/img: the same images under the training codes' "
            "unigram histogram, what a prior that learned only how often each code occurs would spend.")


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


def readme_markers(study: str) -> tuple[str, str]:
    """The README markers around study ``study``'s generated section (one pair per study, so a
    README can hold several studies' tables)."""
    return (f"<!-- kepler-study:begin {study} (generated by `kepler study --readme`; edit outside these markers) -->",
            f"<!-- kepler-study:end {study} -->")


def update_readme(readme: Path, result: Mapping, command: str, out: Path) -> Path:
    """Write the study's command, machine, results and differences between the README's markers for
    this study (:func:`readme_markers`; appended under a "Results" heading when absent); the text
    around the markers (the reading of the results) is left alone."""
    begin, end = readme_markers(result["name"])
    body = _header_lines(result, command) + _results_lines(result, "###")
    body += ["", f"Full report with the design, the weight sweep and the plots: `{out / 'study.md'}`."]
    block = "\n".join([begin, *body, end])
    text = readme.read_text() if readme.exists() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + f"## Results: {result['name']}\n\n" + block + "\n"
    readme.write_text(text)
    return readme


def attribute_to_training_study(result: dict, out: Path, command: str) -> str:
    """When no run of ``result`` was trained (all reused) and ``out`` holds the ``study.json`` of the
    study that trained them, that study's wall time and machine replace this bookkeeping pass's in
    ``result``, so a rerun (for ``--readme``, say) reports the study that did the work. Returns the
    command to report: that study's where it recorded one, else ``command``."""
    previous_path = out / "study.json"
    if not previous_path.is_file() or not all(r.get("reused") for r in result["runs"]):
        return command
    previous = json.loads(previous_path.read_text())
    result["wall_minutes"], result["machine"] = previous["wall_minutes"], previous["machine"]
    return previous.get("command", command)


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


def write_sweep_outputs(sweep: Mapping, name: str, out: Path, command: str) -> list[Path]:
    """``sweep.json`` (``sweep`` as :func:`kepler.study.stats.summarize_sweep` gives it) and
    ``sweep.md`` (``study.md``'s sweep section under its own title) into ``out``; returns their paths.
    ``name``: the study's; ``command``: the command line that ran the sweep."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(sweep, indent=1))
    title = [f"# Weight sweep: {name}", "", f"Command: `{command}`", ""]
    (out / "sweep.md").write_text("\n".join(title + _sweep_lines(sweep)[2:]))
    return [out / "sweep.json", out / "sweep.md"]
