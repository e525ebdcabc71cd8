"""Objectives: choice, ce, and the non-differentiable accuracy / f1 / em that only ZO can follow."""

import random

import pytest
import torch

from conftest import make_tiny_model
from layerzo.data.generation import Generator
from layerzo.data.metrics import normalize_answer
from layerzo.data.objectives import Objective, resolve_objective, target_example
from layerzo.data.scoring import batch_loss, candidate_scores, encode_batch, kept_logits
from layerzo.data.spec import Example
from layerzo.errors import ConfigError
from layerzo.model.layers import find_layer_layout, get_layers, layer_parameter_names
from layerzo.zo.engine import TunedParams, ZOConfig, ZOState, zo_step

CHOICE = [Example("The movie was awful. It was", (" terrible", " great"), 0, "s:1"),
          Example("A joy to watch. It was", (" terrible", " great"), 1, "s:2")]
GEN = [Example("Question: colour of the sky?\nAnswer:", (" blue sky\n",), 0, "q:1", ("blue sky", "blue")),
       Example("Question: two plus two?\nAnswer:", (" four\n",), 0, "q:2", ("four", "4"))]


def test_resolve_objective_defaults_and_refusals():
    assert resolve_objective("auto", generative=False, task="sst2") == "choice"
    assert resolve_objective("auto", generative=True, task="squad") == "ce"
    assert resolve_objective("f1", generative=True, task="squad") == "f1"
    assert resolve_objective("ce", generative=False, task="sst2") == "ce"
    with pytest.raises(ConfigError, match="--objective choice does not fit task 'squad', which is generative"):
        resolve_objective("choice", generative=True, task="squad")
    with pytest.raises(ConfigError, match="--objective f1 does not fit task 'sst2', which is multiple-choice"):
        resolve_objective("f1", generative=False, task="sst2")
    with pytest.raises(ConfigError, match="objective must be one of"):
        resolve_objective("bleu", generative=True, task="squad")


def test_ce_is_the_teacher_forced_token_mean_transformers_computes(tokenizer):
    """Two examples, one batch: mean over ALL target tokens, equal to HF's labels loss on the unpadded rows."""
    model = make_tiny_model("llama", num_layers=2, seed=1)
    objective = Objective("ce", tokenizer, max_length=64)
    ours = objective.loss(model, objective.encode(GEN))
    total, count = 0.0, 0
    for ex in GEN:
        ctx = tokenizer.encode(ex.context)
        full = tokenizer.encode(ex.context + ex.candidates[0])
        labels = torch.tensor([[-100] * len(ctx) + full[len(ctx):]])
        n = len(full) - len(ctx)
        total += float(model(input_ids=torch.tensor([full]), labels=labels).loss) * n
        count += n
    assert ours == pytest.approx(total / count, rel=1e-5)


def test_ce_on_a_choice_task_scores_the_correct_candidate_only(tokenizer):
    model = make_tiny_model("llama", num_layers=2, seed=1)
    objective = Objective("ce", tokenizer, max_length=64)
    assert target_example(CHOICE[1]).candidates == (" great",)
    batch = objective.encode(CHOICE)
    assert batch.num_candidates == 1 and batch.labels.tolist() == [0, 0]
    assert objective.loss(model, batch) > 0


def test_choice_and_accuracy_objectives_read_the_candidate_scores(tokenizer):
    model = make_tiny_model("llama", num_layers=2, seed=2)
    batch = encode_batch(tokenizer, CHOICE, max_length=64)
    assert Objective("choice", tokenizer, max_length=64).loss(model, batch) == batch_loss(model, batch)
    right = (candidate_scores(model, batch).argmax(-1) == batch.labels).float().mean()
    assert Objective("accuracy", tokenizer, max_length=64).loss(model, batch) == -float(right)


def test_example_losses_are_each_examples_own_loss_and_weight_back_to_the_batch_loss(tokenizer):
    """Per-example losses (the race's paired gain reads them): each is the loss of its example scored alone;
    choice and accuracy average back to the batch loss, ce back to it when weighted by target tokens."""
    model = make_tiny_model("llama", num_layers=2, seed=2)
    for name, examples in (("choice", CHOICE), ("accuracy", CHOICE), ("ce", GEN)):
        objective = Objective(name, tokenizer, max_length=64)
        batch = objective.encode(examples)
        per = objective.example_losses_of_logits(kept_logits(model, batch), batch)
        alone = [objective.loss(model, objective.encode([ex])) for ex in examples]
        assert per == pytest.approx(alone, rel=1e-5) and len(set(per)) == 2, name
        weights = ([len(tokenizer.encode(ex.context + ex.candidates[0])) - len(tokenizer.encode(ex.context))
                    for ex in examples] if name == "ce" else [1, 1])
        assert sum(w * v for w, v in zip(weights, per)) / sum(weights) == pytest.approx(
            objective.loss(model, batch), rel=1e-5), name


