"""Progress: tqdm's bar on a terminal, plain log lines elsewhere, nothing when off."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable

import pytest

from fedbe import progress_bar
from fedbe.progress_bar import Progress, choose_mode, progress, stage


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _ticking(step: float) -> Callable[[], float]:
    """A clock that moves ``step`` seconds at every reading."""
    now = [0.0]

    def clock() -> float:
        now[0] += step
        return now[0]

    return clock


@pytest.fixture(autouse=True)
def _no_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(progress_bar.ENV, raising=False)


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == progress_bar.__name__]


def test_not_a_terminal_logs_plain_lines_with_counts(caplog: pytest.LogCaptureFixture) -> None:
    stream = io.StringIO()
    caplog.set_level(logging.INFO)
    items = list(progress(range(20), "scoring", "examples", stream=stream, clock=_ticking(10.0)))
    assert items == list(range(20))
    lines = _messages(caplog)
    assert lines[0] == "scoring: 2/20 examples (10%), 0.1 examples/s, about 3 min 00 s left"
    assert "scoring: 10/20 examples (50%), 0.1 examples/s, about 1 min 40 s left" in lines
    assert "scoring: 16/20 examples (80%), 0.1 examples/s, about 40 s left" in lines
    assert lines[-1] == "scoring: 20 examples in 3 min 30 s (0.0952 examples/s)"
    assert len(lines) == 11  # one each tenth, one at the end
    assert stream.getvalue() == ""  # no bar, no carriage returns
    assert not any("\r" in line for line in lines)


def test_lines_are_spaced_and_short_work_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with Progress(100, "fast", "it", stream=io.StringIO(), min_gap_seconds=5.0, clock=_ticking(1.0)) as shown:
        for _ in range(3):
            shown.update()
    assert _messages(caplog) == []
    with Progress(
        None, "slow", "batches", stream=io.StringIO(), every_seconds=30.0, clock=_ticking(20.0)
    ) as shown:
        for _ in range(4):
            shown.update()
    # without a total: a line whenever 30 s have passed since the last one
    assert _messages(caplog) == ["slow: 2 batches, 0.05 batches/s", "slow: 4 batches, 0.05 batches/s",
                                 "slow: 4 batches in 1 min 40 s (0.04 batches/s)"]  # fmt: skip


def test_terminal_gets_the_tqdm_bar(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    stream = _Terminal()
    assert list(progress(range(5), "scoring", "examples", stream=stream)) == list(range(5))
    text = stream.getvalue()
    assert "scoring:" in text and "0/5" in text
    assert "examples/s" in text and "<" in text  # tqdm's rate and time left
    assert "\r" in text
    assert _messages(caplog) == []


@pytest.mark.parametrize("stream", [io.StringIO(), _Terminal()], ids=["pipe", "terminal"])
def test_off_shows_nothing(
    stream: io.StringIO, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.setenv(progress_bar.ENV, "off")
    assert list(progress(range(20), "scoring", stream=stream, clock=_ticking(10.0))) == list(range(20))
    with stage("loading", clock=_ticking(10.0)):
        pass
    assert stream.getvalue() == ""
    assert _messages(caplog) == []


def test_mode_from_argument_then_environment_then_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose_mode(None, _Terminal()) == "bar"
    assert choose_mode(None, io.StringIO()) == "log"
    monkeypatch.setenv(progress_bar.ENV, "log")
    assert choose_mode(None, _Terminal()) == "log"
    assert choose_mode("off", _Terminal()) == "off"
    monkeypatch.setenv(progress_bar.ENV, "sideways")
    assert choose_mode(None, _Terminal()) == "bar"


def test_stage_logs_start_and_time_taken(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with stage("loading smollm2", mode="log", clock=_ticking(90.0)):
        pass
    assert _messages(caplog) == ["loading smollm2 ...", "loading smollm2: done in 1 min 30 s"]
    caplog.clear()
    with pytest.raises(RuntimeError), stage("loading", mode="log"):
        raise RuntimeError("no file")
    assert _messages(caplog) == ["loading ..."]  # no "done" for work that failed
