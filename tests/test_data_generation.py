"""Greedy generation: KV cache, stop strings, truncation, and the shared frozen prefix of a ZO step."""

import pytest
import torch

from conftest import TINY_ARCHS, make_tiny_model
from layerzo.data.generation import Generator, batch_scores, encode_prompts, prompt_budget, stop_token_ids
from layerzo.data.spec import Example
from layerzo.errors import ConfigError
from layerzo.model.layers import find_layer_layout, get_layer
from layerzo.zo.engine import TunedParams, perturbed

EXAMPLES = [Example("Title: A\nContext: the cat sat on the mat\nQuestion: where?\nAnswer:", (" mat\n",), 0, "a", ("mat",)),
            Example("Question: who?\nAnswer:", (" Bob\n",), 0, "b", ("Bob", "Bobby")),
            Example("Passage: one two three four five six\nQuestion: count?\nAnswer:", (" six\n",), 0, "c", ("6",))]


@pytest.fixture(scope="module")
def generator(tokenizer):
    return Generator(tokenizer, stop=("\n",), max_new_tokens=6)


def test_stop_ids_hold_eos_and_every_newline_token(tokenizer):
    ids = stop_token_ids(tokenizer, ("\n",))
    assert tokenizer.eos_token_id in ids
    assert tokenizer.encode("\n")[-1] in ids and tokenizer.encode("\n\n")[-1] in ids
    assert tokenizer.encode(" mat")[-1] not in ids
    assert stop_token_ids(tokenizer, ()) == {tokenizer.eos_token_id}


def test_prompts_are_left_padded_and_truncated_from_the_left_and_counted(tokenizer):
    batch = encode_prompts(tokenizer, EXAMPLES, max_length=14, max_new_tokens=4)
    assert batch.input_ids.shape[1] == 10 == prompt_budget(14, 4)
    full = [tokenizer.encode(ex.context) for ex in EXAMPLES]
    assert batch.truncated == sum(len(ids) > 10 for ids in full) >= 2
    for row, ids in enumerate(full):
        kept = ids[-10:]
        assert batch.input_ids[row, -len(kept):].tolist() == kept  # the END of the prompt survives
        assert int(batch.attention_mask[row].sum()) == len(kept)
    with pytest.raises(ConfigError, match="must exceed max_new_tokens"):
        encode_prompts(tokenizer, EXAMPLES, max_length=4, max_new_tokens=4)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_generation_equals_transformers_greedy_generate_row_by_row(arch, tokenizer, generator):
    model = make_tiny_model(arch, num_layers=3, seed=3)
    batch = encode_prompts(tokenizer, EXAMPLES, max_length=128, max_new_tokens=6)
    ours = generator.generate_ids(model, batch)
    for ex, got in zip(EXAMPLES, ours):
        ids = torch.tensor([tokenizer.encode(ex.context)])
        ref = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        assert got == ref[0, ids.shape[1]:].tolist()[:len(got)]  # same tokens (padding did not change them)
        assert len(got) == 6 or got[-1] in generator.stop_ids.tolist()


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_shared_prefix_gives_the_plain_generations_under_perturbation(arch, tokenizer, generator):
    """The + and − generations of a ZO step share layers < first: same tokens as computing everything."""
    model = make_tiny_model(arch, num_layers=4, seed=5)
    layout = find_layer_layout(model)
    names = [n for n, _ in get_layer(model, layout, 2).named_parameters()]
    prefix = f"{layout.path}.2."
    params = TunedParams.from_model(model, [prefix + n for n in names])
    batch = encode_prompts(tokenizer, EXAMPLES, max_length=128, max_new_tokens=6)
    store: dict = {}
    for sign in (1.0, -1.0, 1.0):
        with perturbed(params, 11, sign * 0.5):
            shared = generator.generate_ids(model, batch, layout=layout, first=2, store=store)
            plain = generator.generate_ids(model, batch)
        assert shared == plain
    assert "kv" in store and len(store["kv"]) == 2
    with perturbed(params, 11, 0.5):
        plus = generator.generate_ids(model, batch)
    with perturbed(params, 11, -0.5):
        minus = generator.generate_ids(model, batch)
    assert plus != minus  # the perturbation is large enough to change answers: the test can tell


def test_text_is_cut_at_the_stop_and_scored_against_every_gold(tokenizer, generator):
    ids = tokenizer.encode(" Bobby\nmore text")
    assert generator.text(ids) == " Bobby"
    batch = encode_prompts(tokenizer, EXAMPLES[:2], max_length=64, max_new_tokens=6)
    scores = batch_scores([" the mat", " Bob"], batch)
    assert scores == {"f1": 1.0, "em": 1.0}
    assert batch_scores([" cat", " Bobby!"], batch) == {"f1": 0.5, "em": 0.5}


def test_bad_generator_settings_are_one_line(tokenizer):
    with pytest.raises(ConfigError, match="max_new_tokens must be an integer"):
        Generator(tokenizer, max_new_tokens=0)


def test_generation_also_stops_at_the_models_own_end_tokens(tokenizer, generator):
    """generation_config.eos_token_id (Llama-3-Instruct's <|eot_id|>) ends an answer, as it does in lm-eval."""
    model = make_tiny_model("llama", num_layers=2, seed=3)
    batch = encode_prompts(tokenizer, EXAMPLES[:1], max_length=64, max_new_tokens=6)
    free = generator.generate_ids(model, batch)[0]
    assert len(free) == 6 and free[0] not in generator.stop_ids.tolist()
    model.generation_config.eos_token_id = [free[0], 7]
    assert generator.generate_ids(model, batch)[0] == free[:1]
