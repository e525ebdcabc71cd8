"""Progress on stderr: the rich bar on a terminal, plain timed lines anywhere else, silent when disabled.

The interval logic runs on a fake clock and an in-memory stream (both parameters of the bar);
a real ``layerzo tune`` with stderr not a terminal shows the lines a log file gets.
"""

from __future__ import annotations

import io
import re

import pytest
from typer.testing import CliRunner

from layerzo.cli.main import app
from layerzo.core.progress import (DEFAULT_PROGRESS_SECONDS, PROGRESS_SECONDS_ENV, StderrBar, format_duration,
                                   plain_line, progress_interval)
from layerzo.errors import ConfigError
from layerzo.tune.loop import TuneProgress
from test_reliability import tune_args


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_disabled_bar_writes_nothing(capsys):
    with StderrBar("tune", 5, enabled=False) as bar:
        bar.update(advance=1, info="loss 0.5")
        bar.update(completed=5, title="done")
    assert not bar.enabled
    assert capsys.readouterr() == ("", "")


def test_a_bar_with_nothing_to_do_is_disabled(capsys):
    with StderrBar("sweep", 0) as bar:
        bar.update(advance=1)
    assert not bar.enabled
    assert capsys.readouterr() == ("", "")


def test_enabled_bar_writes_to_stderr_only(capsys):
    with StderrBar("tune", 3) as bar:
        bar.update(advance=1, info="loss 0.5")
        bar.update(completed=3, title="finished")
    out, err = capsys.readouterr()
    assert out == ""  # stdout stays clean for results (--json)
    assert "finished" in err and "3/3" in err and "loss 0.5" in err


def test_a_terminal_gets_the_rich_bar_not_plain_lines():
    term = FakeTerminal()
    with StderrBar("tune", 4, stream=term, interval=0) as bar:
        bar.update(completed=2, info="loss 0.5")
    assert not bar.plain and bar.lines == 0
    assert "2/4" in term.getvalue() and "tune: " not in term.getvalue()


# ----------------------------------------------------------------------------- plain lines
def test_plain_line_format():
    assert plain_line("tune", 120, 1000, "loss 0.6931  dev 0.712  2.31 steps/s", unit="step", eta=381) == \
        "tune: step 120/1000 (12%)  loss 0.6931  dev 0.712  2.31 steps/s  ETA 6m21s"
    assert plain_line("sweep", 1, 3) == "sweep: 1/3 (33%)  ETA ?"
    assert plain_line("tune", 3, 3, eta=0.0) == "tune: 3/3 (100%)  ETA 0s"


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (0.4, "0s"), (45, "45s"), (59.6, "1m00s"), (381, "6m21s"),
                                           (3599, "59m59s"), (3600, "1h00m"), (7530, "2h05m"), (-3, "0s")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_the_interval_comes_from_the_environment_at_call_time():
    assert progress_interval({}) == DEFAULT_PROGRESS_SECONDS == 30
    assert progress_interval({PROGRESS_SECONDS_ENV: " 2.5 "}) == 2.5
    assert progress_interval({PROGRESS_SECONDS_ENV: "0"}) == 0
    for bad in ("soon", "-1", "nan", "inf"):
        with pytest.raises(ConfigError, match=PROGRESS_SECONDS_ENV):
            progress_interval({PROGRESS_SECONDS_ENV: bad})


def test_plain_lines_every_interval_on_a_fake_clock_and_one_at_the_end():
    clock, log = FakeClock(), io.StringIO()
    with StderrBar("tune", 10, unit="step", stream=log, clock=clock, interval=30) as bar:
        assert bar.plain
        for step in range(1, 10):
            clock.now += 10  # 10 s per step
            bar.update(completed=step, info=f"loss {step}")
    lines = log.getvalue().splitlines()
    # 30 s pass at steps 3, 6, 9; step 9 was printed, so the end adds nothing new
    assert lines == ["tune: step 3/10 (30%)  loss 3  ETA 1m10s", "tune: step 6/10 (60%)  loss 6  ETA 40s",
                     "tune: step 9/10 (90%)  loss 9  ETA 10s"]

    clock, log = FakeClock(), io.StringIO()
    with StderrBar("tune", 10, stream=log, clock=clock, interval=30) as bar:
        clock.now += 5
        bar.update(advance=1)
        clock.now += 5
        bar.update(advance=1)
    assert log.getvalue().splitlines() == ["tune: 2/10 (20%)  ETA 40s"]  # only the final line: 10 s < 30 s


