"""What a tune run iterates over: seeded, resumable training batches and tokenized dev/test sets."""

from __future__ import annotations

from typing import Iterator

import torch

from layerzo.errors import ConfigError
from layerzo.model.prefix_cache import SharedLowerOutputs, cached_lower_layers, prefill_bytes
from layerzo.data.generation import Generator, batch_scores, encode_prompts
from layerzo.data.scoring import candidate_scores, encode_batch


class TrainBatches(Iterator[list[int]]):
    """Endless stream of example-index batches: a fresh seeded permutation per epoch.

    Resumable from two ints: ``epoch`` (permutations drawn so far: epoch e's
    order is the e-th ``randperm`` of a generator seeded with ``seed``) and
    ``position`` (next index into the current order).
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int = 0, position: int = 0) -> None:
        self.n, self.size, self.seed = n, min(batch_size, n), seed
        self._gen = torch.Generator().manual_seed(seed)
        self.order: list[int] = []
        for _ in range(epoch):
            self.order = torch.randperm(n, generator=self._gen).tolist()
        if not (0 <= position <= n) or (epoch == 0 and position):
            raise ConfigError(f"batch position {position} is outside an epoch of {n} examples")
        self.epoch, self.position = epoch, position

    def __next__(self) -> list[int]:
        if self.epoch == 0 or self.position + self.size > self.n:
            self.order = torch.randperm(self.n, generator=self._gen).tolist()
            self.epoch, self.position = self.epoch + 1, 0
        batch = self.order[self.position : self.position + self.size]
        self.position += self.size
        return batch


def train_batches(n: int, batch_size: int, seed: int) -> TrainBatches:
    """Endless stream of example-index batches: a fresh seeded permutation per epoch."""
    return TrainBatches(n, batch_size, seed)


def visited_examples(n: int, batch_size: int, seed: int, steps: int) -> list[int]:
    """The example indices a run of ``steps`` steps draws (sorted): all ``n`` once it passes an epoch.

    A run shorter than an epoch never sees the rest, so the per-example cache
    need not compute them (SQuAD: 150 steps × 8 of 1000 examples).
    """
    stream, seen = TrainBatches(n, batch_size, seed), set()
    for _ in range(steps):
        seen.update(next(stream))
        if len(seen) == n:
            break
    return sorted(seen)


class EvalSet:
    """A fixed dev/test set, tokenized once into length-sorted batches.

    Its lower-layer outputs (below the first tuned layer) never change during
    a run, so they are captured on the first evaluation and replayed after:
    a dev evaluation then costs only the layers from the tuned one upwards.
    Batching equals :func:`layerzo.data.scoring.predictions`, so results are identical.
    """

    metric = "acc"

    def __init__(self, tokenizer, examples, *, batch_size: int, max_length: int) -> None:
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].context))
        chunks = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
        self.size = len(examples)
        self.key = (tuple(examples), batch_size, max_length)  # what its accuracy depends on besides the model
        self.batches = [encode_batch(tokenizer, [examples[i] for i in c], max_length=max_length) for c in chunks]
        self.stores: list[dict] = [{} for _ in self.batches]

    def evaluate(self, model, layout, first_cached: int, shared: SharedLowerOutputs | None = None) -> dict | None:
        """``{"acc": accuracy}`` (None for an empty set)."""
        if not self.size:
            return None
        correct = 0
        for batch, store in zip(self.batches, self.stores):
            with cached_lower_layers(model, layout, first_cached, store, batch=batch, shared=shared):
                scores = candidate_scores(model, batch)
            correct += int((scores.argmax(-1).cpu() == batch.labels).sum())
        return {"acc": correct / self.size}


class GenerativeEvalSet:
    """A fixed dev/test set of generative examples: greedy answers scored by SQuAD F1 and exact match.

    Prompts are tokenized once into length-sorted batches (left-truncated to
    ``max_length - max_new_tokens``; :attr:`truncated` counts the cut ones).
    The first evaluation keeps, per batch, the frozen lower layers' prefill (their
    output and KV-cache entries for the prompts) while it fits ``max_bytes``;
    later evaluations replay it and run only the tuned layer upwards on the
    prompts (~17 KB per prompt token per lower layer on the demo model, so the
    budget decides; over it, the rest of the batches prefill in full).
    """

    metric = "f1"

    def __init__(self, tokenizer, examples, *, batch_size: int, max_length: int, generator: Generator,
                 max_bytes: int = 0) -> None:
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].context))
        chunks = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
        self.size, self.generator, self.max_bytes, self.bytes = len(examples), generator, max_bytes, 0
        self.key = (tuple(examples), batch_size, max_length, generator.stop, generator.max_new_tokens)
        self.batches = [encode_prompts(tokenizer, [examples[i] for i in c], max_length=max_length,
                                       max_new_tokens=generator.max_new_tokens) for c in chunks]
        self.stores: list[dict | None] = [{} for _ in self.batches]
        self.truncated = sum(b.truncated for b in self.batches)

    def evaluate(self, model, layout, first_cached: int, shared: SharedLowerOutputs | None = None) -> dict | None:
        """``{"f1": mean F1, "em": mean exact match}`` over the set (None for an empty set)."""
        if not self.size:
            return None
        totals = {"f1": 0.0, "em": 0.0}
        for i, batch in enumerate(self.batches):
            store = self.stores[i] if self.max_bytes > 0 and first_cached > 0 else None
            texts = self.generator.generate(model, batch, layout=layout, first=first_cached, store=store)
            if store is not None and "counted" not in store:
                store["counted"] = True
                size = prefill_bytes(store)
                if self.bytes + size > self.max_bytes:  # over budget: forget this batch's prefill, keep the earlier
                    self.stores[i] = None
                else:
                    self.bytes += size
            for k in totals:
                totals[k] += batch_scores(texts, batch)[k] * batch.num_rows
        return {k: v / self.size for k, v in totals.items()}


class ZeroShotCache:
    """Zero-shot accuracies, shared by tune runs that all start from ONE unchanged base model (a layer sweep).

    Every run measures the base model's dev/test accuracy before its first
    step: in a 31-run sweep that is the same number 31 times and, on a CPU, as
    costly as the training. The caller guarantees the model is the same base at
    the start of each run (the sweep restores and sha-checks every layer), so an
    accuracy for the same examples and batching is exact.
    """

    def __init__(self) -> None:
        self.entries: dict = {}

    def scores(self, eval_set, compute) -> dict | None:
        """The cached scores of ``eval_set`` (an :class:`EvalSet`), or ``compute()``'s, remembered."""
        if eval_set.key not in self.entries:
            self.entries[eval_set.key] = compute()
        return self.entries[eval_set.key]
