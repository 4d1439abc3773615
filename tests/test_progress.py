"""kepler.progress: a redrawn bar on a terminal, plain log lines anywhere else (no carriage returns)."""

import io
import logging
import sys

import pytest

from kepler import progress as progress_module
from kepler.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    """The seconds Progress reads; a test moves them on."""
    now = [100.0]
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: now[0])
    return now


@pytest.fixture
def lines(caplog):
    """The lines logged so far."""
    caplog.set_level(logging.INFO, logger="kepler")
    return lambda: caplog.messages


def test_off_a_terminal_a_report_is_one_plain_line_with_rate_fields_and_eta(clock, lines, capsys):
    progress = Progress(100, "tiny", "step", initial=20)  # a resumed run: its 20 steps are not in the rate
    for _ in range(10):
        progress.update()
    clock[0] += 2.0
    assert lines() == []  # no lines of its own without `lines`
    progress.report(loss="0.1234", util=0.8125)
    assert lines() == ["tiny: 30/100 steps, 5.0 steps/s, loss=0.1234, util=0.8125, ETA 0:00:14"]
    progress.close()
    assert capsys.readouterr().err == ""  # stderr is no terminal: no bar at all


def test_off_a_terminal_lines_are_spread_over_the_loop(clock, lines):
    progress = Progress(45, "kepler sample", "sample", lines=10)  # a line per 5 samples passed, and the end
    for _ in range(11):
        clock[0] += 1.0
        progress.update(4)
    progress.update(1)
    assert [int(line.split(": ")[1].split("/")[0]) for line in lines()] == [8, 12, 16, 20, 28, 32, 36, 40, 45]
    assert lines()[0] == "kepler sample: 8/45 samples, 4.0 samples/s, ETA 0:00:09"
    assert lines()[-1] == "kepler sample: 45/45 samples, 4.1 samples/s, ETA 0:00:00"


def test_on_a_terminal_the_bar_is_redrawn_and_no_lines_are_logged(monkeypatch, lines):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    progress = Progress(10, "tiny", "step", lines=10)
    progress.update(3)
    progress.report(loss="0.5000")
    progress.close()
    assert "\r" in terminal.getvalue() and "3/10" in terminal.getvalue() and "loss=0.5000" in terminal.getvalue()
    assert lines() == []


def test_disabled_it_shows_nothing_and_still_counts(monkeypatch, clock, lines):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    progress = Progress(12, "kepler study", "run", lines=12, enabled=False)
    assert progress.status() == "0/12 runs, ETA ?"
    progress.skip(2)  # reused runs: no time, so no rate yet
    assert progress.status() == "2/12 runs, ETA ?"
    clock[0] += 60.0
    progress.update()
    progress.report(psnr=12.0)
    assert progress.status() == "3/12 runs, 60.0 s/run, ETA 0:09:00"
    assert lines() == [] and terminal.getvalue() == ""
