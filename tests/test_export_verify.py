"""layerzo.export.verify: the padded verification batch, ORT vs PyTorch checks, latency and the reference wrapper.

One TorchScript export of a tiny Llama (the fast exporter) is shared by the
module; the exporter itself is tested in test_export_onnx.py.
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model
from layerzo.errors import ExportError
from layerzo.export.onnx import ONNX_FILE_NAME, export_onnx
from layerzo.export.verify import (
    INPUT_NAMES,
    OUTPUT_NAME,
    logits_only,
    make_verification_inputs,
    measure_latency,
    ort_session,
    verify_onnx,
    vocab_size,
)


@pytest.fixture(scope="module")
def llama_onnx(tmp_path_factory):
    """(model, path of its TorchScript ONNX export)."""
    model = make_tiny_model("llama", num_layers=2, seed=3)
    path = export_onnx(model, tmp_path_factory.mktemp("verify") / "llama", exporter="torchscript")
    return model, path


def test_verification_inputs_pad_both_sides(tokenizer):
    model = make_tiny_model("llama")
    input_ids, mask = make_verification_inputs(model, tokenizer, 4, 10)
    assert input_ids.shape == mask.shape == (4, 10) and input_ids.dtype == mask.dtype == torch.long
    assert mask[0].all() and not mask[1, 0] and mask[1, -1] and mask[2, 0] and not mask[2, -1]
    assert (mask.sum(-1) >= 1).all() and (input_ids[mask == 0] == tokenizer.pad_token_id).all()
    again, _ = make_verification_inputs(model, tokenizer, 4, 10)
    other, _ = make_verification_inputs(model, tokenizer, 4, 10, seed=1)
    assert torch.equal(input_ids, again) and not torch.equal(input_ids, other)  # seeded, not fixed


def test_changed_weights_fail_verification(llama_onnx, tokenizer):
    model, path = llama_onnx
    tampered = make_tiny_model("llama", num_layers=2, seed=3)
    with torch.no_grad():
        tampered.model.layers[1].mlp.down_proj.weight.mul_(3.0)
    with pytest.raises(ExportError, match=r"max \|dlogits\|"):
        verify_onnx(path, tampered, tokenizer, batch=4, seq_len=11)
    # the untouched model still passes at that shape
    assert verify_onnx(path, model, tokenizer, batch=4, seq_len=11).passed


def test_verify_report_counts_real_positions_only(llama_onnx):
    model, path = llama_onnx
    input_ids = torch.randint(0, vocab_size(model), (3, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(input_ids)
    mask[1, :4] = 0  # left-padded
    mask[2, 7:] = 0  # right-padded
    session = ort_session(path)
    report = verify_onnx(session, model, inputs=(input_ids, mask), atol=1e-3)
    assert (report.batch, report.seq_len, report.padded_rows) == (3, 9, 2)
    assert report.real_positions == 27 - 4 - 2 == int(mask.sum())
    assert report.passed and report.argmax_mismatches == 0 and 0 <= report.max_abs_diff <= report.atol == 1e-3


def test_ort_session(llama_onnx, tmp_path):
    _, path = llama_onnx
    session = ort_session(path, threads=1)
    assert ort_session(session) is session  # a session passes through untouched
    assert session.get_session_options().intra_op_num_threads == 1
    assert [i.name for i in session.get_inputs()] == list(INPUT_NAMES)
    assert [o.name for o in session.get_outputs()] == [OUTPUT_NAME]
    with pytest.raises(ExportError, match="does not exist"):
        ort_session(tmp_path / ONNX_FILE_NAME)


def test_measure_latency_reports_both_runtimes(llama_onnx):
    model, path = llama_onnx
    input_ids, mask = make_verification_inputs(model, None, 2, 6)
    lat = measure_latency(path, model, input_ids, mask, runs=2)
    assert lat.shape == (2, 6) and lat.runs == 2 and lat.torch_threads == torch.get_num_threads()
    assert lat.ort_ms > 0 and lat.torch_ms > 0
    assert lat.ratio == pytest.approx(lat.ort_ms / lat.torch_ms, rel=1e-2)


def test_vocab_size_from_config_or_embeddings():
    model = make_tiny_model("llama")
    assert vocab_size(model) == model.config.vocab_size

    class NoConfig(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(37, 4)

        def get_input_embeddings(self):
            return self.embed

    assert vocab_size(NoConfig()) == 37


def test_logits_only_derives_positions_from_the_mask():
    """A left-padded row's real logits equal the same row unpadded, and the wrapper returns logits only."""
    model = make_tiny_model("llama", seed=1)
    wrapper = logits_only(model)
    assert not wrapper.training
    ids = torch.randint(0, vocab_size(model), (1, 6), generator=torch.Generator().manual_seed(5))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], dim=1)
    with torch.inference_mode():
        alone = wrapper(ids, torch.ones_like(ids))
        shifted = wrapper(padded, mask)
    assert isinstance(alone, torch.Tensor) and alone.shape == (1, 6, vocab_size(model))
    torch.testing.assert_close(shifted[:, 3:], alone, atol=1e-5, rtol=1e-5)
