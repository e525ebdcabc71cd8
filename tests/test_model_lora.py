"""LoRA-ZO on peft: adapters start at the base model, use patch key names, merge exactly, tune with the engine."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model
from layerzo.zo import engine as zo
from layerzo.errors import ArchitectureError, ConfigError
from layerzo.model.layers import find_layer_layout
from layerzo.model.lora import ADAPTER_NAME, add_lora, lora_base_names, lora_delta, model_parameter_name, remove_lora


def lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]

IDS = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))


def test_adapters_start_at_the_base_model_with_patch_key_names():
    model = make_tiny_model("llama")
    before = model(input_ids=IDS).logits
    names = add_lora(model, find_layer_layout(model), [1], r=4, alpha=8)
    assert names == [f"model.layers.1.self_attn.{p}_proj.lora_{m}.weight" for p in "qv" for m in "AB"]
    params = {n: model.get_parameter(model_parameter_name(n)) for n in names}
    assert model_parameter_name(names[0]) == f"model.layers.1.self_attn.q_proj.lora_A.{ADAPTER_NAME}.weight"
    assert params[names[0]].shape == (4, 32) and params[names[1]].shape[1] == 4
    assert all(params[n].dtype == torch.float32 for n in names)
    assert not any(p.requires_grad for p in model.parameters())  # forward passes only
    assert torch.equal(model(input_ids=IDS).logits, before)  # B = 0
    assert lora_base_names(names) == [f"model.layers.1.self_attn.{p}_proj.weight" for p in "qv"]


def test_merged_delta_equals_the_wrapped_forward():
    model = make_tiny_model("llama")
    reference = make_tiny_model("llama")
    add_lora(model, find_layer_layout(model), [0, 2], r=2, alpha=6)
    with torch.no_grad():
        for _, module in lora_layers(model):
            module.lora_B[ADAPTER_NAME].weight.normal_(generator=torch.Generator().manual_seed(1))
    wrapped = model(input_ids=IDS).logits
    ref_params = dict(reference.named_parameters())
    with torch.no_grad():
        for name, module in lora_layers(model):
            ref_params[name + ".weight"].add_(lora_delta(module.lora_A[ADAPTER_NAME].weight,
                                                         module.lora_B[ADAPTER_NAME].weight,
                                                         module.scaling[ADAPTER_NAME]))
    torch.testing.assert_close(reference(input_ids=IDS).logits, wrapped, atol=1e-5, rtol=1e-4)
    remove_lora(model)
    assert lora_layers(model) == []
    assert torch.equal(model(input_ids=IDS).logits, make_tiny_model("llama")(input_ids=IDS).logits)


def test_zo_step_moves_adapters_only_and_restores_exactly():
    model = make_tiny_model("llama")
    names = add_lora(model, find_layer_layout(model), [2])
    frozen = {n: p.clone() for n, p in model.named_parameters() if "lora_" not in n}
    params = zo.TunedParams.from_model(model, [model_parameter_name(n) for n in names])
    snap = [t.clone() for t in params.tensors]

    def loss():
        return float(model(input_ids=IDS).logits.float().pow(2).mean())

    zo.zo_step(params, loss, 0, zo.ZOConfig(lr=0.0, eps=1e-2), zo.ZOState())
    assert all(torch.equal(t, s) for t, s in zip(params.tensors, snap))
    zo.zo_step(params, loss, 1, zo.ZOConfig(lr=1e-2, eps=1e-2), zo.ZOState())
    assert not all(torch.equal(t, s) for t, s in zip(params.tensors, snap))
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_bf16_model_keeps_fp32_adapters():
    model = make_tiny_model("llama").to(torch.bfloat16)
    names = add_lora(model, find_layer_layout(model), [1])
    assert model.get_parameter(model_parameter_name(names[0])).dtype == torch.float32
    assert model(input_ids=IDS).logits.dtype == torch.bfloat16


def test_same_seed_same_init():
    a, b = make_tiny_model("llama"), make_tiny_model("llama")
    na = add_lora(a, find_layer_layout(a), [1], seed=5)
    add_lora(b, find_layer_layout(b), [1], seed=5)
    assert all(torch.equal(a.get_parameter(model_parameter_name(n)), b.get_parameter(model_parameter_name(n)))
               for n in na)


def test_fused_attention_and_bad_rank_are_refused():
    gpt2 = make_tiny_model("gpt2")
    with pytest.raises(ArchitectureError, match="q_proj/v_proj"):
        add_lora(gpt2, find_layer_layout(gpt2), [0])
    llama = make_tiny_model("llama")
    with pytest.raises(ConfigError, match="lora_rank"):
        add_lora(llama, find_layer_layout(llama), [0], r=0)
    with pytest.raises(ConfigError, match="lora_alpha"):
        add_lora(llama, find_layer_layout(llama), [0], alpha=-1)


def test_a_rank_above_the_projection_size_is_refused_before_any_allocation():
    model = make_tiny_model("llama")  # q/v projections are 32x32 and 32x16
    layout = find_layer_layout(model)
    with pytest.raises(ConfigError, match="lora_rank 1000000000 is larger than .*q_proj"):
        add_lora(model, layout, [1], r=10**9)
    assert not any("lora" in n for n, _ in model.named_parameters())
