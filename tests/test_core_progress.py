"""The shared progress bar: on stderr only, and silent when disabled."""

from __future__ import annotations

from layerzo.core.progress import StderrBar


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
