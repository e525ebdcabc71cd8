"""What a tune run iterates over: seeded resumable training batches, dev/test sets, zero-shot cache."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from layerzo.errors import ConfigError
from layerzo.tune.batches import TrainBatches, ZeroShotCache, train_batches


def test_train_batches_are_seeded_epochs():
    a, b = train_batches(10, 4, seed=1), train_batches(10, 4, seed=1)
    first = [next(a) for _ in range(4)]
    assert first == [next(b) for _ in range(4)]
    assert len(set(first[0] + first[1])) == 8 and all(len(x) == 4 for x in first)
    assert next(train_batches(3, 16, seed=0)) and len(next(train_batches(3, 16, seed=0))) == 3


def test_batch_stream_resumes_from_epoch_and_position():
    from layerzo.tune.batches import TrainBatches, train_batches

    live = train_batches(10, 4, seed=1)
    for _ in range(7):  # 3+ epochs of 2 batches: mid-epoch position
        next(live)
    resumed = TrainBatches(10, 4, 1, live.epoch, live.position)
    assert [next(resumed) for _ in range(5)] == [next(live) for _ in range(5)]


def test_every_epoch_is_a_fresh_permutation_of_all_examples():
    stream = train_batches(8, 4, seed=3)
    epochs = [next(stream) + next(stream) for _ in range(3)]
    assert all(sorted(e) == list(range(8)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3  # a new order each epoch
    assert stream.epoch == 3 and stream.position == 8
    assert next(train_batches(8, 4, seed=4)) != epochs[0][:4]  # another seed, another order


@pytest.mark.parametrize("epoch, position", [(1, 11), (1, -1), (0, 4)])
def test_an_impossible_resume_position_is_refused(epoch, position):
    with pytest.raises(ConfigError, match=f"batch position {position} is outside an epoch of 10"):
        TrainBatches(10, 4, seed=1, epoch=epoch, position=position)


def test_eval_set_with_stored_lower_layers_matches_plain_accuracy(tokenizer, data_dir):
    from conftest import make_tiny_model
    from layerzo.model.layers import find_layer_layout, get_layer
    from layerzo.data.scoring import accuracy
    from layerzo.data.tasks import load_task
    from layerzo.tune.batches import EvalSet

    model = make_tiny_model("llama", seed=2)
    layout = find_layer_layout(model)
    examples = load_task("sst2", data_dir, num_train=12, num_dev=0, num_test=0).train
    evalset = EvalSet(tokenizer, examples, batch_size=5, max_length=64)
    assert evalset.evaluate(model, layout, 2)["acc"] == accuracy(model, tokenizer, examples, batch_size=5, max_length=64)
    assert all("out" in s for s in evalset.stores)
    with torch.no_grad():  # change the tuned layer: the stored lower outputs stay valid
        for p in get_layer(model, layout, 2).parameters():
            p.mul_(-3.0)
    assert evalset.evaluate(model, layout, 2)["acc"] == accuracy(model, tokenizer, examples, batch_size=5, max_length=64)


def test_an_empty_eval_set_has_no_accuracy(tokenizer):
    from layerzo.tune.batches import EvalSet

    evalset = EvalSet(tokenizer, [], batch_size=4, max_length=32)
    assert evalset.size == 0 and evalset.batches == []
    assert evalset.evaluate(model=None, layout=None, first_cached=0) is None


def test_zero_shot_cache_computes_once_per_example_set():
    cache, calls = ZeroShotCache(), []

    def compute(value):
        return lambda: calls.append(value) or value

    dev, test = SimpleNamespace(key=("dev", 8, 64)), SimpleNamespace(key=("test", 8, 64))
    assert cache.scores(dev, compute(0.5)) == 0.5
    assert cache.scores(SimpleNamespace(key=("dev", 8, 64)), compute(0.9)) == 0.5  # same key: remembered
    assert cache.scores(test, compute(0.25)) == 0.25
    assert cache.scores(SimpleNamespace(key=("dev", 4, 64)), compute(None)) is None  # other batching: computed
    assert cache.scores(SimpleNamespace(key=("dev", 4, 64)), compute(0.75)) is None  # a None result is cached too
    assert calls == [0.5, 0.25, None]


def test_visited_examples_are_the_draws_of_the_run_and_all_after_an_epoch():
    from layerzo.tune.batches import visited_examples

    stream = TrainBatches(20, 4, 3)
    draws = sorted({i for _ in range(3) for i in next(stream)})
    assert visited_examples(20, 4, 3, steps=3) == draws and len(draws) == 12  # less than an epoch
    assert visited_examples(20, 4, 3, steps=6) == list(range(20))  # an epoch and more: everything


def test_a_generative_set_keeps_its_prefill_and_scores_the_same_without_running_the_lower_layers(tokenizer, data_dir):
    from conftest import make_tiny_model
    from layerzo.data.generation import Generator
    from layerzo.model.layers import find_layer_layout, get_layer
    from layerzo.data.tasks import load_task
    from layerzo.tune.batches import GenerativeEvalSet

    model = make_tiny_model("gpt_neox", seed=2)  # NeoX: prompt-dependent answers from a random model
    layout = find_layer_layout(model)
    examples = load_task("squad", data_dir, num_train=4, num_dev=0, num_test=6).test
    generator = Generator(tokenizer, stop=("\n",), max_new_tokens=4)
    kept = GenerativeEvalSet(tokenizer, examples, batch_size=4, max_length=256, generator=generator, max_bytes=10**9)
    plain = GenerativeEvalSet(tokenizer, examples, batch_size=4, max_length=256, generator=generator)
    calls = []
    get_layer(model, layout, 0).register_forward_hook(lambda m, a, o: calls.append(a[0].shape[1]))
    first = kept.evaluate(model, layout, 2)
    assert first == plain.evaluate(model, layout, 2)
    assert kept.bytes > 0 and all("kv" in s for s in kept.stores)
    prompt_widths = {b.input_ids.shape[1] for b in kept.batches}
    calls.clear()
    again = kept.evaluate(model, layout, 2)
    assert again == first
    assert not prompt_widths & set(calls)  # layer 0 ran on new tokens only: the prompts' prefill was replayed
    for batch, store in zip(kept.batches, kept.stores):  # the texts themselves, not only their scores
        assert generator.generate(model, batch, layout=layout, first=2, store=store) == generator.generate(model, batch)
    small = GenerativeEvalSet(tokenizer, examples, batch_size=4, max_length=256, generator=generator, max_bytes=1)
    assert small.evaluate(model, layout, 2) == first and small.bytes == 0 and small.stores == [None, None]
