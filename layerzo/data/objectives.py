"""Training objectives: what the ZO engine minimises on a batch.

* ``choice`` — cross-entropy over the candidates' mean log-likelihoods (MeZO's
  multiple-choice loss; the default for classification tasks);
* ``ce`` — teacher-forced mean cross-entropy over the target tokens (the
  default for generative tasks; on a classification task, the correct
  candidate is the target); logits only at the target positions;
* ``accuracy``, ``f1``, ``em`` — non-differentiable: minus the metric of the
  batch's argmax predictions (``accuracy``) or greedy generations (``f1``,
  ``em``: SQuAD token F1 / exact match, max over the gold answers). Only a
  zeroth-order optimiser can follow these directly (MeZO's ``--non_diff``).

:meth:`Objective.step_loss` gives the engine a loss closure for one batch in
which the layers below the tuned one run once: a forward-cache replay for the
teacher-forced losses, a shared prefill (output and KV-cache entries) for the
generation-based ones.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator, Sequence

import torch

from layerzo.data.generation import Generator, batch_scores, encode_prompts
from layerzo.data.scoring import encode_batch, kept_logits, loss_from_scores, scores_from_logits, token_logprobs
from layerzo.data.spec import Example
from layerzo.errors import ConfigError
from layerzo.model.layers import LayerLayout
from layerzo.model.prefix_cache import (ExampleCache, SharedLowerOutputs, cached_lower_layers, paired_forward,
                                        replayed_lower_output)

OBJECTIVES = ("auto", "choice", "ce", "accuracy", "f1", "em")
CHOICE_OBJECTIVES = ("choice", "ce", "accuracy")
GENERATIVE_OBJECTIVES = ("ce", "f1", "em")
GENERATED = ("f1", "em")  # objectives that decode


def resolve_objective(name: str, *, generative: bool, task: str) -> str:
    """``auto`` → the task kind's default; an objective the task kind cannot use is refused in one line."""
    if name not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {name!r}")
    if name == "auto":
        return "ce" if generative else "choice"
    allowed = GENERATIVE_OBJECTIVES if generative else CHOICE_OBJECTIVES
    if name not in allowed:
        kind = "generative (a free-text answer)" if generative else "multiple-choice"
        raise ConfigError(f"--objective {name} does not fit task {task!r}, which is {kind}; "
                          f"use one of {', '.join(allowed)}")
    return name


def teacher_forced(name: str) -> str:
    """The objective layers are profiled and raced with: ``ce`` in place of ``f1``/``em``.

    Those are piecewise constant in the weights (a small eps rarely changes a greedy
    answer), and the lower-layer replays of a profile assume one forward per
    evaluation, which decoding is not; the teacher-forced ce of the same targets is neither.
    """
    return "ce" if name in GENERATED else name


def target_example(ex: Example) -> Example:
    """The example with only its correct candidate: the teacher-forced target of ``ce``."""
    return ex if len(ex.candidates) == 1 else Example(ex.context, (ex.candidates[ex.label],), 0, ex.source, ex.answers)


Perturb = Callable[[], ContextManager]  # the engine's θ + eps·z (or θ − eps·z) for the length of a block


@dataclass(frozen=True)
class StepLoss:
    """The loss of one ZO step's batch: ``loss()`` under whatever perturbation is active, and, where it
    applies, ``pair(plus, minus)``: both losses from one forward of the batch twice (see :meth:`Objective.step_loss`)."""

    single: Callable[[], float]
    pair: Callable[[Perturb, Perturb], tuple[float, float]] | None = None

    def __call__(self) -> float:
        return self.single()


