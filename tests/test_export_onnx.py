"""layerzo.export.onnx: dynamic axes, both exporters, atomic output, loading base + patch, and the CLI.

One dynamo export of a tiny Llama is shared by the module (it is the slow
part); the other cases use the much faster TorchScript exporter. The checks of
an exported graph against PyTorch are in test_export_verify.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from conftest import make_tiny_model
from layerzo.errors import ConfigError, ExportError, OutputExistsError
from layerzo.export import onnx as ex
from layerzo.export.onnx import (
    ExportConfig,
    check_export_format,
    export_checkpoint,
    export_model,
    export_onnx,
)
from layerzo.export.verify import INPUT_NAMES, OUTPUT_NAME, logits_only, make_verification_inputs, verify_onnx
from patch_helpers import make_patch


@pytest.fixture(scope="module")
def llama_export(tmp_path_factory, tokenizer):
    """(model, tokenizer, report) of a dynamo export of a tiny Llama at the default shapes."""
    model = make_tiny_model("llama", num_layers=2, seed=3)  # the dynamo exporter's time grows with depth
    out = tmp_path_factory.mktemp("onnx") / "llama-onnx"
    report = export_model(model, tokenizer, out, ExportConfig(exporter="dynamo", latency_runs=2))
    return model, tokenizer, report


def _ort_logits(onnx_path, input_ids, attention_mask):
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
    return session.run(None, feeds)[0]


def test_dynamo_export_verifies_padded_batch_at_another_shape(llama_export):
    model, _, report = llama_export
    out = Path(report.out_dir)
    assert report.exporter == "dynamo" and report.fallback_reason is None
    assert (report.verify.batch, report.verify.seq_len) != report.example_shape
    assert report.verify.batch != report.example_shape[0] and report.verify.seq_len != report.example_shape[1]
    assert report.verify.passed and report.verify.padded_rows >= 2
    assert report.verify.max_abs_diff <= report.verify.atol
    assert report.verify.real_positions < report.verify.batch * report.verify.seq_len  # padding was excluded
    # one graph + one data file; size counts both
    assert sorted(report.files) == [ex.ONNX_FILE_NAME, ex.ONNX_DATA_NAME]
    assert report.size_bytes == ex.onnx_size_bytes(out / ex.ONNX_FILE_NAME)
    embedding_bytes = model.get_input_embeddings().weight.numel() * 4
    assert report.files[ex.ONNX_DATA_NAME] >= embedding_bytes
    # deployable: tokenizer + config beside the graph, and the report on disk matches
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    assert json.loads((out / ex.REPORT_NAME).read_text())["verify"]["max_abs_diff"] == report.verify.max_abs_diff
    assert not list(out.parent.glob(".*tmp-*"))  # temp dir renamed, not left behind


def test_graph_has_two_dynamic_inputs_and_one_output(llama_export):
    import onnx

    _, _, report = llama_export
    graph = onnx.load(report.onnx_path, load_external_data=False).graph
    assert [i.name for i in graph.input] == list(INPUT_NAMES)
    assert [o.name for o in graph.output] == [OUTPUT_NAME]
    for value in graph.input:
        dims = value.type.tensor_type.shape.dim
        assert len(dims) == 2 and all(d.dim_param and not d.dim_value for d in dims)


@pytest.mark.parametrize("batch,seq_len", [(1, 5), (5, 41)])
def test_axes_are_really_dynamic(llama_export, batch, seq_len):
    model, tokenizer, report = llama_export
    inputs = make_verification_inputs(model, tokenizer, max(batch, 2), seq_len, seed=batch)
    input_ids, attention_mask = (t[:batch] for t in inputs)
    logits = _ort_logits(report.onnx_path, input_ids, attention_mask)
    with torch.inference_mode():
        reference = logits_only(model)(input_ids, attention_mask).numpy()
    assert logits.shape == (batch, seq_len, model.config.vocab_size)
    real = attention_mask.bool().numpy()
    assert np.abs(logits[real] - reference[real]).max() <= 1e-3


def test_left_padding_matches_unpadded_row(llama_export):
    """Position ids come from the mask: a left-padded row's real logits equal the same row unpadded."""
    model, tokenizer, report = llama_export
    ids = torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(7))
    padded_ids = torch.cat([torch.full((1, 4), tokenizer.pad_token_id), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], dim=1)
    alone = _ort_logits(report.onnx_path, ids, torch.ones_like(ids))
    padded = _ort_logits(report.onnx_path, padded_ids, mask)
    np.testing.assert_allclose(padded[:, 4:], alone, atol=1e-4)


