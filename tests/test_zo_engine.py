"""The ZO engine: exact restore, gradient estimate, update rules, replay, lower-layer cache."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_model
from layerzo.zo import engine as zo
from layerzo.errors import ConfigError, DivergenceError
from layerzo.model.layers import find_layer_layout, get_layer, layer_parameter_names
from layerzo.model.prefix_cache import cached_lower_layers

LAYER = 2


def _ids(seed: int = 0, batch: int = 3, length: int = 12) -> torch.Tensor:
    return torch.randint(0, 1000, (batch, length), generator=torch.Generator().manual_seed(seed))


def _lm_loss(model, ids):
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).to(torch.float64), ids[:, 1:].reshape(-1))


def _setup(model=None, layer: int = LAYER):
    model = model or make_tiny_model("llama")
    layout = find_layer_layout(model)
    params = zo.TunedParams.from_model(model, layer_parameter_names(model, layout, layer))
    ids = _ids()
    return model, layout, params, ids, (lambda: float(_lm_loss(model, ids)))


def _snapshot(params: zo.TunedParams) -> list[torch.Tensor]:
    return [t.detach().clone() for t in params.tensors]


def _same(params: zo.TunedParams, snap) -> bool:
    return all(torch.equal(t, s) for t, s in zip(params.tensors, snap))


def test_lr_zero_step_leaves_weights_bit_identical():
    _, _, params, _, loss = _setup()
    snap = _snapshot(params)
    result = zo.zo_step(params, loss, 1234, zo.ZOConfig(lr=0.0, eps=1e-2), zo.ZOState())
    assert result.applied and result.grads[0] != 0.0
    assert _same(params, snap)


def test_restore_after_perturbation_is_bit_exact_and_forward_sees_perturbation():
    model, _, params, ids, loss = _setup()
    snap = _snapshot(params)
    base_loss = loss()
    seen = []

    def loss_fn():
        seen.append(loss())
        return seen[-1]

    cfg = zo.ZOConfig(lr=0.0, eps=1e-2)
    for seed in range(3):
        zo.zo_step(params, loss_fn, seed, cfg, zo.ZOState())
        assert _same(params, snap)
    assert all(v != base_loss for v in seen)  # the perturbation was really applied inside
    assert loss() == base_loss


def test_perturbation_restored_even_if_forward_raises():
    model, _, params, ids, _ = _setup()
    snap = _snapshot(params)
    with pytest.raises(RuntimeError):
        with zo.perturbed(params, 5, 1e-1):
            get_layer(model, find_layer_layout(model), LAYER).mlp.register_forward_hook(
                lambda *a: (_ for _ in ()).throw(RuntimeError("boom"))
            )
            model(input_ids=ids)
    assert _same(params, snap)


def test_projected_gradient_matches_autograd_directional_derivative():
    model = make_tiny_model("llama").double()
    model, _, params, ids, loss = _setup(model)
    seed = 4242
    (s,) = zo.direction_seeds(seed, 1)
    with torch.enable_grad():
        for t in params.tensors:
            t.requires_grad_(True)
        grads = torch.autograd.grad(_lm_loss(model, ids), list(params.tensors))
    directional = sum(
        float((g * zo.direction(t, zo.param_seed(s, i)).double()).sum())
        for i, (t, g) in enumerate(zip(params.tensors, grads))
    )
    # eps balances truncation (∝ eps²) against the float32 RMSNorm inside the float64 model (∝ 1/eps)
    result = zo.zo_step(params, loss, seed, zo.ZOConfig(lr=0.0, eps=1e-4), zo.ZOState())
    assert abs(directional) > 1e-3
    assert result.grads[0] == pytest.approx(directional, rel=1e-3)


def _manual_update(snap, seeds, grads, lr, wd=0.0):
    out = []
    for i, t in enumerate(snap):
        d = sum(g * zo.direction(t, zo.param_seed(s, i)) for s, g in zip(seeds, grads)) / len(seeds)
        if wd and t.dim() >= 2:
            d = d + wd * t
        out.append(t - lr * d)
    return out


def test_q_directions_average_their_estimates():
    _, _, params, _, loss = _setup()
    snap = _snapshot(params)
    result = zo.zo_step(params, loss, 7, zo.ZOConfig(lr=1e-2, eps=1e-2, q=3), zo.ZOState())
    assert len(result.seeds) == len(set(result.seeds)) == 3 and len(result.grads) == 3
    expected = _manual_update(snap, result.seeds, result.grads, 1e-2)
    for t, e in zip(params.tensors, expected):
        torch.testing.assert_close(t, e, rtol=0, atol=1e-6)


def test_momentum_accumulates_previous_directions():
    _, _, params, _, loss = _setup()
    snap = _snapshot(params)
    cfg, state = zo.ZOConfig(lr=1e-2, eps=1e-2, momentum=0.9), zo.ZOState()
    r1 = zo.zo_step(params, loss, 1, cfg, state)
    r2 = zo.zo_step(params, loss, 2, cfg, state)
    for i, (t, s0) in enumerate(zip(params.tensors, snap)):
        d1 = r1.grads[0] * zo.direction(s0, zo.param_seed(r1.seeds[0], i))
        d2 = r2.grads[0] * zo.direction(s0, zo.param_seed(r2.seeds[0], i))
        expected = s0 - 1e-2 * d1 - 1e-2 * (0.9 * d1 + d2)
        torch.testing.assert_close(t, expected, rtol=0, atol=1e-6)


def test_linear_schedule_decays_to_zero():
    cfg = zo.ZOConfig(lr=1.0, lr_schedule="linear")
    assert [zo.lr_at(cfg, s, 4) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert zo.lr_at(zo.ZOConfig(lr=0.5), 3, 4) == 0.5
    _, _, params, _, loss = _setup()
    state = zo.ZOState()
    lrs = [zo.zo_step(params, loss, s, zo.ZOConfig(lr=1e-3, lr_schedule="linear"), state,
                      total_steps=2).lr
           for s in range(2)]
    assert lrs == [1e-3, 5e-4]


def test_weight_decay_skips_norms_and_biases():
    _, _, params, _, _ = _setup()
    snap = _snapshot(params)
    zo.zo_step(params, lambda: 1.0, 3, zo.ZOConfig(lr=0.1, weight_decay=0.5), zo.ZOState())  # g = 0
    for name, t, s in zip(params.names, params.tensors, snap):
        if t.dim() >= 2:
            torch.testing.assert_close(t, s * (1 - 0.1 * 0.5))
        else:
            assert "norm" in name and torch.equal(t, s)


def test_non_finite_loss_rejects_step_and_repeated_failures_raise():
    _, _, params, _, _ = _setup()
    snap = _snapshot(params)
    cfg, state = zo.ZOConfig(lr=1.0, max_bad_steps=3), zo.ZOState()
    for seed in range(2):
        result = zo.zo_step(params, lambda: float("nan"), seed, cfg, state)
        assert not result.applied and "non-finite" in result.reason
    assert _same(params, snap)
    with pytest.raises(DivergenceError, match="3 steps in a row"):
        zo.zo_step(params, lambda: float("inf"), 9, cfg, state)
    assert _same(params, snap)


def test_gradient_bound_rejects_and_a_good_step_resets_the_streak():
    _, _, params, _, loss = _setup()
    snap = _snapshot(params)
    calls = iter([0.0, 1.0])  # g = (0 - 1) / 2e-3 = -500
    state = zo.ZOState()
    result = zo.zo_step(params, lambda: next(calls), 1, zo.ZOConfig(lr=1.0, max_abs_grad=10.0), state)
    assert not result.applied and "max_abs_grad" in result.reason and _same(params, snap)
    assert state.bad_in_row == 1
    zo.zo_step(params, loss, 2, zo.ZOConfig(lr=1e-3, max_abs_grad=1e6), state)
    assert state.bad_in_row == 0 and not _same(params, snap)


def test_replay_rebuilds_live_weights_bit_exactly():
    model, _, params, _, loss = _setup()
    base = copy.deepcopy(model)
    cfg, state = zo.ZOConfig(lr=1e-2, eps=1e-2, q=2, momentum=0.5, weight_decay=0.1), zo.ZOState()
    trajectory = []
    for step in range(4):
        r = zo.zo_step(params, loss, 100 + step, cfg, state)
        trajectory.append({"step": step, "seeds": list(r.seeds), "grads": list(r.grads), "lr": r.lr})
    replica = zo.TunedParams.from_model(base, params.names)
    assert not _same(replica, _snapshot(params))
    zo.replay_trajectory(replica, trajectory, cfg)
    assert _same(replica, _snapshot(params))


def test_kept_and_regenerated_directions_give_identical_steps(monkeypatch):
    _, _, kept, _, loss_a = _setup()
    _, _, regen, _, loss_b = _setup()
    cfg = zo.ZOConfig(lr=1e-2, eps=1e-2, q=2, weight_decay=0.1)
    zo.zo_step(kept, loss_a, 11, cfg, zo.ZOState())
    monkeypatch.setattr(zo, "Z_CACHE_MAX_BYTES", 0)  # force the memory-lean regenerate path
    zo.zo_step(regen, loss_b, 11, cfg, zo.ZOState())
    assert _same(kept, _snapshot(regen))


@pytest.mark.parametrize("budget_scale, draws_per_tensor", [(1, 1), (0, 3), (None, 1)])
def test_z_cache_budget_decides_between_one_draw_and_the_seed_trick(monkeypatch, budget_scale, draws_per_tensor):
    _, _, params, _, loss = _setup()
    numel = sum(t.numel() for t in params.tensors)
    budget = None if budget_scale is None else budget_scale * numel * 4  # exactly fits / nothing fits / default
    draws = []
    real = zo.direction
    monkeypatch.setattr(zo, "direction", lambda t, s, cache=None: (draws.append(s) if cache is None else None)
                        or real(t, s, cache))
    zo.zo_step(params, loss, 5, zo.ZOConfig(lr=1e-3, eps=1e-3), zo.ZOState(), z_cache_max_bytes=budget)
    assert len(draws) == draws_per_tensor * len(params.tensors)  # +eps, -eps, update: once kept, else 3 times


def test_z_cache_budget_is_an_eighth_of_the_model_weights():
    model = make_tiny_model("llama")
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert zo.z_cache_budget(model) == total // 8
    assert zo.z_cache_budget(model.to(torch.bfloat16)) == total // 16  # bytes, not weights
    _, _, params, _, loss = _setup()
    with pytest.raises(ConfigError, match="z_cache_max_bytes"):
        zo.zo_step(params, loss, 1, zo.ZOConfig(lr=1e-3), zo.ZOState(), z_cache_max_bytes=-1)
    with pytest.raises(ConfigError, match="total_steps"):
        zo.zo_step(params, loss, 1, zo.ZOConfig(lr=1e-3), zo.ZOState(), total_steps=0)


def test_lower_layer_cache_gives_the_same_losses_as_the_plain_forward():
    model, layout, params, ids, loss = _setup()
    plain = [loss()]
    for s in range(2):
        for scale in (1e-2, -1e-2):
            with zo.perturbed(params, s, scale):
                plain.append(loss())
    calls = {"n": 0}
    hook = get_layer(model, layout, 0).register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    cached = []
    with cached_lower_layers(model, layout, LAYER):
        cached.append(loss())
        for s in range(2):
            for scale in (1e-2, -1e-2):
                with zo.perturbed(params, s, scale):
                    cached.append(loss())
    hook.remove()
    assert cached == plain
    assert calls["n"] == 1  # layer 0 ran once for five forwards
    assert loss() == plain[0] and isinstance(get_layer(model, layout, 0), type(get_layer(model, layout, 3)))


def test_seeds_are_63_bit_and_distinct():
    seeds = zo.direction_seeds(0, 8) + zo.direction_seeds(1, 8)
    assert len(set(seeds)) == 16 and all(0 <= s < 2**63 for s in seeds)
    assert zo.param_seed(seeds[0], 0) != zo.param_seed(seeds[0], 1)


def test_direction_does_not_touch_the_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    zo.direction(torch.zeros(10), 123)
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(zo.direction(torch.zeros(10), 123), zo.direction(torch.zeros(10), 123))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": -1.0}, "lr"),
        ({"lr": 1e-3, "eps": 0.0}, "eps"),
        ({"lr": 1e-3, "q": 0}, "q"),
        ({"lr": 1e-3, "momentum": 1.0}, "momentum"),
        ({"lr": 1e-3, "lr_schedule": "cosine"}, "lr_schedule"),
        ({"lr": math.nan}, "lr"),
        ({"lr": 1e-3, "max_abs_grad": 0.0}, "max_abs_grad"),
        ({"lr": 1e-3, "max_bad_steps": 0}, "max_bad_steps"),
    ],
)
def test_bad_config_values_are_named(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        zo.ZOConfig(**kwargs)


def test_unknown_parameter_name_is_refused():
    model = make_tiny_model("llama")
    with pytest.raises(ConfigError, match="not in the model"):
        zo.TunedParams.from_model(model, ["model.layers.99.mlp.up_proj.weight"])


@pytest.mark.parametrize("field, value", [("lr", 1e308), ("weight_decay", 1e39), ("eps", 1e300)])
def test_values_beyond_float32_are_refused_before_they_overflow_an_update(field, value):
    """The update multiplies float32 tensors by lr / eps / weight decay: 1e308 would overflow there."""
    with pytest.raises(ConfigError, match=f"{field} must be .*at most 3.403e\\+38"):
        zo.ZOConfig(**{"lr": 1e-3, field: value})
    zo.ZOConfig(**{"lr": 1e-3, field: 1e38})  # the float32 range itself is fine
