"""What a tune run iterates over: seeded, resumable training batches and tokenized dev/test sets."""

from __future__ import annotations

from typing import Iterator

import torch

from layerzo.errors import ConfigError
from layerzo.model.prefix_cache import SharedLowerOutputs, cached_lower_layers
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


class EvalSet:
    """A fixed dev/test set, tokenized once into length-sorted batches.

    Its lower-layer outputs (below the first tuned layer) never change during
    a run, so they are captured on the first evaluation and replayed after:
    a dev evaluation then costs only the layers from the tuned one upwards.
    Batching equals :func:`layerzo.data.scoring.predictions`, so results are identical.
    """

    def __init__(self, tokenizer, examples, *, batch_size: int, max_length: int) -> None:
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].context))
        chunks = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
        self.size = len(examples)
        self.key = (tuple(examples), batch_size, max_length)  # what its accuracy depends on besides the model
        self.batches = [encode_batch(tokenizer, [examples[i] for i in c], max_length=max_length) for c in chunks]
        self.stores: list[dict] = [{} for _ in self.batches]

    def accuracy(self, model, layout, first_cached: int, shared: SharedLowerOutputs | None = None) -> float | None:
        if not self.size:
            return None
        correct = 0
        for batch, store in zip(self.batches, self.stores):
            with cached_lower_layers(model, layout, first_cached, store, batch=batch, shared=shared):
                scores = candidate_scores(model, batch)
            correct += int((scores.argmax(-1).cpu() == batch.labels).sum())
        return correct / self.size


class ZeroShotCache:
    """Zero-shot accuracies, shared by tune runs that all start from ONE unchanged base model (a layer sweep).

    Every run measures the base model's dev/test accuracy before its first
    step: in a 31-run sweep that is the same number 31 times and, on a CPU, as
    costly as the training. The caller guarantees the model is the same base at
    the start of each run (the sweep restores and sha-checks every layer), so an
    accuracy for the same examples and batching is exact.
    """

    def __init__(self) -> None:
        self.scores: dict = {}

    def accuracy(self, eval_set, compute) -> float | None:
        """The cached accuracy of ``eval_set`` (an :class:`EvalSet`), or ``compute()``'s, remembered."""
        if eval_set.key not in self.scores:
            self.scores[eval_set.key] = compute()
        return self.scores[eval_set.key]
