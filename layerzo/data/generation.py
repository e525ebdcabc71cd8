"""Greedy generation for generative tasks: KV cache, stop strings, bounded new tokens, shared frozen prefix.

MeZO and the SQuAD evaluation decode greedily and stop at the first newline;
lm-evaluation-harness' ``generate_until`` does the same with ``until: ["\\n"]``.
:class:`Generator` decodes a left-padded batch of prompts with the model's KV
cache: one prefill forward, then one single-token forward per new token, at
most ``max_new_tokens``, until every row has produced a stop (a token whose text
contains a stop string, or EOS). The decoded text is cut at the first stop
string, as lm-eval cuts it.

Prompts are encoded as lm-eval encodes a ``generate_until`` context
(``tokenizer.encode(prompt)``, as-is) and left-truncated to
``max_length - max_new_tokens`` tokens (lm-eval's ``max_length - max_gen_toks``);
:attr:`PromptBatch.truncated` counts the prompts that were cut.

Shared prefix: with ``store`` (one dict per batch) and ``first`` (the lowest
tuned layer), layers below ``first`` run on the prompts once per store: the
+ and − generations of a ZO step share them
(:func:`layerzo.model.prefix_cache.replayed_prefill`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from layerzo.data.metrics import best_exact_match, best_f1
from layerzo.data.scoring import accepts_argument, left_padded
from layerzo.errors import ConfigError, DataRowError
from layerzo.model.layers import LayerLayout
from layerzo.model.prefix_cache import replayed_prefill, save_prefill, shares_prefill

DEFAULT_MAX_NEW_TOKENS = 50  # MeZO's SQuAD/DROP generation length


@dataclass(frozen=True)
class PromptBatch:
    """Left-padded prompts ``[R, T]`` and each row's gold answers."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    answers: tuple[tuple[str, ...], ...]
    truncated: int  # prompts cut from the left to fit max_length - max_new_tokens

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.shape[0])


def prompt_budget(max_length: int, max_new_tokens: int) -> int:
    """Tokens a prompt may keep: the rest of ``max_length`` is for the generation."""
    budget = max_length - max_new_tokens
    if budget < 1:
        raise ConfigError(f"max_length ({max_length}) must exceed max_new_tokens ({max_new_tokens}) "
                          "to leave room for the prompt")
    return budget


def encode_prompts(tokenizer, examples: Sequence, *, max_length: int, max_new_tokens: int) -> PromptBatch:
    """Tokenize the prompts (``Example.context``) of generative examples into one left-padded batch."""
    if not examples:
        raise ConfigError("cannot generate for an empty list of examples")
    budget = prompt_budget(max_length, max_new_tokens)
    rows, truncated = [], 0
    for i, ex in enumerate(examples):
        ids = tokenizer.encode(ex.context)
        if not ids:
            raise DataRowError(f"example {ex.source or i}: the prompt encodes to no tokens")
        truncated += len(ids) > budget
        rows.append(ids[-budget:])
    input_ids, attention_mask, position_ids = left_padded(tokenizer, rows)
    return PromptBatch(input_ids, attention_mask, position_ids, tuple(ex.answers for ex in examples), truncated)


class Generator:
    """Greedy decoding with a KV cache for one tokenizer, stop strings and a new-token bound."""

    def __init__(self, tokenizer, *, stop: Sequence[str] = (), max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> None:
        if type(max_new_tokens) is not int or max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be an integer ≥ 1, got {max_new_tokens!r}")
        self.tokenizer, self.stop, self.max_new_tokens = tokenizer, tuple(s for s in stop if s), max_new_tokens
        self.stop_ids = torch.tensor(sorted(stop_token_ids(tokenizer, self.stop)), dtype=torch.long)

    @torch.no_grad()
    def generate_ids(self, model, batch: PromptBatch, *, layout: LayerLayout | None = None, first: int = 0,
                     store: dict | None = None, on_token: Callable[[list[int]], None] | None = None) -> list[list[int]]:
        """The new tokens of every row, up to and including its stop token.

        ``on_token`` receives each step's new token per row (streaming);
        ``store``/``layout``/``first`` share the frozen prefix between calls.
        """
        from transformers import DynamicCache  # a transformers type: imported where generation needs it

        device = next(model.parameters()).device
        mask, pos = batch.attention_mask.to(device), batch.position_ids.to(device)
        cache = DynamicCache(config=model.config)
        share = store is not None and layout is not None and shares_prefill(cache, first)
        keep = {"logits_to_keep": 1} if accepts_argument(model, "logits_to_keep") else {}
        with replayed_prefill(model, layout, first, store) if share else contextlib.nullcontext():
            out = model(input_ids=batch.input_ids.to(device), attention_mask=mask, position_ids=pos, cache=cache,
                        use_cache=True, **keep)
        if share:
            save_prefill(store, out.cache, first)
        tokens: list[list[int]] = [[] for _ in range(batch.num_rows)]
        finished = torch.zeros(batch.num_rows, dtype=torch.bool, device=device)
        stop_ids, last = torch.cat([self.stop_ids, model_eos_ids(model)]).to(device), pos[:, -1:]
        for t in range(self.max_new_tokens):
            nxt = out.logits[:, -1].argmax(-1)
            for r, tok in enumerate(nxt.tolist()):
                if not finished[r]:
                    tokens[r].append(tok)
            if on_token is not None:
                on_token(nxt.tolist())
            finished |= torch.isin(nxt, stop_ids)
            if bool(finished.all()) or t + 1 == self.max_new_tokens:
                break
            mask = torch.cat([mask, mask.new_ones((batch.num_rows, 1))], dim=1)
            last = last + 1
            out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last, cache=out.cache,
                        use_cache=True, **keep)
        return tokens

    def text(self, ids: Sequence[int]) -> str:
        """The decoded answer: special tokens dropped, cut at the first stop string (lm-eval's ``until``)."""
        text = self.tokenizer.decode(list(ids), skip_special_tokens=True)
        for s in self.stop:
            text = text.split(s)[0]
        return text

    def generate(self, model, batch: PromptBatch, **kwargs) -> list[str]:
        return [self.text(ids) for ids in self.generate_ids(model, batch, **kwargs)]


def stop_token_ids(tokenizer, stop: Sequence[str]) -> set[int]:
    """EOS plus every vocabulary token whose text contains a stop string (BPE merges "\\n" into many tokens)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    if stop:
        size = len(tokenizer)
        texts = tokenizer.batch_decode([[i] for i in range(size)], skip_special_tokens=False)
        ids |= {i for i, t in enumerate(texts) if any(s in t for s in stop)}
    if not ids:
        raise ConfigError("generation needs a stop: the tokenizer has no EOS token and no stop string was given")
    return ids


def model_eos_ids(model) -> torch.Tensor:
    """The model's own end tokens (``generation_config.eos_token_id``: Llama-3-Instruct ends a turn with
    <|eot_id|>, not the tokenizer's EOS); lm-eval stops at them too."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    return torch.tensor([i for i in ids if isinstance(i, int)], dtype=torch.long)


def batch_scores(texts: Sequence[str], batch: PromptBatch) -> dict[str, float]:
    """Mean SQuAD F1 and exact match of ``texts`` against the batch's gold answers (max over golds)."""
    f1s = [best_f1(t, golds) for t, golds in zip(texts, batch.answers)]
    ems = [best_exact_match(t, golds) for t, golds in zip(texts, batch.answers)]
    return {"f1": sum(f1s) / len(f1s), "em": sum(ems) / len(ems)}
