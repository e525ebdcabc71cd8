"""The profile figure, drawn from a hand-made report (no model needed)."""

from __future__ import annotations

import pytest

from layerzo.profile.plot import plot_profile
from layerzo.profile.rule import LayerStats, Pick, ProfileConfig
from layerzo.profile.run import ProfileReport


def _report(maxes: list[float], pick: int) -> ProfileReport:
    layers = tuple(LayerStats(max_abs=m, median_abs=1.0 if m else 0.0, sequence=0, position=0, channel=0,
                              num_tokens=4, num_values=16, top_channels=((0, m),)) for m in maxes)
    return ProfileReport(model="tiny", num_layers=len(layers), layer_path="model.layers", fingerprint="0" * 64,
                         num_sequences=1, num_tokens=4, calibration="test", config=ProfileConfig(), layers=layers,
                         pick=Pick(pick, "high", "planted"))


@pytest.mark.parametrize("maxes", [[1.0, 5000.0, 6000.0, 2.0], [0.0, 3.0]])  # a zero max is drawn as a gap
def test_plot_profile_writes_a_png(tmp_path, maxes):
    out = plot_profile(_report(maxes, pick=1), tmp_path / "plots" / "profile.png")
    assert out == tmp_path / "plots" / "profile.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["profile.png"]  # no temp file left


def test_plot_profile_closes_its_figure(tmp_path):
    from layerzo.core.plotting import pyplot

    plt = pyplot()
    before = len(plt.get_fignums())
    plot_profile(_report([1.0, 2.0, 3.0], pick=0), tmp_path / "p.png")
    assert len(plt.get_fignums()) == before
