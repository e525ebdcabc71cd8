"""Activation profiling: the pure statistics, the dominant-layer rule, the hooks on real
(tiny) models, a planted massive activation, and the ``layerzo profile`` CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_tiny_model
from layerzo.errors import ConfigError, DataRowError
from layerzo.profile.run import (
    ProfileConfig,
    ProfileReport,
    LayerStats,
    combine_layer_stats,
    is_outlier,
    layer_stats,
    pick_dominant_layer,
    profile_model,
    read_calibration_file,
)

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A short one.",
    "Profiling activations needs a few sentences of ordinary text to run through the model.",
]


def stats(max_abs: float, median: float = 1.0, channel: int = 0, extra: tuple = ()) -> LayerStats:
    """LayerStats with the max in ``channel`` (also its top channel)."""
    return LayerStats(max_abs=max_abs, median_abs=median, sequence=0, position=0, channel=channel,
                      num_tokens=4, num_values=16, top_channels=((channel, max_abs),) + extra)


# ------------------------------------------------------------------ layer_stats


def test_layer_stats_ignores_pad_positions_and_locates_max():
    hidden = torch.ones(2, 4, 3)
    hidden[1, 3, 2] = 1e6  # a pad position: must not count
    hidden[1, 1, 1] = -50.0  # the real max |h|, negative on purpose
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    s = layer_stats(hidden, mask, sequence_offset=5)
    assert s.max_abs == 50.0
    assert (s.sequence, s.position, s.channel) == (6, 1, 1)
    assert s.median_abs == 1.0
    assert s.num_tokens == 7 and s.num_values == 21
    assert s.top_channels[0] == (1, 50.0)


def test_layer_stats_position_counts_real_tokens_under_left_padding():
    hidden = torch.zeros(1, 5, 2)
    hidden[0, 0, 0] = 1e9  # left pad
    hidden[0, 3, 1] = 7.0
    s = layer_stats(hidden, torch.tensor([[0, 0, 1, 1, 1]]))
    assert (s.max_abs, s.position, s.channel) == (7.0, 1, 1)


def test_combine_layer_stats_exact_max_and_weighted_median():
    a = layer_stats(torch.full((1, 2, 2), 2.0), torch.ones(1, 2))
    big = torch.full((1, 3, 2), 3.0)
    big[0, 2, 1] = 500.0
    b = layer_stats(big, torch.ones(1, 3), sequence_offset=1)
    merged = combine_layer_stats([a, b])
    assert merged.max_abs == 500.0 and merged.sequence == 1 and merged.channel == 1
    assert merged.median_abs == 3.0  # b holds 6 of the 10 values
    assert merged.num_tokens == 5
    assert merged.top_channels[0] == (1, 500.0)


# ------------------------------------------------------------------ the rule


def test_outlier_needs_both_thresholds():
    cfg = ProfileConfig()
    assert is_outlier(stats(5000.0, 1.0), cfg)
    assert not is_outlier(stats(99.0, 0.001), cfg)  # ratio huge but max too small
    assert not is_outlier(stats(5000.0, 10.0), cfg)  # max big but ratio 500


def test_pick_first_persistent_outlier():
    layers = [stats(1.0), stats(5000.0), stats(1.0), stats(1.0), stats(6000.0), stats(6000.0), stats(6000.0),
              stats(1.0)]
    pick = pick_dominant_layer(layers, ProfileConfig())
    # layer 1 is an outlier but persists in only 1 of the next 3 (layer 4); layer 4 persists in 5 and 6
    assert (pick.layer, pick.confidence) == (4, "high")
    assert "layer 4" in pick.reason


def test_same_channel_requirement_is_an_option():
    layers = [stats(1.0), stats(5000.0, channel=1), stats(5000.0, channel=2), stats(5000.0, channel=2),
              stats(5000.0, channel=2), stats(1.0)]
    assert pick_dominant_layer(layers, ProfileConfig()).layer == 2
    assert pick_dominant_layer(layers, ProfileConfig(same_channel=False)).layer == 1


def test_same_channel_counts_a_massive_channel_that_is_not_the_argmax():
    # layer 2's largest channel is 3, but channel 1 is still massive there
    layers = [stats(5000.0, channel=1), stats(5000.0, channel=1),
              stats(6000.0, channel=3, extra=((1, 5000.0),)), stats(1.0)]
    assert pick_dominant_layer(layers, ProfileConfig()).layer == 0


def test_fallback_is_largest_jump_in_first_half_with_low_confidence():
    maxes = [1.0, 2.0, 40.0, 50.0, 60.0, 9000.0, 9000.0, 9000.0]  # the x150 jump at 5 is in the 2nd half
    pick = pick_dominant_layer([stats(m, 10.0) for m in maxes], ProfileConfig())
    assert (pick.layer, pick.confidence) == (2, "low")
    assert "largest jump" in pick.reason


def test_thresholds_are_options():
    layers = [stats(1.0), stats(50.0, 0.1), stats(50.0, 0.1), stats(50.0, 0.1), stats(1.0)]
    assert pick_dominant_layer(layers, ProfileConfig()).confidence == "low"
    loose = ProfileConfig(max_threshold=10, ratio_threshold=100)
    assert pick_dominant_layer(layers, loose) == pick_dominant_layer(layers, loose)
    assert (pick_dominant_layer(layers, loose).layer, pick_dominant_layer(layers, loose).confidence) == (1, "high")
    strict = ProfileConfig(max_threshold=10, ratio_threshold=100, persist_min=3)
    assert pick_dominant_layer(layers, strict).confidence == "low"


@pytest.mark.parametrize("kwargs", [
    {"max_threshold": 0}, {"ratio_threshold": -1.0}, {"persist_min": 4}, {"persist_window": 0},
    {"num_sequences": 0}, {"max_length": 2.5}, {"batch_size": 0}, {"same_channel": "yes"},
])
def test_config_rejects_bad_values_naming_them(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        ProfileConfig(**kwargs)


# ------------------------------------------------------------------ hooks on tiny models


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])  # tensor- and tuple-returning layers
def test_profile_matches_output_hidden_states(arch, tokenizer):
    model = make_tiny_model(arch, num_layers=3)
    report = profile_model(model, tokenizer, TEXTS, ProfileConfig(batch_size=2))
    assert report.num_layers == 3 and len(report.layers) == 3 and report.num_sequences == 3
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True)
    mask = enc["attention_mask"]
    for i in range(2):  # the last entry of hidden_states has the final norm applied
        expected = layer_stats(out.hidden_states[i + 1], mask)
        got = report.layers[i]
        assert got.max_abs == pytest.approx(expected.max_abs, rel=1e-4)
        assert got.channel == expected.channel and got.position == expected.position
    assert report.num_tokens == int(mask.sum())


def test_planted_massive_activation_is_picked(tokenizer):
    model = make_tiny_model("llama", num_layers=6, seed=3)
    planted, channel = 2, 7
    with torch.no_grad():
        model.model.layers[planted].mlp.down_proj.weight[channel, :] = 1e5  # channel 7 of the residual explodes
    report = profile_model(model, tokenizer, TEXTS)
    assert report.outlier_layers[0] == planted
    assert report.pick.layer == planted and report.pick.confidence == "high"
    assert report.layers[planted].channel == channel
    assert all(not is_outlier(s, report.config) for s in report.layers[:planted])


def test_unplanted_tiny_model_falls_back_to_low_confidence(tokenizer):
    report = profile_model(make_tiny_model("llama", num_layers=4), tokenizer, TEXTS)
    assert report.pick.confidence == "low" and report.outlier_layers == ()
    assert 0 <= report.pick.layer < 2  # first half


def test_report_round_trips_through_json(tokenizer):
    report = profile_model(make_tiny_model("qwen2", num_layers=3), tokenizer, TEXTS[:2], model_name="tiny")
    data = json.loads(json.dumps(report.to_dict()))
    assert ProfileReport.from_dict(data) == report
    assert data["model"] == "tiny" and [row["layer"] for row in data["layers"]] == [0, 1, 2]
    assert data["layers"][0]["token"] is not None and len(data["fingerprint"]) == 64


def test_fingerprint_changes_with_the_first_layer(tokenizer):
    model = make_tiny_model("llama", num_layers=2)
    before = profile_model(model, tokenizer, TEXTS[:1]).fingerprint
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    assert profile_model(model, tokenizer, TEXTS[:1]).fingerprint != before


def test_read_calibration_file(tmp_path):
    plain = tmp_path / "c.txt"
    plain.write_text("first text\n\nsecond text\n")
    assert read_calibration_file(plain) == ["first text", "second text"]
    rows = tmp_path / "c.jsonl"
    rows.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert read_calibration_file(rows) == ["a", "b"]
    rows.write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(DataRowError, match="c.jsonl:2"):
        read_calibration_file(rows)


# ------------------------------------------------------------------ CLI


@pytest.fixture()
def runner():
    return CliRunner()


def _invoke(runner, args):
    from layerzo.cli.main import app

    return runner.invoke(app, ["profile", *args])


@pytest.fixture()
def calib_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("\n".join(TEXTS) + "\n")
    return path


def test_cli_json_has_all_layers_and_plot(runner, tiny_llama_dir, calib_file, tmp_path):
    out_png = tmp_path / "plots" / "profile.png"
    result = _invoke(runner, ["--model", str(tiny_llama_dir), "--calib", str(calib_file), "--json",
                              "--plot", str(out_png)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [row["layer"] for row in data["layers"]] == [0, 1, 2, 3]
    assert data["pick"]["layer"] in range(4) and data["num_sequences"] == 3
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out_png.parent.iterdir() if p.name.startswith(".")]  # no temp file left
    assert "dominant layer" in result.stderr


def test_cli_task_calibration(runner, tiny_llama_dir, data_dir):
    result = _invoke(runner, ["--model", str(tiny_llama_dir), "--task", "sst2", "--data-dir", str(data_dir),
                              "--num-sequences", "2", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["num_sequences"] == 2 and "sst2" in data["calibration"]


def _assert_one_line_error(result, *needles):
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for needle in needles:
        assert needle in " ".join(result.stderr.split())


def test_cli_missing_model_path(runner, tmp_path, calib_file):
    missing = tmp_path / "nope"
    _assert_one_line_error(_invoke(runner, ["--model", str(missing), "--calib", str(calib_file)]), "does not exist")


def test_cli_unknown_task(runner, tiny_llama_dir, data_dir):
    result = _invoke(runner, ["--model", str(tiny_llama_dir), "--task", "sst3", "--data-dir", str(data_dir)])
    _assert_one_line_error(result, "sst3")


def test_cli_data_dir_without_the_task(runner, tiny_llama_dir, tmp_path):
    result = _invoke(runner, ["--model", str(tiny_llama_dir), "--task", "rte", "--data-dir", str(tmp_path)])
    _assert_one_line_error(result, "rte")


def test_cli_malformed_jsonl_calib(runner, tiny_llama_dir, tmp_path):
    bad = tmp_path / "calib.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    _assert_one_line_error(_invoke(runner, ["--model", str(tiny_llama_dir), "--calib", str(bad)]), "calib.jsonl:2")


def test_cli_architecture_without_decoder_layers(runner, tiny_llama_dir, calib_file, monkeypatch):
    import layerzo.model.layers as layers

    monkeypatch.setattr(layers, "KNOWN_LAYER_PATHS", ("decoder.blocks",))
    monkeypatch.setattr(layers, "_config_num_layers", lambda model: None)
    result = _invoke(runner, ["--model", str(tiny_llama_dir), "--calib", str(calib_file)])
    _assert_one_line_error(result, "cannot find the decoder layers", "decoder.blocks")


def test_cli_bad_threshold(runner, calib_file):
    _assert_one_line_error(_invoke(runner, ["--calib", str(calib_file), "--ratio-threshold", "0"]), "ratio_threshold")


@pytest.mark.demo
def test_demo_model_profile(demo_model):
    report = profile_model(demo_model.model, demo_model.tokenizer, TEXTS[:2],
                           ProfileConfig(num_sequences=2, max_length=32), demo_model.layout)
    data = report.to_dict()
    assert data["num_layers"] == 30 and len(data["layers"]) == 30
    assert all(math.isfinite(row["max_abs"]) for row in data["layers"])
