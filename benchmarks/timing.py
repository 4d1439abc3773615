"""Rates derived from pytest-benchmark's timings, for ``benchmark.extra_info``.

Under ``--benchmark-disable`` (a quick check that every benchmark still runs) each benchmarked
function runs once, untimed, and ``benchmark.stats`` is None: then no rate is recorded.
"""

from __future__ import annotations


def record_rate(benchmark, key: str, amount: float, statistic: str = "median") -> None:
    """``benchmark.extra_info[key] = amount / seconds``, ``seconds`` the ``statistic`` (``"median"``,
    ``"mean"``, ...) of the timed rounds; nothing when nothing was timed."""
    if benchmark.stats is not None:
        benchmark.extra_info[key] = amount / getattr(benchmark.stats.stats, statistic)
