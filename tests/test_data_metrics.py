"""SQuAD v1.1's official answer normalisation, F1 and exact match."""

import pytest

from layerzo.data.metrics import best_exact_match, best_f1, exact_match, f1, normalize_answer


def test_normalize_answer_drops_case_punctuation_articles_and_spaces():
    assert normalize_answer("  The  Denver Broncos!  ") == "denver broncos"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert normalize_answer("theory") == "theory"  # 'the' only as a whole word


@pytest.mark.parametrize("pred, gold, value", [
    ("Denver Broncos", "Denver Broncos", 1.0),
    ("the Denver Broncos.", "Denver Broncos", 1.0),
    ("Broncos", "Denver Broncos", 2 * 1.0 * 0.5 / 1.5),  # precision 1, recall 1/2
    ("Denver Broncos won", "Denver Broncos", 2 * (2 / 3) * 1.0 / (2 / 3 + 1.0)),
    ("Carolina Panthers", "Denver Broncos", 0.0),
    ("", "Denver Broncos", 0.0),
    ("a an the", "the", 0.0),  # both normalise to nothing: v1.1 scores that 0
    ("to to be", "to be be", 2 * (2 / 3) * (2 / 3) / (4 / 3)),  # token counts, not sets
])
def test_f1_matches_the_official_formula(pred, gold, value):
    assert f1(pred, gold) == pytest.approx(value)


def test_max_over_gold_answers():
    golds = ["Denver Broncos", "Broncos", "the Denver Broncos"]
    assert best_f1("Broncos", golds) == 1.0
    assert best_exact_match("broncos", golds) == 1.0
    assert best_exact_match("Denver", golds) == 0.0
    assert exact_match("Denver  Broncos.", "denver broncos") == 1.0
