"""The shared matplotlib helpers: the Agg backend, atomic figure writes, and the missing-matplotlib error."""

from __future__ import annotations

import sys

import pytest

from layerzo.core.plotting import joined, pyplot, save_figure_atomic
from layerzo.errors import ConfigError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_pyplot_uses_the_agg_backend():
    plt = pyplot()
    assert plt.get_backend().lower() == "agg"


def test_save_figure_atomic_writes_the_suffix_format_and_no_temp_file(tmp_path):
    plt = pyplot()
    fig, ax = plt.subplots()
    try:
        ax.plot([0, 1], [1, 0])
        png = save_figure_atomic(fig, tmp_path / "out" / "a.png", dpi=50)
        svg = save_figure_atomic(fig, tmp_path / "out" / "b.svg")
        bare = save_figure_atomic(fig, str(tmp_path / "out" / "c"))  # no suffix: PNG
    finally:
        plt.close(fig)
    assert png == tmp_path / "out" / "a.png" and png.read_bytes()[:8] == PNG_MAGIC
    assert b"<svg" in svg.read_bytes()[:500]
    assert bare.read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.svg", "c"]


def test_a_failed_save_leaves_no_file(tmp_path):
    plt = pyplot()
    fig, _ = plt.subplots()
    try:
        with pytest.raises(ValueError):
            save_figure_atomic(fig, tmp_path / "a.notaformat")
    finally:
        plt.close(fig)
    assert list(tmp_path.iterdir()) == []


def test_missing_matplotlib_is_a_config_error_with_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(ConfigError, match="--plot needs matplotlib") as info:
        pyplot()
    assert "layerzo[plot]" in info.value.hint


def test_points_are_joined_over_a_gap_free_run_of_layers_only():
    assert joined(list(range(30))) == "-" and joined([4]) == "-" and joined([]) == "-"
    assert joined([2, 4, 11, 29]) == "none"  # a partial sweep: a line would invent layers 3, 5-10, ...
    assert joined([0, 1, 2], "--") == "--" and joined([0, 2], "--") == "none"
