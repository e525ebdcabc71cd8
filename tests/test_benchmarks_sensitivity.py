"""The sensitivity benchmark's report (benchmarks/bench_sensitivity.py): agreement with a reference, rendering."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_sensitivity  # noqa: E402

from layerzo.zo.sensitivity import LayerSensitivity, SensitivityConfig, SensitivityReport  # noqa: E402


def report(final, pick, one_sided=True):
    layers = tuple(LayerSensitivity(layer=i, numel=10, grad_rms=f, grad_per_weight=f / 3, stability=2.0,
                                    own_change=f, final_change=f, growth=1.0, loss_change=f)
                   for i, f in enumerate(final))
    return SensitivityReport("m", SensitivityConfig(one_sided=one_sided), 2, layers, pick, "why", 10.0, 20,
                             plain_seconds=0.5, forward_equivalents=9.0)


def test_agreement_compares_the_picks_and_the_per_layer_scores():
    ref = report([0.1, 0.4, 0.3, 0.2], pick=1, one_sided=False)
    reference = {"sensitivity": ref.to_dict(), "sensitivity_pick": 1, "sensitivity_seconds": 370.0}
    same = bench_sensitivity.agreement(report([0.2, 0.8, 0.5, 0.3], pick=1), reference, "ref.json")
    assert same["same_pick"] and same["reference_pick_rank"] == 1
    assert same["spearman_final_change"] == pytest.approx(1.0)
    flipped = bench_sensitivity.agreement(report([0.4, 0.1, 0.2, 0.3], pick=0), reference, "ref.json")
    assert not flipped["same_pick"] and flipped["reference_pick_rank"] == 4
    assert flipped["spearman_final_change"] == pytest.approx(-1.0)


def test_the_report_states_the_command_ratio_and_the_agreement():
    fast = report([0.2, 0.8, 0.5, 0.3], pick=1)
    ref = {"sensitivity": report([0.1, 0.4, 0.3, 0.2], 1, False).to_dict(), "sensitivity_pick": 1,
           "sensitivity_seconds": 370.0}
    result = bench_sensitivity.stamp({
        "outlier_pick": 1, "outlier_pick_sensitivity_rank": 1, "largest_grad_per_weight": 1,
        "spearman_sensitivity_vs_depth": 0.1, "sensitivity_seconds": 10.0, "ratio_to_activation_profile": 20.0,
        "activation_profile_seconds": 0.5, "ratio_to_profile_command": 0.4, "load_seconds": 24.5,
        "cost_in_plain_forwards": 20.0, "forward_equivalents_per_example": 9.0, "command_ratio": 1.4,
        "agreement": bench_sensitivity.agreement(fast, ref, "ref.json")})
    text = bench_sensitivity.render(result, fast, SimpleNamespace(directions=8, batches=2, batch_size=2), "stem")
    assert "one-sided" in text and "1.40× `layerzo profile`" in text
    assert "Against the reference `ref.json` (370 s): same pick: True" in text and "![sensitivity](stem.png)" in text