def test_interval_zero_prints_every_update_and_a_resumed_run_counts_only_its_own_pace():
    clock, log = FakeClock(), io.StringIO()
    with StderrBar("tune", 100, unit="step", start=90, stream=log, clock=clock, interval=0) as bar:
        bar.update(completed=90)  # no progress yet, no time passed: no ETA
        clock.now += 2
        bar.update(completed=91)
        clock.now += 2
        bar.update(completed=92)
    assert log.getvalue().splitlines() == ["tune: step 90/100 (90%)  ETA ?", "tune: step 91/100 (91%)  ETA 18s",
                                           "tune: step 92/100 (92%)  ETA 16s"]
    assert bar.lines == 3


def test_sweep_style_title_and_advance_in_plain_lines():
    clock, log = FakeClock(), io.StringIO()
    with StderrBar("sweep", 2, stream=log, clock=clock, interval=0) as bar:
        bar.update(title="sweep layer 1")
        clock.now += 60
        bar.update(advance=1, info="last: layer 1 test 50.0%")
    assert log.getvalue().splitlines() == ["sweep layer 1: 0/2 (0%)  ETA ?",
                                           "sweep layer 1: 1/2 (50%)  last: layer 1 test 50.0%  ETA 1m00s"]


def test_tune_progress_line_shows_loss_dev_and_this_process_rate(monkeypatch, capsys):
    monkeypatch.setenv(PROGRESS_SECONDS_ENV, "0")
    with TuneProgress(20, enabled=True, start=10) as bar:
        bar.advance(0.69314, None, 11, 0.5)
        bar.advance(0.5, 0.7125, 12, 1.0)  # 2 steps of this process in 1 s (not 12)
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert re.fullmatch(r"tune: step 11/20 \(55%\)  loss 0\.6931  dev -  2\.00 steps/s  ETA \S+", lines[0])
    assert re.fullmatch(r"tune: step 12/20 \(60%\)  loss 0\.5000  dev 0\.713  2\.00 steps/s  ETA \S+", lines[1])


# ----------------------------------------------------------------------------- a real tune into a log
LINE = re.compile(r"^tune: step (\d+)/6 \((\d+)%\)  loss \d+\.\d{4}  dev (-|\d\.\d{3})  (\d+\.\d\d|-) steps/s  "
                  r"(?:cache \d+%  )?ETA (\?|\d+s|\d+m\d\ds|\d+h\d\dm)$")


def test_tune_with_stderr_not_a_terminal_prints_plain_progress_lines(tiny_llama_dir, data_dir, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setenv(PROGRESS_SECONDS_ENV, "0")
    args = [a for a in tune_args(tiny_llama_dir, data_dir, tmp_path / "patch", "--steps", "6") if a != "--quiet"]
    result = CliRunner().invoke(app, args)  # CliRunner's stderr is no terminal, like a log file
    assert result.exit_code == 0, result.output
    progress = [line for line in result.stderr.splitlines() if line.startswith("tune: ")]
    assert [LINE.match(line).group(1) for line in progress] == ["1", "2", "3", "4", "5", "6"], result.stderr
    assert LINE.match(progress[-1]).group(2) == "100" and progress[-1].endswith("ETA 0s")
    assert "dev -" not in progress[4]  # a dev evaluation every 5 steps shows up from step 5 on
    assert "tune: " not in result.stdout and "\x1b[" not in result.stderr  # no bar, no escape codes in a log

    quiet = CliRunner().invoke(app, tune_args(tiny_llama_dir, data_dir, tmp_path / "quiet", "--steps", "6"))
    assert quiet.exit_code == 0, quiet.output
    assert "tune: " not in quiet.stderr and "steps/s" not in quiet.stderr  # --quiet: no progress at all
