"""Timing helpers of the benchmark suites: rates derived from pytest-benchmark's timings, for ``benchmark.extra_info``, and the step as timed on a device.

Under ``--benchmark-disable`` (a quick check that every benchmark still runs) each benchmarked
function runs once, untimed, and ``benchmark.stats`` is None: then no rate is recorded.
"""

from __future__ import annotations

import torch


def record_rate(benchmark, key: str, amount: float, statistic: str = "median") -> None:
    """``benchmark.extra_info[key] = amount / seconds``, ``seconds`` the ``statistic`` (``"median"``,
    ``"mean"``, ...) of the timed rounds; nothing when nothing was timed."""
    if benchmark.stats is not None:
        benchmark.extra_info[key] = amount / getattr(benchmark.stats.stats, statistic)


def synchronized(step, device: str):
    """``step`` as the benchmark times it: followed by a CUDA synchronize on ``"cuda"`` (kernels run
    asynchronously), ``step`` itself elsewhere."""
    if device != "cuda":
        return step

    def timed():
        step()
        torch.cuda.synchronize()

    return timed
