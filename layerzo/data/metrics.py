"""SQuAD's answer metrics, as the official v1.1 evaluation script computes them.

``normalize_answer`` lower-cases, drops punctuation, the articles a/an/the
and extra whitespace; ``f1`` is the harmonic mean of token precision and
recall between the normalized prediction and one gold answer; ``exact_match``
compares the normalized strings. Both are taken as the max over the gold
answers (:func:`best_f1`, :func:`best_exact_match`). MeZO scores SQuAD and DROP
generations with exactly these, after stripping the generated text.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the official ``normalize_answer``)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def f1(prediction: str, gold: str) -> float:
    """Token F1 of the normalized strings; 0 when they share no token (also when either is empty)."""
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def best_f1(prediction: str, golds: Sequence[str]) -> float:
    return max(f1(prediction, g) for g in golds)


def best_exact_match(prediction: str, golds: Sequence[str]) -> float:
    return max(exact_match(prediction, g) for g in golds)
