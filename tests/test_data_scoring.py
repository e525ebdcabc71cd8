"""Candidate scoring: lm-eval tokenization, kept logits, shared rows, padding, naive reference."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_model
from layerzo.data import scoring
from layerzo.errors import ConfigError, DataRowError
from layerzo.data.spec import Example
from layerzo.data.tasks import load_task


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama", seed=3)


@pytest.fixture(scope="module")
def sst2(data_dir):
    return load_task("sst2", data_dir, num_train=8, num_dev=0, num_test=0, seed=1).train


@pytest.fixture(scope="module")
def copa(data_dir):
    return load_task("copa", data_dir, num_train=6, num_dev=0, num_test=0, seed=1).train


def _naive_scores(model, tokenizer, examples) -> list[list[float]]:
    """One unpadded forward per (example, candidate), full logits, no shortcuts."""
    out = []
    for ex in examples:
        row = []
        for cand in ex.candidates:
            ctx, cont = scoring.encode_pair(tokenizer, ex.context, cand)
            ids = torch.tensor([ctx + cont])
            logp = F.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            positions = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
            row.append(float(sum(logp[p, t] for p, t in zip(positions, cont)) / len(cont)))
        out.append(row)
    return out


def test_encode_pair_matches_lm_eval(tokenizer):
    from lm_eval.api.model import TemplateLM

    fake = types.SimpleNamespace(backend="causal", tok_encode=lambda s, **kw: tokenizer.encode(s))
    for ctx, cont in [("The movie was ", "great"), ("Question: why?\nAnswer:", " because"), ("a  ", " b c")]:
        assert scoring.encode_pair(tokenizer, ctx, cont) == TemplateLM._encode_pair(fake, ctx, cont)


def test_scores_match_naive_per_example_computation(model, tokenizer, sst2, copa):
    for examples in (sst2, copa):
        batch = scoring.encode_batch(tokenizer, examples)
        got = scoring.candidate_scores(model, batch)
        torch.testing.assert_close(got, torch.tensor(_naive_scores(model, tokenizer, examples)), atol=1e-4, rtol=1e-5)


def test_single_token_candidates_share_one_row(tokenizer, sst2, copa):
    assert scoring.encode_batch(tokenizer, sst2).num_rows == len(sst2)
    multi = scoring.encode_batch(tokenizer, copa)
    assert multi.num_rows == sum(len(ex.candidates) for ex in copa)
    assert multi.keep > 1


@pytest.mark.parametrize("task", ["cb", "wic", "rte"])
def test_candidates_that_differ_in_their_last_token_share_one_row_and_score_as_alone(model, tokenizer, data_dir, task):
    """SuperGLUE templates end in a newline that lm-eval moves into every continuation ("\nYes"/"\nNo"): two
    tokens each, the same first one, so one row per example serves all candidates."""
    examples = load_task(task, data_dir, num_train=4, num_dev=0, num_test=0, seed=1).train
    conts = [[scoring.encode_pair(tokenizer, ex.context, c)[1] for c in ex.candidates] for ex in examples]
    assert all(len(c) == 2 for row in conts for c in row)  # really multi-token continuations
    batch = scoring.encode_batch(tokenizer, examples)
    assert batch.num_rows == len(examples) and batch.keep == 2
    torch.testing.assert_close(scoring.candidate_scores(model, batch),
                               torch.tensor(_naive_scores(model, tokenizer, examples)), atol=1e-4, rtol=1e-5)


def test_rows_are_shared_only_when_everything_but_the_last_token_agrees():
    assert scoring.shares_one_row([[5], [7]]) and scoring.shares_one_row([[1, 5], [1, 7], [1, 9]])
    assert not scoring.shares_one_row([[1, 5], [2, 7]])  # different first tokens: different rows
    assert not scoring.shares_one_row([[1, 5], [1, 5, 7]])  # different lengths


def test_logits_to_keep_equals_full_logits(model, tokenizer, copa):
    batch = scoring.encode_batch(tokenizer, copa)
    kept = scoring.candidate_scores(model, batch)
    full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids).logits
    assert full.shape[1] > batch.keep
    torch.testing.assert_close(kept, scoring.scores_from_logits(full[:, -batch.keep :], batch), atol=1e-5, rtol=1e-5)


def test_lm_head_runs_one_2d_matmul(model, tokenizer, copa):
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, o: seen.append(a[0].dim()))
    batch = scoring.encode_batch(tokenizer, copa)
    logits = scoring.kept_logits(model, batch)
    handle.remove()
    assert seen == [2] and logits.shape == (batch.num_rows, batch.keep, model.config.vocab_size)
    assert not model.get_output_embeddings()._forward_pre_hooks  # removed again


def test_padding_does_not_change_scores(model, tokenizer, sst2):
    short = min(sst2, key=lambda ex: len(ex.context))
    alone = scoring.candidate_scores(model, scoring.encode_batch(tokenizer, [short]))
    batch = scoring.encode_batch(tokenizer, list(sst2))
    assert batch.attention_mask[sst2.index(short)].sum() < batch.attention_mask.shape[1]  # really padded
    together = scoring.candidate_scores(model, batch)[sst2.index(short)]
    torch.testing.assert_close(together, alone[0], atol=1e-4, rtol=1e-5)


def test_fewer_candidates_are_padded_with_minus_inf(model, tokenizer):
    examples = [Example("The sky is", (" blue", " green"), 0), Example("Pick one:", (" a", " b", " c"), 2)]
    scores = scoring.candidate_scores(model, scoring.encode_batch(tokenizer, examples))
    assert scores.shape == (2, 3)
    assert scores[0, 2] == float("-inf") and torch.isfinite(scores[1]).all() and torch.isfinite(scores[0, :2]).all()
    loss = scoring.batch_loss(model, scoring.encode_batch(tokenizer, examples))
    assert loss == pytest.approx(float(F.cross_entropy(scores, torch.tensor([0, 2]))), rel=1e-6)


def test_accuracy_agrees_with_predictions(model, tokenizer, sst2):
    preds = scoring.predictions(model, tokenizer, sst2, batch_size=3)
    naive = [max(range(len(r)), key=r.__getitem__) for r in _naive_scores(model, tokenizer, sst2)]
    assert preds == naive
    acc = scoring.accuracy(model, tokenizer, sst2, batch_size=3)
    assert acc == sum(p == ex.label for p, ex in zip(preds, sst2)) / len(sst2)


def test_left_truncation_keeps_the_candidate(model, tokenizer):
    ex = Example("word " * 50 + "end:", (" yes", " no thanks"), 1)
    batch = scoring.encode_batch(tokenizer, [ex], max_length=8)
    assert batch.input_ids.shape[1] <= 8
    assert torch.isfinite(scoring.candidate_scores(model, batch)).all()


def test_bad_inputs(tokenizer):
    with pytest.raises(ConfigError, match="empty"):
        scoring.encode_batch(tokenizer, [])
    with pytest.raises(ConfigError, match="max_length"):
        scoring.encode_batch(tokenizer, [Example("a", (" b",), 0)], max_length=1)
    with pytest.raises(DataRowError, match="no tokens"):
        scoring.encode_batch(tokenizer, [Example("a", (" b", ""), 0, "f.jsonl:3")])
    with pytest.raises(ConfigError, match="batch_size"):
        scoring.accuracy(None, tokenizer, [Example("a", (" b",), 0)], batch_size=0)
