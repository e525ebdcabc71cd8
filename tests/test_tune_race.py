"""--layers auto: candidates, the successive-halving race, and a pick that survives a useless outlier layer."""

from __future__ import annotations

import json
import math

import pytest
import torch

from layerzo.data.objectives import Objective
from layerzo.data.tasks import load_task
from layerzo.errors import ConfigError
from layerzo.model.layers import get_layer
from layerzo.model.loading import load_model
from layerzo.patch.manifest import MANIFEST_NAME
from layerzo.tune.config import TuneConfig
from layerzo.tune.loop import tune
from layerzo.tune.race import (DECIDE_SE, LAYER_RACE_FRACTION, Candidate, RaceConfig, RaceResult, RaceRound,
                               candidate_layers, first_round_steps, race, race_choice)
from layerzo.zo.engine import ZOConfig

OUTLIER = {"pick": {"layer": 2}, "layers": [
    {"layer": 0, "outlier": False, "ratio": 10.0}, {"layer": 1, "outlier": False, "ratio": 50.0},
    {"layer": 2, "outlier": True, "ratio": 3000.0}, {"layer": 3, "outlier": True, "ratio": 2500.0},
    {"layer": 4, "outlier": False, "ratio": None}, {"layer": 5, "outlier": False, "ratio": 20.0}]}


def test_candidates_are_the_picks_runner_ups_and_last_layer_each_with_every_reason():
    got = candidate_layers(OUTLIER, [3, 1, 0], num_layers=6)
    assert got == (Candidate(2, ("outlier pick",)), Candidate(3, ("outlier runner-up", "sensitivity pick")),
                   Candidate(1, ("sensitivity runner-up",)), Candidate(5, ("last layer",)))
    no_flag = {**OUTLIER, "layers": [{**s, "outlier": s["layer"] == 2} for s in OUTLIER["layers"]]}
    assert candidate_layers(no_flag, [2], 6)[1] == Candidate(3, ("outlier runner-up",))  # next by ratio


def test_a_near_miss_before_the_pick_takes_the_outlier_alternative_slot_under_the_profiles_own_thresholds():
    # layer 1 misses the ratio threshold by less than 2x (600 >= 1000 / 2): the rule's pick under a looser one
    near = {**OUTLIER, "layers": [{**s, "ratio": 600.0, "max_abs": 900.0} if s["layer"] == 1 else s
                                  for s in OUTLIER["layers"]]}
    got = candidate_layers(near, [3, 1, 0], num_layers=6)
    assert [c.layer for c in got] == [2, 1, 3, 5]  # layer 3 (next flagged) stays only as the sensitivity pick
    assert got[1] == Candidate(1, ("outlier near miss: max/median 600 < 1000", "sensitivity runner-up"))
    assert got[2] == Candidate(3, ("sensitivity pick",))
    # the profile's own thresholds decide: a stricter ratio threshold (2000) leaves 600 more than 2x short,
    # and a max|h| under max_threshold is no outlier at any ratio
    for config in ({"ratio_threshold": 2000.0}, {"max_threshold": 1000.0}):
        assert candidate_layers({**near, "config": config}, [3], 6)[1] == Candidate(3, ("outlier runner-up",
                                                                                         "sensitivity pick"))
    # only layers BEFORE the pick are near misses: a strong sub-threshold layer after it is not one
    after = {**OUTLIER, "layers": [{**s, "ratio": 900.0} if s["layer"] == 5 else s for s in OUTLIER["layers"]]}
    assert candidate_layers(after, [0], 6)[1] == Candidate(3, ("outlier runner-up",))


def decided_race(gain: float, se: float, inert: tuple = ()) -> RaceResult:
    rounds = (RaceRound(2, {0: 0.9, 2: 1.1, 5: 1.2}, (0, 2), inert), RaceRound(4, {0: 0.8, 2: 0.95}, (0,)))
    return RaceResult(0, 1.0, (Candidate(2, ("outlier pick",)), Candidate(0, ("sensitivity runner-up",)),
                               Candidate(5, ("last layer",))), rounds, 1.0, 12, gain, se)


