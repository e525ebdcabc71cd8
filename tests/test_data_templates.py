"""MeZO's prompt templates and the user-template helpers."""

from __future__ import annotations

import pytest

from layerzo.data import templates


def test_copa_template_rejects_unknown_question():
    with pytest.raises(ValueError, match="'cause' or 'effect'"):
        templates.copa("A.", "b", "c", "reason")


def test_copa_joins_premise_and_lower_cased_choice():
    context, candidates = templates.copa("The man fell.", "He tripped.", "I laughed.", "cause")
    assert context == "The man fell because "
    assert candidates == ("he tripped.", "I laughed.")  # "I" keeps its capital
    assert templates.copa("It rained.", "We stayed in.", "x", "effect")[0] == "It rained so "


def test_sst2_appends_the_verbalizer_stem():
    assert templates.sst2("a fine film ") == ("a fine film It was", (" terrible", " great"))


def test_template_fields_in_first_use_order():
    assert templates.template_fields("{b} and {a}, again {b}") == ("b", "a")
    assert templates.template_fields("no slots") == ()


@pytest.mark.parametrize("template, message", [
    ("{}", "positional"), ("{0}", "positional"), ("{a.b}", "attribute or index"), ("{a[0]}", "attribute or index"),
])
def test_template_fields_refuses_non_field_slots(template, message):
    with pytest.raises(ValueError, match=message):
        templates.template_fields(template)


def test_render_user_template_fills_fields_and_keeps_candidates():
    assert templates.render_user_template("Q: {q}\nA:", (" x", " y"), q="2+2?") == ("Q: 2+2?\nA:", (" x", " y"))


def test_squad_and_drop_prompts_and_the_qa_target():
    assert templates.squad("T", "C.", " Who? ") == ("Title: T\nContext: C.\nQuestion: Who?\nAnswer:", ())
    assert templates.drop("P.", "How many?\n") == ("Passage: P.\nQuestion: How many?\nAnswer:", ())
    assert templates.qa_target("Denver Broncos") == " Denver Broncos\n"