def test_failed_verification_leaves_no_output(tmp_path, monkeypatch):
    """Weights changed between export and verification → ExportError and no OUT (atomic)."""
    original = ex._export_into

    def export_then_tamper(model, directory, **kwargs):
        result = original(model, directory, **kwargs)
        with torch.no_grad():
            model.model.layers[0].self_attn.o_proj.weight.add_(0.5)
        return result

    monkeypatch.setattr(ex, "_export_into", export_then_tamper)
    out = tmp_path / "out"
    with pytest.raises(ExportError):
        export_model(make_tiny_model("llama"), None, out, ExportConfig(exporter="torchscript", latency_runs=1))
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_torchscript_path_second_arch_opset17(tmp_path):
    model = make_tiny_model("qwen3", seed=2)
    report = export_model(model, None, tmp_path / "q", ExportConfig(exporter="torchscript", opset=17,
                                                                    latency_runs=1))
    import onnx

    proto = onnx.load(report.onnx_path, load_external_data=False)
    assert report.exporter == "torchscript" and report.verify.passed
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {17}
    assert sorted(report.files) == [ex.ONNX_FILE_NAME, ex.ONNX_DATA_NAME]


def test_auto_falls_back_to_torchscript(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated dynamo failure\nsecond line")

    monkeypatch.setattr(ex, "_export_dynamo", broken)
    path = export_onnx(make_tiny_model("llama"), tmp_path / "o", exporter="auto")
    assert path.is_file() and verify_onnx(path, make_tiny_model("llama")).passed
    with pytest.raises(ExportError, match="simulated dynamo failure"):
        export_onnx(make_tiny_model("llama"), tmp_path / "o2", exporter="dynamo")
    assert not (tmp_path / "o2").exists()


def test_output_exists_and_overwrite(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError) as info:
        export_onnx(make_tiny_model("llama"), out, exporter="torchscript")
    assert str(out) in info.value.one_line() and "--overwrite" in info.value.one_line()
    assert (out / "keep.txt").is_file()
    export_onnx(make_tiny_model("llama"), out, exporter="torchscript", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == sorted([ex.ONNX_FILE_NAME, ex.ONNX_DATA_NAME])


@pytest.mark.parametrize(
    "kwargs,match",
    [({"opset": 16}, "opset 16"), ({"dtype": "bfloat16"}, "bfloat16"), ({"atol": 0.0}, "atol"),
     ({"verify_batch": 2}, "must differ"), ({"verify_len": 16}, "must differ"), ({"verify_batch": 1}, "padded"),
     ({"exporter": "tflite"}, "tflite")],
)
def test_config_validation_names_bad_value(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ExportConfig(**kwargs)


# -- CLI -----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tokenizer_dir) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "tiny-qwen2"
    make_tiny_model("qwen2", seed=5).save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


def test_cli_export_onnx_json(tmp_path, tiny_checkpoint):
    from layerzo.cli.main import app

    out = tmp_path / "cli-onnx"
    args = ["export-onnx", "--model", str(tiny_checkpoint), "-o", str(out), "--exporter", "torchscript",
            "--runs", "1", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["verify"]["passed"] and data["size_bytes"] == ex.onnx_size_bytes(out / ex.ONNX_FILE_NAME)
    assert data["source"]["base_model"] == str(tiny_checkpoint) and data["source"]["patch"] is None
    assert data["latency"]["ort_ms"] > 0 and data["latency"]["shape"] == [3, 23]
    assert (out / "tokenizer.json").is_file()

    # OUT exists → one line, exit 1, nothing touched; the `export --format onnx` alias reaches the same code
    again = CliRunner().invoke(app, ["export", "--format", "onnx", "-m", str(tiny_checkpoint), "-o", str(out)])
    assert again.exit_code == 1
    assert "already exists" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert json.loads((out / ex.REPORT_NAME).read_text())["verify"] == data["verify"]


def test_cli_unknown_format_is_one_line(tmp_path):
    from layerzo.cli.main import app

    result = CliRunner().invoke(app, ["export", "--format", "tflite", "-o", str(tmp_path / "x")])
    assert result.exit_code == 1 and "tflite" in result.stderr
    assert not (tmp_path / "x").exists()


def test_cli_export_onnx_has_every_option_but_format():
    """export-onnx is export without --format: same options, same defaults, its own help line."""
    from layerzo.cli.main import app

    def options(command):
        ctx = typer.main.get_command(app).commands[command]
        return {p.name: (tuple(p.opts), p.default) for p in ctx.params}

    export, export_onnx_opts = options("export"), options("export-onnx")
    assert export.pop("format") == (("--format", "-f"), "onnx")
    assert export_onnx_opts == export and len(export) == 15
    assert export["opset"] == (("--opset",), 18) and export["verify_len"] == (("--verify-len",), 23)
    result = CliRunner().invoke(app, ["export-onnx", "--help"])
    assert result.exit_code == 0 and "verify it with ONNX Runtime" in result.stdout and "--format" not in result.stdout
    assert CliRunner().invoke(app, ["export-onnx", "--format", "onnx", "-o", "x"]).exit_code == 2


# -- export_checkpoint: what the CLI calls -------------------------------------------------------------------------


def test_check_export_format():
    assert check_export_format("ONNX") == "onnx"
    with pytest.raises(ConfigError, match="'tflite'.*onnx"):
        check_export_format("tflite")


def test_export_checkpoint_refuses_before_loading(tmp_path):
    """A bad format or a taken output fails at once: the (missing) base is never loaded."""
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")  # an empty folder would hold nothing to lose
    stages: list[str] = []
    missing = tmp_path / "no-such-model"
    with pytest.raises(OutputExistsError, match="already exists"):
        export_checkpoint(taken, missing, progress=stages.append)
    with pytest.raises(ConfigError, match="tflite"):
        export_checkpoint(tmp_path / "free", missing, fmt="tflite", progress=stages.append)
    assert stages == [] and [p.name for p in taken.iterdir()] == ["notes.txt"] and not (tmp_path / "free").exists()


def test_export_checkpoint_applies_the_patch(tmp_path, tiny_checkpoint):
    from layerzo.model.loading import load_model

    base = load_model(tiny_checkpoint).model
    patch_dir = make_patch(base, layer=1, scale=0.5, seed=4).save_pretrained(tmp_path / "patch")
    stages: list[str] = []
    report = export_checkpoint(tmp_path / "out", tiny_checkpoint, patch_dir,
                               ExportConfig(exporter="torchscript", opset=17, latency_runs=1), progress=stages.append)
    assert stages == ["loading model", "exporting to ONNX (opset 17) and verifying with ONNX Runtime"]
    assert report.source == {"base_model": str(tiny_checkpoint), "revision": None, "patch": str(patch_dir)}
    assert report.verify.passed and (tmp_path / "out" / "tokenizer.json").is_file()
    ids = torch.randint(0, base.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    exported = _ort_logits(report.onnx_path, ids, mask)
    with torch.inference_mode():
        unpatched = logits_only(base)(ids, mask).numpy()
    assert np.abs(exported - unpatched).max() > 1e-2  # the graph carries the patch, not the base
