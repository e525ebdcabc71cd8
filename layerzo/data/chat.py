"""Chat examples rendered with the tokenizer's chat template into plain prompt + target text.

A ``messages`` row becomes examples that still hold their turns
(:mod:`layerzo.data.datafile`); only the model's tokenizer knows how its chat
is written, so rendering waits until the tokenizer is loaded. The prompt is
the template of the turns before the assistant turn with the generation
prompt (``<|im_start|>assistant\\n``); the target is what the template writes
after it for the assistant turn, end-of-turn text included, so the model
learns to close its turn. The prompt may start with a BOS-like text token the
template writes; that is the template's choice.
"""

from __future__ import annotations

import dataclasses

from layerzo.data.spec import Example, TaskSplits
from layerzo.errors import DataRowError, TaskError


def render_chat(splits: TaskSplits, tokenizer) -> TaskSplits:
    """``splits`` with every chat example rendered (``chat=False``); splits without chat examples are returned as is.

    ``stop`` gains the end-of-turn text the template writes after an
    assistant reply (ChatML: ``<|im_end|>``), so a generation ends at the end of
    its turn even when the tokenizer's EOS is another token.
    """
    if not splits.chat:
        return splits
    examples = [e for part in (splits.train, splits.dev, splits.test) for e in part if e.messages]
    template = getattr(tokenizer, "chat_template", None)
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if not template:
        raise _no_template(examples, name)
    ends: dict[str, None] = {}

    def render(part: tuple[Example, ...]) -> tuple[Example, ...]:
        out = []
        for ex in part:
            rendered = render_example(ex, tokenizer, name) if ex.messages else ex
            out.append(rendered)
            if ex.messages:
                end = turn_end(rendered.candidates[0], ex.messages[-1][1])
                if end:
                    ends[end] = None
        return tuple(out)

    train, dev, test = render(splits.train), render(splits.dev), render(splits.test)
    stop = tuple(dict.fromkeys((*splits.stop, *ends)))
    return dataclasses.replace(splits, train=train, dev=dev, test=test, chat=False, stop=stop)


def render_example(ex: Example, tokenizer, name: str) -> Example:
    """One chat example as ``Example(prompt, (target,), 0, source, answers)``."""
    turns = [{"role": role, "content": content} for role, content in ex.messages]
    try:
        prefix = tokenizer.apply_chat_template(turns[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(turns, tokenize=False)
    except Exception as e:  # jinja's raise_exception, a missing template, a template bug: all name the row
        if "chat_template" in str(e) and "not set" in str(e):
            raise _no_template([ex], name) from None
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise DataRowError(f"{ex.source}: the chat template of {name} cannot render this conversation: "
                           f"{first}") from None
    if not full.startswith(prefix):
        raise DataRowError(f"{ex.source}: the chat template of {name} does not render the assistant turn after "
                           "the prompt (the conversation's text does not start with the prompt's text)")
    target = full[len(prefix):]
    if not target.strip():
        raise DataRowError(f"{ex.source}: the chat template of {name} renders the assistant turn as empty text")
    return Example(prefix, (target,), 0, ex.source, ex.answers)


def turn_end(target: str, content: str) -> str:
    """The text the template writes after the assistant's reply (``"<|im_end|>"``), stripped; "" if none
    or if the reply cannot be found in the target (a template that rewrites the content)."""
    reply = content.strip()
    at = target.rfind(reply) if reply else -1
    return target[at + len(reply):].strip() if at >= 0 else ""


def _no_template(examples: list[Example], name: str) -> TaskError:
    file = examples[0].source.rsplit(":", 1)[0] if examples else "the task"
    return TaskError(f"{file}: messages rows need a chat template, and the tokenizer of {name} has none; "
                     "use prompt/completion rows")