def test_generating_objectives_need_a_generator(tokenizer):
    with pytest.raises(ConfigError, match="needs a Generator"):
        Objective("f1", tokenizer, max_length=64)


def test_step_loss_runs_the_lower_layers_once_per_step(tokenizer):
    model = make_tiny_model("llama", num_layers=4, seed=3)
    layout = find_layer_layout(model)
    calls = []
    handle = get_layers(model, layout)[0].register_forward_hook(lambda *a: calls.append(1))
    for name, generator in (("ce", None), ("f1", Generator(tokenizer, stop=("\n",), max_new_tokens=3))):
        objective = Objective(name, tokenizer, max_length=64, generator=generator)
        batch = objective.encode(GEN)
        plain = objective.loss(model, batch)
        calls.clear()
        with objective.step_loss(model, layout, 2, batch) as loss:
            values = [loss() for _ in range(4)]
        assert values == [plain] * 4
        # ce: one forward of layer 0 in all; f1: one prefill, then every decode step runs it (new tokens)
        decode_steps = 0 if name == "ce" else 4 * 2  # 3 new tokens = 2 decode forwards per generation
        assert len(calls) <= 1 + decode_steps
    handle.remove()


def f1_task(tokenizer, model, n=16):
    """Prompts whose gold answer is a word the tiny model ranks high but never says first: F1 starts at 0."""
    rng = random.Random(0)
    words = "apple river stone cloud music garden silver window forest candle bridge ocean paper tiger winter yellow".split()
    prompts = [" ".join(rng.choice(words) for _ in range(6)) + " :" for _ in range(n)]
    logits = [model(torch.tensor([tokenizer.encode(p)])).logits[0, -1] for p in prompts]
    firsts = {int(x.argmax()) for x in logits}
    order = sum(logits).argsort(descending=True).tolist()
    gold = next(t for t in order if t not in firsts and tokenizer.decode([t]).strip().isalpha()
                and len(normalize_answer(tokenizer.decode([t]))) > 2)
    return [Example(p, (" x",), 0, f"p:{i}", (tokenizer.decode([gold]),)) for i, p in enumerate(prompts)]


@pytest.mark.parametrize("sign", [1, -1])
def test_zo_on_f1_raises_the_training_f1_and_a_flipped_update_does_not(tokenizer, sign):
    """MeZO's --non_diff on a tiny model: fixed seed, 30 steps. With the update's sign flipped
    (the engine ascending the loss), the F1 stays at zero: the test can tell the two apart."""
    model = make_tiny_model("llama", num_layers=2, seed=0)
    layout = find_layer_layout(model)
    objective = Objective("f1", tokenizer, max_length=64, generator=Generator(tokenizer, max_new_tokens=1))
    batch = objective.encode(f1_task(tokenizer, model))
    params = TunedParams.from_model(model, layer_parameter_names(model, layout, 1))
    state, config = ZOState(), ZOConfig(lr=5e-3, eps=5e-2)
    start, history = -objective.loss(model, batch), []
    for step in range(30):
        with objective.step_loss(model, layout, 1, batch) as loss:
            zo_step(params, loss if sign > 0 else (lambda: -loss()), step, config, state, total_steps=30)
        history.append(-objective.loss(model, batch))
    late = sum(history[-10:]) / 10
    assert start == 0.0
    if sign > 0:
        assert late >= 0.3, history
    else:
        assert late <= 0.1, history


def test_profiles_and_races_use_the_teacher_forced_ce_in_place_of_f1_and_em(tokenizer):
    from layerzo.data.objectives import teacher_forced

    assert [teacher_forced(n) for n in ("f1", "em", "ce", "choice", "accuracy")] == ["ce", "ce", "ce", "choice",
                                                                                       "accuracy"]
    f1 = Objective("f1", tokenizer, max_length=64, generator=Generator(tokenizer, max_new_tokens=2))
    ce = f1.teacher_forced()
    assert ce.name == "ce" and ce.max_length == 64 and not ce.generates
    choice = Objective("choice", tokenizer, max_length=64)
    assert choice.teacher_forced() is choice
