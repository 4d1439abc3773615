"""Rates derived from pytest-benchmark's timings, for ``benchmark.extra_info``.

Under ``--benchmark-disable`` (a quick check that every benchmark still runs) each benchmarked
function runs once, untimed, and ``benchmark.stats`` is None: then no rate is recorded.
"""

from __future__ import annotations


def timed_seconds(benchmark, statistic: str = "median") -> float | None:
    """``statistic`` (``"median"``, ``"mean"``, ...) of the timed rounds in seconds; None when
    nothing was timed."""
    return None if benchmark.stats is None else getattr(benchmark.stats.stats, statistic)


def record_rate(benchmark, key: str, amount: float, statistic: str = "median") -> None:
    """``benchmark.extra_info[key] = amount / seconds`` (``amount`` per second of the timed
    ``statistic``); nothing when nothing was timed."""
    seconds = timed_seconds(benchmark, statistic)
    if seconds is not None:
        benchmark.extra_info[key] = amount / seconds