def test_an_undecided_race_keeps_the_outlier_pick_unless_the_pick_was_inert():
    won = decided_race(gain=0.2, se=0.05)  # 4 SE: the race overrides the prior
    assert won.decided and race_choice(won, outlier_pick=2) == (0, won.reason)
    assert "undecided" not in won.reason and "gain 0.2000 ± 0.0500 SE" in won.reason
    noise = decided_race(gain=0.2, se=0.2 / DECIDE_SE)  # exactly at the edge: not more than 2 SE
    layer, why = race_choice(noise, outlier_pick=2)
    assert not noise.decided and layer == 2
    assert why.endswith(f"undecided: its gain is within {DECIDE_SE:g} SE of zero-shot: kept the outlier pick, layer 2")
    assert race_choice(decided_race(0.2, 0.2, inert=(2,)), outlier_pick=2)[0] == 0  # a pick that reaches nothing
    assert noise.to_dict()["decided"] is False and won.to_dict()["gain_se"] == 0.05
    lone = decided_race(gain=0.3, se=math.inf)  # one scored example: no spread, no decision
    assert not lone.decided and json.loads(json.dumps(lone.to_dict(), allow_nan=False))["gain_se"] is None


def test_the_race_budget_is_about_five_percent_of_the_run():
    for steps, c in ((300, 4), (1000, 5), (20, 4)):
        first = first_round_steps(steps, c, LAYER_RACE_FRACTION)
        assert first >= 2
        total, alive, s = 0, c, first
        while True:
            total += alive * s
            alive, s = (alive + 1) // 2, 2 * s
            if alive == 1:
                break
        assert total <= max(0.12 * steps, 2 * c * 4), (steps, c, total)


def useless_outlier(model, layer: int) -> None:
    """Layer ``layer`` ignores its own weights (its output is its input) and writes a massive activation on
    token 0, channel 0: the outlier rule points at it, and tuning it cannot change anything."""
    def forward_hook(module, args, output):
        hidden = args[0].clone()
        hidden[:, 0, 0] += 1e4
        return hidden
    get_layer(model, model_layout(model), layer).register_forward_hook(forward_hook)


def model_layout(model):
    from layerzo.model.layers import find_layer_layout

    return find_layer_layout(model)


def test_race_leaves_the_base_bit_identical_and_scores_a_useless_layer_at_zero_shot(tiny_llama_dir, data_dir):
    loaded = load_model(str(tiny_llama_dir))
    useless_outlier(loaded.model, 1)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    splits = load_task("sst2", data_dir, num_train=32, num_dev=16, num_test=0)
    objective = Objective("choice", loaded.tokenizer, max_length=64)
    result = race(loaded, objective, splits.train, splits.dev, [Candidate(1, ("x",)), Candidate(3, ("y",))],
                  ZOConfig(lr=5e-2, eps=1e-2), RaceConfig(first_steps=3, dev_examples=16, batch_size=8))
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())
    first = result.rounds[0]
    assert first.dev_loss[1] == result.zero_shot_dev_loss  # its weights reach nothing
    assert first.dev_loss[3] < result.zero_shot_dev_loss and result.winner == 3
    # the gain is paired over the 16 scored examples: per-example mean-token losses, not the token-weighted score
    assert result.gain > 0 and 0 < result.gain_se < math.inf
    assert len(result.rounds) == 1 and result.steps == 2 * 3  # one round decides two candidates
    assert "layer 3 (y) won a race of 2 candidates" in result.reason and "vs layer 1's" in result.reason
    with pytest.raises(ConfigError, match="at least one candidate"):
        race(loaded, objective, splits.train, splits.dev, [], ZOConfig(lr=1e-3))