class Objective:
    """One resolved objective with the tokenizer, the length bound and (for f1/em) the generator."""

    def __init__(self, name: str, tokenizer, *, max_length: int, generator: Generator | None = None) -> None:
        if name not in OBJECTIVES[1:]:
            raise ConfigError(f"objective must be resolved to one of {', '.join(OBJECTIVES[1:])}, got {name!r}")
        if name in GENERATED and generator is None:
            raise ConfigError(f"objective {name} generates text and needs a Generator")
        self.name, self.tokenizer, self.max_length, self.generator = name, tokenizer, max_length, generator

    @property
    def generates(self) -> bool:
        return self.name in GENERATED

    def teacher_forced(self) -> "Objective":
        """This objective, or for f1/em the ``ce`` of the same targets (see :func:`teacher_forced`)."""
        name = teacher_forced(self.name)
        return self if name == self.name else Objective(name, self.tokenizer, max_length=self.max_length)

    def encode(self, examples: Sequence[Example]):
        """The batch this objective's loss reads: prompts (f1/em) or scored targets/candidates."""
        if self.generates:
            return encode_prompts(self.tokenizer, examples, max_length=self.max_length,
                                  max_new_tokens=self.generator.max_new_tokens)
        if self.name == "ce":
            examples = [target_example(ex) for ex in examples]
        return encode_batch(self.tokenizer, examples, max_length=self.max_length)

    def loss(self, model, batch, *, layout: LayerLayout | None = None, first: int = 0,
             store: dict | None = None) -> float:
        """The loss of ``batch`` under the model's current weights (no graph is built)."""
        if not self.generates:
            with torch.no_grad():
                return self.loss_of_logits(kept_logits(model, batch), batch)
        texts = self.generator.generate(model, batch, layout=layout, first=first, store=store)
        return -batch_scores(texts, batch)[self.name]

    def loss_of_logits(self, logits: torch.Tensor, batch) -> float:
        """A teacher-forced objective's loss from the kept logits of ``batch``'s rows (a pure function)."""
        if self.name == "ce":
            return float(-token_logprobs(logits, batch).mean())
        scores = scores_from_logits(logits, batch)
        if self.name == "choice":
            return loss_from_scores(scores, batch.labels)
        return -float((scores.argmax(-1).cpu() == batch.labels).float().mean())  # accuracy

    def example_losses_of_logits(self, logits: torch.Tensor, batch) -> list[float]:
        """A teacher-forced objective's loss per example of ``batch`` (ce: the mean over each example's
        target tokens, where :meth:`loss_of_logits` means over all tokens at once; a pure function)."""
        scores = scores_from_logits(logits, batch)
        if self.name == "ce":
            per = -scores[:, 0]  # ce scores the target alone: one candidate
        elif self.name == "choice":
            per = torch.nn.functional.cross_entropy(scores, batch.labels.to(scores.device), reduction="none")
        else:
            per = -(scores.argmax(-1).cpu() == batch.labels).float()
        return [float(v) for v in per]

    @contextmanager
    def step_loss(self, model, layout: LayerLayout, first: int, batch, shared: SharedLowerOutputs | None = None,
                  examples: ExampleCache | None = None, paired: bool = False) -> Iterator[StepLoss]:
        """The loss of one ZO step's batch for its 2·q evaluations; layers < ``first`` run once for all of them.

        With ``examples`` (a filled :class:`ExampleCache`) they do not run at all: layer ``first``
        reads the batch's rows from the cache. ``paired`` (only there, and only when every
        tuned weight sits in layer ``first``) adds ``pair``: the + and − evaluations as ONE
        forward of 2·R rows, layer ``first`` run once per sign, the frozen layers above once.
        """
        if self.generates:
            store: dict = {}
            yield StepLoss(lambda: self.loss(model, batch, layout=layout, first=first, store=store))
            return
        assembled = examples.assemble(batch) if examples is not None and first > 0 else None
        if assembled is not None:
            pair = (lambda plus, minus: self.paired_losses(model, layout, first, batch, assembled, plus, minus)) \
                if paired else None
            with replayed_lower_output(model, layout, first, assembled):
                yield StepLoss(lambda: self.loss(model, batch), pair)
            return
        with cached_lower_layers(model, layout, first, batch=batch, shared=shared):
            yield StepLoss(lambda: self.loss(model, batch))

    def paired_losses(self, model, layout: LayerLayout, first: int, batch, assembled: torch.Tensor, plus: Perturb,
                      minus: Perturb) -> tuple[float, float]:
        """(L+, L−) from one forward of ``batch`` twice: rows [0, R) under ``plus``, [R, 2R) under ``minus``."""
        twice = dataclasses.replace(batch, **{name: torch.cat([getattr(batch, name)] * 2)
                                              for name in ("input_ids", "attention_mask", "position_ids")})
        with torch.no_grad(), paired_forward(model, layout, first, assembled, plus, minus):
            logits = kept_logits(model, twice)
        rows = batch.num_rows
        return self.loss_of_logits(logits[:rows], batch), self.loss_of_logits(logits[rows:], batch)

    def example_cache(self, model, layout: LayerLayout, first: int, examples: Sequence[Example], *,
                      batch_size: int, max_bytes: int) -> ExampleCache | None:
        """The lower layers' output for every training example, computed once (teacher-forced objectives only).

        Examples go in length order, in chunks of ``batch_size`` (little padding; a
        fixed order, so a resumed run fills the same values). None when there is
        nothing to cache: f1/em decode (new tokens need the lower layers), nothing
        below ``first``, or a zero budget.
        """
        if self.generates or first <= 0 or max_bytes <= 0 or not examples:
            return None
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].context))
        batches = (self.encode([examples[i] for i in order[s:s + batch_size]])
                   for s in range(0, len(order), batch_size))
        cache = ExampleCache(max_bytes)
        cache.fill(model, layout, first, batches, lambda b: kept_logits(model, b))
        return cache
