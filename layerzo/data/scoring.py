"""Candidate scoring: how layerzo turns a multiple-choice example into numbers.

Shared by ``tune`` (training loss, dev/test accuracy), the eval comparison and
the sweep. Tokenization follows lm-evaluation-harness' ``_encode_pair`` so
layerzo and lm-eval score exactly the same tokens:

* trailing spaces of the context move to the continuation;
* ``whole = enc(context + cont)``, ``context_enc = enc(context)``,
  ``cont_enc = whole[len(context_enc):]``; the model reads
  ``(context_enc + cont_enc)[:-1]`` (left-truncated to ``max_length``).

Score of a candidate = mean per-token log-likelihood of its ``cont_enc``
tokens; prediction = argmax over candidates; training loss = cross-entropy
over the candidates' scores with the correct candidate as label.

Speed: rows are left-padded so every candidate's tokens sit at the END of its
row; the model then only projects the last ``keep`` positions onto the
vocabulary (``logits_to_keep``), and ``position_ids`` are derived from the
attention mask so padding does not shift positions. When the candidates of an
example differ only in their LAST token (SST-2's " great"/" terrible"; the
SuperGLUE templates' "\nYes"/"\nNo"/"\nMaybe", whose newline lm-eval moves
into every continuation), all its candidates share ONE row (the same tokens
before that last one, causal model → the same logits at every scored
position), which divides the forward cost by the number of candidates
(2 for WiC/RTE/WSC, 3 for CB) without changing any score.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from layerzo.errors import ConfigError, DataRowError

@dataclass(frozen=True)
class ScoringBatch:
    """A tokenized batch of multiple-choice examples.

    Shapes (R rows, T tokens per row, K kept positions, M target tokens,
    P (example, candidate) pairs, E examples, C max candidates):

    * ``input_ids``, ``attention_mask``, ``position_ids``: ``[R, T]`` int64,
      LEFT padded, so the last position of each row is its last real token.
    * ``keep``: K, logits are needed only at the last K positions of a row.
    * ``tok_row``, ``tok_pos``, ``tok_id``, ``tok_pair``: ``[M]``; target token
      m is ``tok_id[m]``, predicted by the logits of row ``tok_row[m]`` at kept
      position ``tok_pos[m]`` (0 ≤ tok_pos < K) and belongs to pair ``tok_pair[m]``.
    * ``pair_example``, ``pair_candidate``: ``[P]``.
    * ``labels``: ``[E]`` index of the correct candidate of each example.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    keep: int
    tok_row: torch.Tensor
    tok_pos: torch.Tensor
    tok_id: torch.Tensor
    tok_pair: torch.Tensor
    pair_example: torch.Tensor
    pair_candidate: torch.Tensor
    labels: torch.Tensor
    num_candidates: int

    @property
    def num_examples(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.shape[0])


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's causal ``_encode_pair``: returns ``(context_enc, cont_enc)``."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if context == "":
        # lm-eval conditions an empty context on the prefix token (BOS, else EOS).
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], tokenizer.encode(continuation, add_special_tokens=False)
    whole = tokenizer.encode(context + continuation)
    context_enc = tokenizer.encode(context)
    return context_enc, whole[len(context_enc) :]


