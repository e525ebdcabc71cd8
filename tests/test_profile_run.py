"""Activation profiling runs: the hooks on real (tiny) models, a planted massive activation,
the report's JSON round trip, and the ``layerzo profile`` CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_tiny_model
from layerzo.errors import ConfigError
from layerzo.profile.rule import ProfileConfig, is_outlier, layer_stats
from layerzo.profile.run import ProfileReport, profile_model

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A short one.",
    "Profiling activations needs a few sentences of ordinary text to run through the model.",
]


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


def test_progress_is_called_once_per_batch_and_texts_are_capped(tokenizer):
    calls = []
    report = profile_model(make_tiny_model("llama", num_layers=2), tokenizer, ["   "] + TEXTS + ["one more text"],
                           ProfileConfig(num_sequences=3, batch_size=2), progress=lambda *a: calls.append(a))
    assert calls == [(1, 2), (2, 2)]
    assert report.num_sequences == 3  # the blank text is dropped, the last is past num_sequences
    with pytest.raises(ConfigError, match="no calibration texts"):
        profile_model(make_tiny_model("llama", num_layers=2), tokenizer, ["", "  "])


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


def test_cli_without_task_or_calib_uses_the_built_in_sentences(runner, tiny_llama_dir):
    result = _invoke(runner, ["--model", str(tiny_llama_dir), "--num-sequences", "2", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["calibration"] == "built-in generic English sentences" and data["num_sequences"] == 2
    assert "no --task or --calib: calibrating on built-in generic English sentences" in " ".join(result.stderr.split())


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


def test_cli_task_and_calib_together(runner, calib_file):
    result = _invoke(runner, ["--task", "sst2", "--calib", str(calib_file)])
    _assert_one_line_error(result, "give either --task or --calib, not both")


def test_cli_bad_threshold(runner, calib_file):
    _assert_one_line_error(_invoke(runner, ["--calib", str(calib_file), "--ratio-threshold", "0"]), "ratio_threshold")


@pytest.mark.demo
def test_demo_model_profile(demo_model):
    report = profile_model(demo_model.model, demo_model.tokenizer, TEXTS[:2],
                           ProfileConfig(num_sequences=2, max_length=32), demo_model.layout)
    data = report.to_dict()
    assert data["num_layers"] == 30 and len(data["layers"]) == 30
    assert all(math.isfinite(row["max_abs"]) for row in data["layers"])
