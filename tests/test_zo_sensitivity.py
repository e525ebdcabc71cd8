"""The ZO sensitivity profile (layerzo.zo.sensitivity): estimates, stability, propagation, the pick."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from conftest import make_tiny_model
from layerzo.errors import ConfigError
from layerzo.model.layers import find_layer_layout, get_layer
from layerzo.zo.sensitivity import (LayerSensitivity, SensitivityConfig, layer_sensitivity, pick_by_sensitivity,
                                    plot_sensitivity)


def _batches(n=2):
    out = []
    for s in range(n):
        ids = torch.randint(0, 1000, (3, 9), generator=torch.Generator().manual_seed(s))
        mask = torch.ones_like(ids)
        mask[0, :2] = 0  # some padding
        out.append(SimpleNamespace(input_ids=ids, attention_mask=mask))
    return out


def _loss(model):
    return lambda b: float(model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.float().pow(2).mean())


def test_every_layer_is_measured_and_the_model_is_untouched():
    model = make_tiny_model("llama", num_layers=4)
    layout = find_layer_layout(model)
    before = {n: p.clone() for n, p in model.named_parameters()}
    report = layer_sensitivity(model, layout, _batches(), _loss(model), SensitivityConfig(directions=4))
    assert [s.layer for s in report.layers] == [0, 1, 2, 3]
    assert all(s.grad_rms > 0 and s.numel > 0 and s.own_change > 0 for s in report.layers)
    assert report.layers[-1].growth == pytest.approx(1.0)  # the last layer's own output IS the final one
    assert report.forwards == 2 * (1 + 4 * 2 * 4)  # one plain forward per batch, 2K perturbed per layer
    # the work in plain forwards: 1 + 2K · Σ_l (L − l) / L = 1 + 8 · (4 + 3 + 2 + 1) / 4 = 21 per batch
    assert report.forward_equivalents == pytest.approx(21.0)
    assert 0 < report.plain_seconds < report.seconds and report.cost_in_forwards > 1
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    doc = report.to_dict()
    assert len(doc["layers"]) == 4 and doc["pick"] in doc["ranking"] and doc["config"]["directions"] == 4


def test_the_base_pass_is_shared_by_every_layer_and_forwards_counts_what_ran():
    """The last layer runs once per forward; layer 0 in the plain pass, its own perturbed passes and once per batch
    to feed layer 1's cache, never again (the prefix cache keeps the deepest output)."""
    model = make_tiny_model("llama", num_layers=4)
    layout = find_layer_layout(model)
    calls = {0: 0, 3: 0}
    handles = [get_layer(model, layout, i).register_forward_hook(
        lambda *_, i=i: calls.__setitem__(i, calls[i] + 1)) for i in calls]
    try:
        for one_sided in (False, True):
            calls.update({0: 0, 3: 0})
            report = layer_sensitivity(model, layout, _batches(), _loss(model),
                                       SensitivityConfig(directions=3, one_sided=one_sided))
            assert calls[3] == report.forwards == 2 * (1 + 4 * 3 * (1 if one_sided else 2))
            assert calls[0] == 2 + 2 * 3 * (1 if one_sided else 2) + 2
    finally:
        for h in handles:
            h.remove()


def test_one_sided_differences_agree_with_central_ones_to_first_order():
    model = make_tiny_model("llama", num_layers=3)
    layout = find_layer_layout(model)
    central, one_sided = (layer_sensitivity(model, layout, _batches(), _loss(model),
                                            SensitivityConfig(directions=4, eps=1e-4, one_sided=o))
                          for o in (False, True))
    for c, o in zip(central.layers, one_sided.layers):
        assert o.grad_rms == pytest.approx(c.grad_rms, rel=0.05)
        assert o.final_change == pytest.approx(c.final_change, rel=0.05)
        assert o.own_change == pytest.approx(c.own_change, rel=0.05)
    assert central.ranking() == one_sided.ranking()
    with pytest.raises(ConfigError, match="one_sided"):
        SensitivityConfig(one_sided="yes")


def test_the_rms_of_g_estimates_the_gradient_norm():
    """E[g²] = ‖∇L‖² for z ~ N(0, I): checked against autograd on one layer, many directions."""
    model = make_tiny_model("llama", num_layers=2)
    layout = find_layer_layout(model)
    batch = _batches(1)
    report = layer_sensitivity(model, layout, batch, _loss(model), SensitivityConfig(directions=400, eps=1e-3),
                               layers=[1])
    model.requires_grad_(True)
    loss = model(input_ids=batch[0].input_ids, attention_mask=batch[0].attention_mask).logits.float().pow(2).mean()
    loss.backward()
    norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in get_layer(model, layout, 1).parameters()))
    assert report.layers[0].grad_rms == pytest.approx(norm, rel=0.15)  # 400 directions: ~5% standard error


def test_a_layer_made_far_more_sensitive_ranks_first():
    """Layer 2 is not first on the plain tiny model; with its RMSNorm gains scaled ×8 its perturbations move the
    final hidden state twice as much as any other layer's, and it leads the ranking and is picked."""
    def profile(scale):
        model = make_tiny_model("llama", num_layers=4)
        layout = find_layer_layout(model)
        layer = get_layer(model, layout, 2)
        with torch.no_grad():
            layer.input_layernorm.weight.mul_(scale)
            layer.post_attention_layernorm.weight.mul_(scale)
        return layer_sensitivity(model, layout, _batches(), _loss(model), SensitivityConfig(directions=4))

    assert profile(1.0).ranking()[0] != 2
    scaled = profile(8.0)
    final = [s.final_change for s in scaled.layers]
    assert scaled.ranking()[0] == 2 and scaled.pick == 2 and final[2] > 1.5 * max(final[:2] + final[3:])


def test_the_pick_prefers_a_stable_signal_and_the_rule_is_documented_in_its_reason():
    def s(layer, final, stability):
        return LayerSensitivity(layer, 100, 1.0, 0.1, stability, 0.1, final, final / 0.1, 0.01)

    assert pick_by_sensitivity([s(0, 5.0, 0.2), s(1, 1.0, 3.0), s(2, 2.0, 1.5)])[0] == 2
    assert pick_by_sensitivity([s(0, 5.0, math.inf), s(1, 1.0, 3.0)])[0] == 0  # identical g on every batch
    layer, why = pick_by_sensitivity([s(0, 5.0, 0.2), s(1, 1.0, 0.3)])
    assert layer == 0 and "no layer's signal was stable" in why
    with pytest.raises(ConfigError):
        pick_by_sensitivity([])
    with pytest.raises(ConfigError, match="directions"):
        SensitivityConfig(directions=0)


def test_the_plot_is_written(tmp_path):
    model = make_tiny_model("llama", num_layers=3)
    report = layer_sensitivity(model, find_layer_layout(model), _batches(), _loss(model), SensitivityConfig(2))
    out = plot_sensitivity(report, tmp_path / "s.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