def test_auto_passes_over_an_outlier_layer_made_useless(tiny_llama_dir, data_dir, tmp_path):
    """The outlier rule picks the useless layer 1 (--layers dominant takes it); auto races it and takes another."""
    common = dict(model=str(tiny_llama_dir), data_dir=str(data_dir), task="sst2", steps=40, batch_size=8,
                  num_train=64, num_dev=16, num_test=8, eval_every=20, lr=1e-2, eps=1e-2)
    loaded = load_model(str(tiny_llama_dir))
    useless_outlier(loaded.model, 1)
    dominant = tune(TuneConfig.from_dict({**common, "layers": "dominant"}), tmp_path / "d", loaded=loaded,
                    progress=False)
    assert dominant.layers == (1,)
    notes: list[str] = []
    auto = tune(TuneConfig.from_dict({**common, "layers": "auto"}), tmp_path / "a", loaded=loaded, progress=False,
                note=notes.append)
    assert auto.layers != (1,)
    profile = json.loads((tmp_path / "a" / MANIFEST_NAME).read_text())["profile"]
    assert profile["selection"] == "auto" and profile["dominant_layer"] == auto.layers[0]
    race_record = profile["race"]
    assert {c["layer"] for c in race_record["candidates"]} >= {1, 3} and race_record["winner"] == auto.layers[0]
    assert race_record["rounds"][0]["dev_loss"]["1"] == race_record["zero_shot_dev_loss"]
    assert profile["outlier_profile"]["pick"]["layer"] == 1
    assert any(n.startswith("--layers auto: racing layers 1 (outlier pick") for n in notes)
    assert any("won a race" in n for n in notes)


def test_an_inert_layer_is_out_even_when_noise_leaves_the_live_ones_worse(tiny_llama_dir, data_dir):
    """lr 0.5 makes every live layer's dev loss worse than zero-shot after a few steps; the inert layer keeps
    the zero-shot loss exactly, yet it cannot win: its weights reach nothing."""
    loaded = load_model(str(tiny_llama_dir))
    useless_outlier(loaded.model, 1)
    splits = load_task("sst2", data_dir, num_train=32, num_dev=16, num_test=0)
    objective = Objective("choice", loaded.tokenizer, max_length=64)
    result = race(loaded, objective, splits.train, splits.dev, [Candidate(1, ("outlier pick",)), Candidate(2, ("b",)),
                                                                Candidate(3, ("c",))],
                  ZOConfig(lr=0.5, eps=1e-2), RaceConfig(first_steps=2, dev_examples=16, batch_size=8))
    first = result.rounds[0]
    assert first.inert == (1,) and first.dev_loss[1] == result.zero_shot_dev_loss
    assert all(v > result.zero_shot_dev_loss for layer, v in first.dev_loss.items() if layer != 1)  # live: worse
    assert result.winner != 1
    assert "inert (no perturbation changed the loss): layer(s) 1" in result.reason
    assert "no candidate lowered the dev loss" in result.reason


def test_the_race_runs_each_batchs_lower_layers_once_for_all_candidates(tiny_llama_dir, data_dir):
    loaded = load_model(str(tiny_llama_dir))
    splits = load_task("sst2", data_dir, num_train=32, num_dev=16, num_test=0)
    objective = Objective("choice", loaded.tokenizer, max_length=64)
    calls = [0]
    get_layer(loaded.model, model_layout(loaded.model), 0).register_forward_hook(
        lambda *a: calls.__setitem__(0, calls[0] + 1))
    result = race(loaded, objective, splits.train, splits.dev, [Candidate(3, ("a",)), Candidate(1, ("b",))],
                  ZOConfig(lr=1e-2, eps=1e-2), RaceConfig(first_steps=2, dev_examples=16, batch_size=8))
    assert len(result.rounds) == 1
    # zero-shot dev loss 1 + the 2 training batches once + the dev batch once; candidate 3 reads layer 1's
    # shared outputs (each candidate alone would run layer 0 for its 2 batches and its dev scoring: 7 in all)
    assert calls[0] == 4
    assert [c.layer for c in result.candidates] == [3, 1]  # the record keeps the proposal order