def left_padded(tokenizer, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rows`` of token ids as ``[R, T]`` ids, attention mask and position ids, LEFT padded (pad: the
    tokenizer's pad, else EOS), positions counted from each row's first real token."""
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, width - len(r) :] = 1
    return input_ids, attention_mask, (attention_mask.cumsum(-1) - 1).clamp(min=0)


def shares_one_row(conts: Sequence[Sequence[int]]) -> bool:
    """Candidates whose continuations have one length and differ at most in the last token read one row.

    Every candidate's context encoding is the same (it depends on the context
    alone), so their rows ``(ctx + cont)[:-1]`` are then identical.
    """
    return len({len(c) for c in conts}) == 1 and len({tuple(c[:-1]) for c in conts}) == 1


def encode_batch(tokenizer, examples: Sequence, *, max_length: int = 512) -> ScoringBatch:
    """Tokenize ``examples`` (``layerzo.data.spec.Example``) into one :class:`ScoringBatch`."""
    if max_length < 2:
        raise ConfigError(f"max_length must be at least 2, got {max_length}")
    if not examples:
        raise ConfigError("cannot score an empty list of examples")
    rows: list[list[int]] = []
    targets: list[tuple[int, list[int]]] = []  # (row, target token ids at the row's end)
    pair_example: list[int] = []
    pair_candidate: list[int] = []
    for e, ex in enumerate(examples):
        if not ex.candidates:
            raise DataRowError(f"example {ex.source or e} has no candidates")
        encoded = [encode_pair(tokenizer, ex.context, cand) for cand in ex.candidates]
        for c, (_, cont) in enumerate(encoded):
            if not cont:
                raise DataRowError(f"candidate {c} of example {ex.source or e} encodes to no tokens")
        share = shares_one_row([cont for _, cont in encoded])
        for c, (ctx, cont) in enumerate(encoded):
            if c == 0 or not share:  # shared: the first candidate's row is every candidate's
                row = len(rows)
                rows.append((ctx + cont)[-(max_length + 1) : -1])
            # Targets are the last len(cont) tokens of ctx+cont; after left truncation
            # at most len(row) of them still have a predicting position.
            targets.append((row, cont[-len(rows[row]) :]))
            pair_example.append(e)
            pair_candidate.append(c)

    keep = max(len(t) for _, t in targets)
    input_ids, attention_mask, position_ids = left_padded(tokenizer, rows)

    tok_row, tok_pos, tok_id, tok_pair = [], [], [], []
    for p, (row, ids) in enumerate(targets):
        for j, tid in enumerate(ids):
            tok_row.append(row)
            tok_pos.append(keep - len(ids) + j)
            tok_id.append(tid)
            tok_pair.append(p)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return ScoringBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        keep=keep,
        tok_row=as_long(tok_row),
        tok_pos=as_long(tok_pos),
        tok_id=as_long(tok_id),
        tok_pair=as_long(tok_pair),
        pair_example=as_long(pair_example),
        pair_candidate=as_long(pair_candidate),
        labels=as_long([ex.label for ex in examples]),
        num_candidates=max(len(ex.candidates) for ex in examples),
    )


def accepts_argument(model, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def _flat_output_head(model) -> Iterator[None]:
    """Feed the LM head a 2-D ``[R·K, H]`` input instead of the sliced 3-D ``[R, K, H]`` view.

    The sliced view sends ``F.linear`` down a batched-matmul path that
    broadcasts the whole vocabulary matrix per row (measured 3.5x slower than
    one matmul on the demo model's 49k-token head, ~9% of a forward).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        yield
        return
    shapes: list = []

    def pre(module, args):
        x = args[0]
        if x.dim() <= 2:
            shapes.append(None)
            return None
        shapes.append(x.shape[:-1])
        return (x.reshape(-1, x.shape[-1]),) + tuple(args[1:])

    def post(module, args, output):
        shape = shapes.pop()
        return output if shape is None else output.reshape(*shape, output.shape[-1])

    handles = [head.register_forward_pre_hook(pre), head.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def kept_logits(model, batch: ScoringBatch) -> torch.Tensor:
    """Logits of the last ``batch.keep`` positions of every row: ``[R, K, V]``.

    The prediction for the token at row position t comes from position t-1, so
    the kept window is shifted one to the left of the target tokens.
    """
    device = _model_device(model)
    kwargs = {
        "input_ids": batch.input_ids.to(device),
        "attention_mask": batch.attention_mask.to(device),
        "use_cache": False,
    }
    if accepts_argument(model, "position_ids"):
        kwargs["position_ids"] = batch.position_ids.to(device)
    if accepts_argument(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = batch.keep
    with _flat_output_head(model):
        logits = model(**kwargs).logits
    return logits[:, -batch.keep :]


def token_logprobs(logits: torch.Tensor, batch: ScoringBatch) -> torch.Tensor:
    """Log-probability of every target token ``[M]`` (float32; float64 for a float64 model)."""
    if logits.dtype != torch.float64:  # float64 models (gradient checks) keep their precision
        logits = logits.float()
    rows, pos = batch.tok_row.to(logits.device), batch.tok_pos.to(logits.device)
    picked = logits[rows, pos]  # [M, V]
    return picked.gather(-1, batch.tok_id.to(logits.device)[:, None])[:, 0] - picked.logsumexp(-1)


def scores_from_logits(logits: torch.Tensor, batch: ScoringBatch) -> torch.Tensor:
    """Mean candidate log-likelihoods ``[E, C]`` (−inf where an example has fewer candidates)."""
    token_logp = token_logprobs(logits, batch)
    logits_device, dtype = token_logp.device, token_logp.dtype
    num_pairs = int(batch.pair_example.shape[0])
    pair = batch.tok_pair.to(logits_device)
    sums = torch.zeros(num_pairs, dtype=dtype, device=logits_device).index_add_(0, pair, token_logp)
    counts = torch.zeros(num_pairs, dtype=dtype, device=logits_device).index_add_(
        0, pair, torch.ones_like(token_logp)
    )
    scores = torch.full(
        (batch.num_examples, batch.num_candidates), float("-inf"), dtype=dtype, device=logits_device
    )
    scores[batch.pair_example.to(logits_device), batch.pair_candidate.to(logits_device)] = sums / counts
    return scores


@torch.no_grad()
def candidate_scores(model, batch: ScoringBatch) -> torch.Tensor:
    """Mean per-token log-likelihood of every candidate: ``[E, C]`` float32 (float64 for a float64 model), −inf padding."""
    return scores_from_logits(kept_logits(model, batch), batch)


def loss_from_scores(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Cross-entropy over candidate scores (the ZO training objective)."""
    return float(F.cross_entropy(scores, labels.to(scores.device)))


@torch.no_grad()
def batch_loss(model, batch: ScoringBatch) -> float:
    """Training loss of one batch; no autograd graph is built."""
    return loss_from_scores(candidate_scores(model, batch), batch.labels)


@torch.no_grad()
def predictions(model, tokenizer, examples: Sequence, *, batch_size: int = 16, max_length: int = 512) -> list[int]:
    """Argmax candidate of every example, in input order.

    Examples are processed in order of context length so batches hold
    similar lengths (less padding); the result is put back in input order.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].context))
    preds = [0] * len(examples)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = encode_batch(tokenizer, [examples[i] for i in chunk], max_length=max_length)
        best = candidate_scores(model, batch).argmax(-1).tolist()
        for i, p in zip(chunk, best):
            preds[i] = p
    return preds


def accuracy(model, tokenizer, examples: Sequence, *, batch_size: int = 16, max_length: int = 512) -> float:
    """Fraction of ``examples`` whose highest-scoring candidate is the label."""
    if not examples:
        raise ConfigError("cannot compute accuracy on an empty list of examples")
    preds = predictions(model, tokenizer, examples, batch_size=batch_size, max_length=max_length)
    return sum(int(p == ex.label) for p, ex in zip(preds, examples)) / len(examples)
