"""Frozen lower layers shared ACROSS runs (a layerzo.model.prefix_cache.SharedLowerOutputs), as a sweep uses them."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from conftest import make_tiny_model
from layerzo.model.layers import find_layer_layout, get_layer
from layerzo.model.prefix_cache import SharedLowerOutputs, cached_lower_layers


def _batch(seed: int) -> SimpleNamespace:
    ids = torch.randint(0, 1000, (3, 10), generator=torch.Generator().manual_seed(seed))
    return SimpleNamespace(input_ids=ids, attention_mask=torch.ones_like(ids))


def _counting(model, layout, n):
    calls = [0] * n
    for i in range(n):
        get_layer(model, layout, i).register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def test_a_deeper_run_starts_from_the_shallower_runs_output_and_matches_the_plain_forward():
    model = make_tiny_model("llama").eval()
    layout = find_layer_layout(model)
    a, b = _batch(0), _batch(1)
    with torch.no_grad():
        plain = {k: model(input_ids=x.input_ids).logits for k, x in (("a", a), ("b", b))}
        calls = _counting(model, layout, 4)
        shared = SharedLowerOutputs()
        for first in (1, 3):  # run "layer 1", then run "layer 3", each with two forwards per batch
            for key, x in (("a", a), ("b", b)):
                with cached_lower_layers(model, layout, first, batch=x, shared=shared):
                    for _ in range(2):
                        assert torch.equal(model(input_ids=x.input_ids).logits, plain[key])
        assert shared.bytes > 0
    # layer 0 ran once per batch (run 1) and never again: run 3 started from its kept output and ran layers
    # 1-2 once per batch (2 more each on top of run 1's 4 forwards); without sharing layer 0 would show 4
    assert calls == [2, 6, 6, 8]
    assert not any(type(get_layer(model, layout, i)).__name__ == "_Replay" for i in range(4))


def test_a_run_below_the_cached_level_and_a_full_cache_fall_back_to_the_plain_path():
    model = make_tiny_model("llama").eval()
    layout = find_layer_layout(model)
    x = _batch(2)
    with torch.no_grad():
        plain = model(input_ids=x.input_ids).logits
        calls = _counting(model, layout, 4)
        shared = SharedLowerOutputs()
        for first in (3, 1):  # the level-3 entry cannot serve a run that tunes layer 1
            with cached_lower_layers(model, layout, first, batch=x, shared=shared):
                assert torch.equal(model(input_ids=x.input_ids).logits, plain)
        assert calls == [2, 2, 2, 2]
        for max_bytes, expected in ((2**30, [1, 2, 2, 2]), (0, [2, 2, 2, 2])):  # kept / nothing fits: recomputed
            calls[:] = [0] * 4
            shared = SharedLowerOutputs(max_bytes=max_bytes)
            for first in (1, 2):
                with cached_lower_layers(model, layout, first, batch=x, shared=shared):
                    assert torch.equal(model(input_ids=x.input_ids).logits, plain)
            assert (shared.bytes > 0) == (max_bytes > 0)
            assert calls == expected
        calls[:] = [0] * 4
        with cached_lower_layers(model, layout, 2, batch=x):  # no shared store: nothing is kept
            model(input_ids=x.input_ids)
        with cached_lower_layers(model, layout, 2, batch=x):
            model(input_ids=x.input_ids)
        assert calls == [2, 2, 2, 2]


# ----------------------------------------------------------------------------- across a run
def test_the_example_cache_rebuilds_any_batch_from_rows_filled_in_other_batches(tokenizer, data_dir):
    """Rows are filled in length-sorted chunks and re-padded into the step's own batches: layer 2's input
    and the logits equal the batch's plain forward within fp32 rounding."""
    from layerzo.data.scoring import encode_batch, kept_logits
    from layerzo.data.tasks import load_task
    from layerzo.model.prefix_cache import ExampleCache, replayed_lower_output

    model = make_tiny_model("llama", seed=4)
    layout = find_layer_layout(model)
    examples = load_task("copa", data_dir, num_train=12, num_dev=0, num_test=0).train  # two rows per example
    cache = ExampleCache(max_bytes=10**9)
    fill = [encode_batch(tokenizer, examples[i:i + 5], max_length=96) for i in range(0, 12, 5)]
    with torch.no_grad():
        assert cache.fill(model, layout, 2, fill, lambda b: kept_logits(model, b))
        assert len(cache.rows) == sum(b.num_rows for b in fill) == 24 and cache.bytes == sum(r.numel() * 4 for r in cache.rows.values())
        step = encode_batch(tokenizer, [examples[i] for i in (11, 0, 6, 3)], max_length=96)
        assembled = cache.assemble(step)
        captured = {}
        handle = get_layer(model, layout, 1).register_forward_hook(lambda m, a, out: captured.setdefault("out", out))
        plain = kept_logits(model, step)
        handle.remove()
        mask = step.attention_mask.bool()
        assert torch.allclose(assembled[mask], captured["out"][mask], rtol=1e-5, atol=1e-6)
        with replayed_lower_output(model, layout, 2, assembled):
            cached = kept_logits(model, step)
        assert torch.allclose(cached, plain, rtol=1e-5, atol=1e-5)
    assert cache.stats()["hit_rate"] == 1.0
    unseen = encode_batch(tokenizer, load_task("copa", data_dir, num_train=20, num_dev=0, num_test=0).train[12:14],
                          max_length=96)
    assert cache.assemble(unseen) is None and cache.stats()["hit_rate"] == 0.5  # a miss: recompute


def test_the_example_cache_gives_up_over_its_budget_and_keeps_nothing(tokenizer, data_dir):
    from layerzo.data.scoring import encode_batch, kept_logits
    from layerzo.data.tasks import load_task
    from layerzo.model.prefix_cache import ExampleCache

    model = make_tiny_model("llama", seed=4)
    layout = find_layer_layout(model)
    batch = encode_batch(tokenizer, load_task("sst2", data_dir, num_train=4, num_dev=0, num_test=0).train)
    cache = ExampleCache(max_bytes=100)
    with torch.no_grad():
        assert not cache.fill(model, layout, 2, [batch], lambda b: kept_logits(model, b))
    assert cache.gave_up and cache.rows == {} and cache.bytes == 0 and cache.assemble(batch) is None
