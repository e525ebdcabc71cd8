"""fp32 master weights for tuned layers of a bf16/fp16 model: casts at the layer boundary only."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import make_tiny_model
from layerzo.model.layers import find_layer_layout, get_layer, layer_parameter_names
from layerzo.model.precision import fp32_master, fp32_master_layers
from layerzo.zo import engine as zo
from test_zo_engine import LAYER, _ids, _lm_loss, _same, _snapshot


class Recorder(nn.Module):
    """A "tuned layer": records the dtypes it is called with; returns (hidden, positions, {"extra": [hidden]})."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(4))
        self.seen: dict[str, torch.dtype] = {}

    def forward(self, hidden, positions, mask=None, extras=()):
        self.seen = {"hidden": hidden.dtype, "weight": self.weight.dtype, "positions": positions.dtype,
                     "mask": mask.dtype, "extra": extras[0].dtype}
        out = hidden @ self.weight
        return out, positions, {"extra": [out]}


def _inputs():
    hidden = torch.randn(2, 4).to(torch.bfloat16)
    return hidden, torch.arange(2), torch.zeros(2, 2, dtype=torch.bfloat16), [hidden.clone()]


def test_the_layer_runs_in_fp32_and_hands_back_the_model_dtype():
    layer = Recorder().to(torch.bfloat16)
    hidden, positions, mask, extras = _inputs()
    with fp32_master_layers([layer], torch.bfloat16):
        out, pos, more = layer(hidden, positions, mask=mask, extras=extras)
    assert layer.seen == {"hidden": torch.float32, "weight": torch.float32, "positions": torch.int64,
                          "mask": torch.float32, "extra": torch.float32}  # args, kwargs, nested lists: cast
    assert out.dtype == torch.bfloat16 and more["extra"][0].dtype == torch.bfloat16  # tuple, dict, list: cast back
    assert pos.dtype == torch.int64 and torch.equal(pos, positions)  # integer tensors pass untouched
    assert hidden.dtype == torch.bfloat16  # the caller's tensors are not changed in place


def test_hooks_are_removed_on_exit_and_the_layer_stays_fp32():
    layer = Recorder().to(torch.float16)
    with fp32_master_layers([layer], torch.float16):
        assert len(layer._forward_pre_hooks) == 1 and len(layer._forward_hooks) == 1
    assert len(layer._forward_pre_hooks) == 0 and len(layer._forward_hooks) == 0
    assert layer.weight.dtype == torch.float32
    out, _, _ = layer(torch.ones(1, 4), torch.arange(1), mask=torch.ones(1), extras=[torch.ones(1)])
    assert out.dtype == torch.float32  # no more cast back


def test_hooks_are_removed_when_the_block_raises():
    layer = Recorder().to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="inside"):
        with fp32_master_layers([layer], torch.bfloat16):
            raise RuntimeError("inside")
    assert len(layer._forward_pre_hooks) == 0 and len(layer._forward_hooks) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_precision_models_are_left_alone(dtype):
    layer = Recorder().to(dtype)
    assert fp32_master([layer], dtype) == []
    assert layer.weight.dtype == dtype and len(layer._forward_hooks) == 0


def test_bf16_model_with_fp32_master_moves_the_weights():
    model = make_tiny_model("llama").to(torch.bfloat16)
    layout = find_layer_layout(model)
    plain = copy.deepcopy(model)
    fp32_master([get_layer(model, layout, LAYER)], torch.bfloat16)
    names = layer_parameter_names(model, layout, LAYER)
    ids = _ids()
    cfg = zo.ZOConfig(lr=1e-5, eps=1e-2)
    moved = zo.TunedParams.from_model(model, names)
    stuck = zo.TunedParams.from_model(plain, names)
    assert all(t.dtype == torch.float32 for t in moved.tensors)
    before = _snapshot(moved)
    for step in range(3):
        zo.zo_step(moved, lambda: float(_lm_loss(model, ids)), step, cfg, zo.ZOState())
        zo.zo_step(stuck, lambda: float(_lm_loss(plain, ids)), step, cfg, zo.ZOState())
    assert not _same(moved, before)
    assert model(input_ids=ids).logits.dtype == torch.bfloat16  # the frozen rest stays bf16
    # the same tiny updates written straight into bf16 weights round away (why the master copy exists)
    stuck_changed = sum(int((t != b.to(torch.bfloat16)).sum()) for t, b in zip(stuck.tensors, before))
    moved_changed = sum(int((t != b).sum()) for t, b in zip(moved.tensors, before))
    assert stuck_changed < moved_changed / 10
