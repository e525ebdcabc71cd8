"""What the environment asks of layerzo: read at call time, never cached at import."""

from __future__ import annotations

import pytest

from layerzo.core.env import debug_enabled, first_line, is_offline


def test_is_offline_reads_env_at_call_time(monkeypatch):
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not is_offline()
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "yes")
    assert is_offline()


@pytest.mark.parametrize("value, offline", [("1", True), (" true ", True), ("ON", True), ("0", False),
                                            ("", False), ("no", False)])
def test_is_offline_accepts_the_usual_spellings_of_true(monkeypatch, value, offline):
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert is_offline() is offline


def test_debug_enabled_reads_env_at_call_time(monkeypatch):
    monkeypatch.delenv("LAYERZO_DEBUG", raising=False)
    assert not debug_enabled()
    monkeypatch.setenv("LAYERZO_DEBUG", "1")
    assert debug_enabled()
    for off in ("0", "false", "False", "  "):
        monkeypatch.setenv("LAYERZO_DEBUG", off)
        assert not debug_enabled(), off


def test_first_line_of_an_exception():
    assert first_line(ValueError("bad value\nTraceback details\nmore")) == "bad value"
    assert first_line(ValueError("\n  leading blank line\nsecond")) == "leading blank line"
    assert first_line(KeyboardInterrupt()) == "KeyboardInterrupt"  # no text: the type name
    assert first_line(OSError()) == "OSError"
