"""Prompt templates and verbalizers, copied from MeZO's ``large_models/templates.py``.

Each template is a pure function of a row's string fields and returns a
:data:`Prompt` ``(context, candidates)``: the context is MeZO's ``encode()``
and ``context + candidates[i]`` is MeZO's ``verbalize(sample, i)`` character
for character. Candidates are in label order (``candidates[label]`` is the
correct one). Where MeZO's verbalize puts a space between the context and the
verbalizer word (SST-2) the space belongs to the candidate, so the context
never has to be re-joined with a separator.

A template raises ``ValueError`` for a value it cannot render (COPA's
``question`` not "cause"/"effect"); the loader turns that into a
``DataRowError`` naming the file and line.
"""

from __future__ import annotations

import string

Prompt = tuple[str, tuple[str, ...]]  # (context, candidates in label order)

YES_NO = ("Yes", "No")  # label 0 = yes-like (entailment), as in MeZO's RTE verbalizer
NO_YES = ("No", "Yes")  # label 0 = false, as in MeZO's MultiRC/WiC/WSC verbalizers


def sst2(sentence: str) -> Prompt:
    """SST2Template: ``"<sentence> It was"`` + ``" terrible"`` / ``" great"``."""
    return f"{sentence.strip()} It was", (" terrible", " great")


def rte(premise: str, hypothesis: str) -> Prompt:
    """RTETemplate (PromptSource): entailment → "Yes", not_entailment → "No"."""
    return f'{premise}\nDoes this mean that "{hypothesis}" is true? Yes or No?\n', YES_NO


def cb(premise: str, hypothesis: str) -> Prompt:
    """CBTemplate (PromptSource): entailment / contradiction / neutral → Yes / No / Maybe."""
    return f'Suppose {premise} Can we infer that "{hypothesis}"? Yes, No, or Maybe?\n', ("Yes", "No", "Maybe")


def boolq(passage: str, question: str) -> Prompt:
    """BoolQTemplateV3, the one MeZO's ``BoolQDataset.get_template()`` returns by default.

    MeZO lists the candidates as ["Yes", "No"]; here they are in label order
    (False → "No", True → "Yes") so that ``label == int(answer)``. The scored
    texts are identical.
    """
    if not question.endswith("?"):
        question = question + "?"
    question = question[0].upper() + question[1:] if question else question
    return f"{passage} {question}\n", NO_YES


def copa(premise: str, choice1: str, choice2: str, question: str) -> Prompt:
    """CopaTemplate with capitalization="correct": ``"<premise> because "`` + choice.

    The premise loses one trailing "."; each choice's first word is lower-cased
    unless it is "I" (MeZO's ``capitalize``).
    """
    conjunctions = {"cause": " because ", "effect": " so "}
    if question not in conjunctions:
        raise ValueError(f"field 'question' is {question!r}; expected 'cause' or 'effect'")
    premise = premise.rstrip()
    if premise.endswith("."):
        premise = premise[:-1]
    return premise + conjunctions[question], (_lower_first_word(choice1), _lower_first_word(choice2))


def _lower_first_word(choice: str) -> str:
    words = choice.split(" ")
    if words[0] != "I":
        words[0] = words[0].lower()
    return " ".join(words)


def wic(word: str, sentence1: str, sentence2: str) -> Prompt:
    """WICTemplate (PromptSource): False → "No", True → "Yes"."""
    question = f'Does the word "{word}" have the same meaning in these two sentences? Yes, No?'
    context = f"{question}\n{sentence1}\n{sentence2}\n"
    return context, NO_YES


def wsc(text: str, span1_text: str, span2_text: str) -> Prompt:
    """WSCTemplate (PromptSource): False → "No", True → "Yes"."""
    context = (
        f'{text}\nIn the previous sentence, does the pronoun "{span2_text.lower()}" refer to {span1_text}? '
        "Yes or No?\n"
    )
    return context, NO_YES


def multirc(paragraph: str, question: str, answer: str) -> Prompt:
    """MultiRCTemplate (PromptSource), one (question, answer) pair: 0 → "No", 1 → "Yes"."""
    context = f'{paragraph}\nQuestion: {question}\nI found this answer "{answer}". Is that correct? Yes or No?\n'
    return context, NO_YES


# ---------------------------------------------------------------- generative (QA) templates


def squad(title: str, context: str, question: str) -> Prompt:
    """SQuADv2Template (MeZO uses it for SQuAD v1.1): the prompt only; the target is :func:`qa_target`."""
    return f"Title: {title}\nContext: {context}\nQuestion: {question.strip()}\nAnswer:", ()


def drop(passage: str, question: str) -> Prompt:
    """DROPTemplate: the prompt only; the target is :func:`qa_target`."""
    return f"Passage: {passage}\nQuestion: {question.strip()}\nAnswer:", ()


def qa_target(answer: str) -> str:
    """MeZO's teacher-forced continuation of a QA prompt: the FIRST gold answer, then a newline
    (``verbalize`` minus ``encode``); generation stops at that newline."""
    return f" {answer}\n"


# ---------------------------------------------------------------- user templates


def template_fields(template: str) -> tuple[str, ...]:
    """The ``{field}`` names a user template reads, in first-use order.

    Raises ``ValueError`` for a malformed template, a positional slot (``{}``,
    ``{0}``) or attribute/index access (``{a.b}``, ``{a[0]}``), so that a row's
    values are the only thing ever substituted.
    """
    names: list[str] = []
    for _, field, _, _ in string.Formatter().parse(template):
        if field is None:
            continue
        if field == "" or field.isdigit():
            raise ValueError("positional slots like '{}' are not allowed; name the field, e.g. '{text}'")
        if any(c in field for c in ".[]"):
            raise ValueError(f"slot '{{{field}}}' uses attribute or index access; use a plain field name")
        if field not in names:
            names.append(field)
    return tuple(names)


def render_user_template(template: str, candidates: tuple[str, ...], **fields: str) -> Prompt:
    """A user task's prompt: ``template`` with its ``{field}`` slots filled in (a missing field: KeyError
    naming it, which the task loader turns into a row error)."""
    return template.format_map(fields), candidates
