"""The study's figures: validation curves, code usage per variant, and the codewords of 3-D
sub-codebooks. Each takes :func:`kepler.study.runner.run_study`'s result and writes one PNG."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path


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
        counts = np.sum([np.array(r["code_counts"], dtype=float) for r in runs], axis=0)  # (P, K)
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
