"""One forward for + and − (``paired_forward``): the same losses as two forwards, on every tested architecture."""

from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import TINY_ARCHS, make_tiny_model
from layerzo.data.objectives import Objective
from layerzo.data.tasks import load_task
from layerzo.model.layers import find_layer_layout, get_layer, layer_parameter_names
from layerzo.tune.config import TuneConfig
from layerzo.tune.loop import PAIRED_FORWARD_DEFAULT, tune, uses_paired_forward
from layerzo.zo.engine import TunedParams, ZOConfig, ZOState, zo_step


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("objective", ["choice", "ce"])
def test_paired_losses_and_grads_equal_two_forwards_over_several_steps(arch, objective, tokenizer, data_dir):
    model = make_tiny_model(arch)
    layout, layer = find_layer_layout(model), 2
    splits = load_task("cb", data_dir, num_train=24, num_dev=0, num_test=0)  # 3 candidates, uneven lengths: padding
    obj = Objective(objective, tokenizer, max_length=96)
    cache = obj.example_cache(model, layout, layer, splits.train, batch_size=8, max_bytes=2**30)
    names = layer_parameter_names(model, layout, layer)
    runs = {}
    for paired in (False, True):
        params = TunedParams.from_model(model, names)
        base, state, seeds, out = params.state(), ZOState(), random.Random(0), []
        calls = [0]
        handle = get_layer(model, layout, layer + 1).register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
        with torch.no_grad():
            for step in range(3):  # the weights move: later steps check the paired path at updated weights
                batch = obj.encode(splits.train[8 * step: 8 * step + 8])
                with obj.step_loss(model, layout, layer, batch, examples=cache, paired=paired) as loss:
                    assert (loss.pair is not None) == paired
                    out.append(zo_step(params, loss, seeds.getrandbits(63), ZOConfig(lr=1e-2, eps=1e-2), state,
                                       pair_loss=loss.pair))
        handle.remove()
        runs[paired] = (out, calls[0], params.state())
        params.load(base)
    (two, calls_two, w_two), (one, calls_one, w_one) = runs[False], runs[True]
    assert calls_two == 6 and calls_one == 3  # the layer above: twice per step on R rows, once on 2R rows
    for a, b in zip(two, one):
        for x, y in zip(a.losses_plus + a.losses_minus + a.grads, b.losses_plus + b.losses_minus + b.grads):
            assert y == pytest.approx(x, rel=1e-5, abs=1e-6)
    for name in w_two:
        torch.testing.assert_close(w_one[name], w_two[name], rtol=1e-5, atol=1e-6)
    assert not any(type(get_layer(model, layout, i)).__name__.startswith("_") for i in range(4))  # all put back


def test_paired_forward_applies_to_one_tuned_layer_only_and_defaults_per_device():
    assert PAIRED_FORWARD_DEFAULT["cpu"] is False  # measured: see benchmarks/results/step.md
    assert uses_paired_forward(TuneConfig(paired_forward=True), (3,))
    assert not uses_paired_forward(TuneConfig(paired_forward=True), (3, 4))
    assert not uses_paired_forward(TuneConfig(), (3,))
    assert not uses_paired_forward(TuneConfig(device="cuda:1"), (3,))  # no measured default there: off


def test_tune_with_paired_forward_matches_two_forwards_and_is_deterministic(tiny_llama_dir, data_dir, tmp_path):
    common = dict(model=str(tiny_llama_dir), data_dir=str(data_dir), task="sst2", steps=12, batch_size=8,
                  num_train=48, num_dev=16, num_test=8, eval_every=6, lr=1e-2, eps=1e-2, layers="2",
                  keep="last")  # the whole trajectory
    for name, paired in (("two", False), ("one", True), ("one_again", True)):
        tune(TuneConfig.from_dict({**common, "paired_forward": paired}), tmp_path / name, progress=False)
    traj = {n: [json.loads(x) for x in (tmp_path / n / "trajectory.jsonl").read_text().splitlines()]
            for n in ("two", "one")}
    assert len(traj["two"]) == len(traj["one"]) == 12
    for a, b in zip(traj["two"], traj["one"]):
        assert a["seeds"] == b["seeds"] and b["grads"][0] == pytest.approx(a["grads"][0], rel=1e-5, abs=1e-6)
    for f in ("layer_patch.safetensors", "trajectory.jsonl"):
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "one_again" / f).read_bytes()
