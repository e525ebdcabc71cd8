"""In-memory merge: identity checks, fingerprints, the layers / LoRA maths (layerzo.patch.merge)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import make_tiny_model
from layerzo.core.hashing import tensor_sha256
from layerzo.errors import BaseMismatchError, PatchError
from layerzo.model.lora import lora_delta
from layerzo.patch.format import LayerPatch
from layerzo.patch.merge import (apply_to_model, check_model_identity, fingerprint_mismatches, merge_tensors,
                                 mismatch_error)
from patch_helpers import make_patch


@pytest.fixture()
def model():
    return make_tiny_model("llama", num_layers=4, seed=3)


def test_identity_refuses_another_architecture_or_layer_count(model):
    patch = make_patch(model, 2)
    check_model_identity(patch, [patch.manifest.architecture], patch.manifest.num_layers)  # the right base passes
    with pytest.raises(BaseMismatchError, match="made for"):
        check_model_identity(patch, ["GPT2LMHeadModel"], patch.manifest.num_layers)
    with pytest.raises(BaseMismatchError, match="4-layer"):
        check_model_identity(patch, [], 30)


def test_fingerprint_mismatches_name_exactly_the_changed_tensors(model):
    patch = make_patch(model, 1)
    base = dict(model.named_parameters())
    assert fingerprint_mismatches(patch.manifest, base) == []
    key = sorted(patch.manifest.base_fingerprint)[0]
    changed = {**base, key: base[key].detach().clone().add_(1e-3)}
    assert fingerprint_mismatches(patch.manifest, changed) == [key]
    error = mismatch_error(patch.manifest, key, changed[key].to(torch.bfloat16))
    assert key in error.one_line() and "load it as float32" in error.one_line()


def test_merge_returns_the_patch_values_and_force_only_skips_the_fingerprint(model):
    patch = make_patch(model, 2, scale=0.1)
    base = {k: v.detach().clone() for k, v in model.named_parameters() if k in patch.manifest.base_fingerprint}
    merged, notes = merge_tensors(patch, base)
    assert notes == [] and all(torch.equal(merged[k], patch.tensors[k]) for k in merged)
    key = sorted(base)[0]
    base[key].add_(1.0)
    with pytest.raises(BaseMismatchError, match="differs"):
        merge_tensors(patch, base)
    merged, notes = merge_tensors(patch, base, force=True)
    assert len(notes) == 1 and key in notes[0] and torch.equal(merged[key], patch.tensors[key])
    base[key] = base[key][:1]
    with pytest.raises(BaseMismatchError, match="shape"):
        merge_tensors(patch, base, force=True)  # force never skips shapes


def test_a_lora_merge_adds_scaling_times_b_at_a_and_refuses_overflow(model):
    stem = "model.layers.2.self_attn.q_proj"
    w = model.get_parameter(stem + ".weight").detach()
    a = torch.randn(2, w.shape[1], generator=torch.Generator().manual_seed(0))
    b = torch.randn(w.shape[0], 2, generator=torch.Generator().manual_seed(1))
    manifest = dataclasses.replace(make_patch(model, 2).manifest, kind="lora", lora={"r": 2, "alpha": 4.0},
                                   base_fingerprint={stem + ".weight": tensor_sha256(w)})
    patch = LayerPatch(manifest, {stem + ".lora_A.weight": a, stem + ".lora_B.weight": b})
    merged, _ = merge_tensors(patch, {stem + ".weight": w})
    torch.testing.assert_close(merged[stem + ".weight"], w + lora_delta(a, b, 2.0))
    huge = LayerPatch(manifest, {stem + ".lora_A.weight": a * 1e30, stem + ".lora_B.weight": b * 1e30})
    with pytest.raises(PatchError, match="NaN or infinite"):
        merge_tensors(huge, {stem + ".weight": w})


def test_apply_to_model_changes_only_the_patched_layer(model):
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    patch = make_patch(model, 1, scale=0.1)
    assert apply_to_model(model, patch) == []
    after = dict(model.named_parameters())
    for key, value in before.items():
        expected = patch.tensors.get(key, value)
        assert torch.equal(after[key], expected), key


def test_a_mismatched_architecture_is_named_once(model):
    """The model's class name and config.architectures usually agree: the message says the name once."""
    patch = make_patch(model, 2)
    with pytest.raises(BaseMismatchError) as info:
        check_model_identity(patch, ["Qwen2ForCausalLM", "Qwen2ForCausalLM"], patch.manifest.num_layers)
    assert str(info.value).count("Qwen2ForCausalLM") == 1
