"""Chat examples rendered with the tokenizer's chat template: prompt = the turns before the reply plus
the generation prompt, target = the rest, end of turn included; refusals without a template."""

from __future__ import annotations

import copy
import json

import pytest

from layerzo.data.chat import render_chat, render_example, turn_end
from layerzo.data.spec import Example, TaskSplits
from layerzo.data.tasks import load_task
from layerzo.errors import DataRowError, TaskError

GEN_PROMPT = "<|im_start|>assistant\n"  # SmolLM2's ChatML generation prompt
END = "<|im_end|>"


def chat_example(source: str = "f.jsonl:1", *turns: tuple[str, str]) -> Example:
    turns = turns or (("user", "Capital of France?"), ("assistant", "Paris"))
    return Example("", ("",), 0, source, (turns[-1][1].strip(),), turns)


def splits_of(*examples: Example, stop=()) -> TaskSplits:
    return TaskSplits("t", tuple(examples), (), (), generative=True, stop=stop, chat=True)


def test_render_chat_on_the_demo_tokenizer(tokenizer, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"},
                          {"role": "user", "content": "And Italy?"}, {"role": "assistant", "content": "Rome"}]}]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * 5), encoding="utf-8")
    splits = load_task(path, num_dev=1, num_test=1)
    assert splits.chat and splits.generative and splits.stop == ()
    rendered = render_chat(splits, tokenizer)
    assert not rendered.chat and rendered.generative and rendered.stop == (END,)
    assert [len(p) for p in (rendered.train, rendered.dev, rendered.test)] == [6, 2, 2]
    first, second = rendered.train[:2]
    assert first.context.endswith("<|im_start|>user\nCapital of France?<|im_end|>\n" + GEN_PROMPT)
    assert first.candidates == ("Paris" + END + "\n",)  # starts right after the generation prompt
    assert second.context.endswith("Paris" + END + "\n<|im_start|>user\nAnd Italy?" + END + "\n" + GEN_PROMPT)
    assert second.candidates == ("Rome" + END + "\n",)
    assert (first.answers, second.answers) == (("Paris",), ("Rome",))
    assert first.messages == () and first.source == f"{path}:1"
    full = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in splits.train[1].messages],
                                         tokenize=False)
    assert second.context + second.candidates[0] == full


def test_render_chat_leaves_plain_splits_alone(tokenizer):
    plain = TaskSplits("t", (Example("p", (" x\n",), 0, "f:1", ("x",)),), (), (), generative=True, stop=("\n",))
    assert render_chat(plain, tokenizer) is plain


def test_no_chat_template_is_one_task_error(tokenizer):
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(TaskError) as info:
        render_chat(splits_of(chat_example("data/chat.jsonl:3")), bare)
    message = str(info.value)
    assert message.startswith("data/chat.jsonl: messages rows need a chat template, and the tokenizer of ")
    assert message.endswith(" has none; use prompt/completion rows") and "\n" not in message


class FakeTokenizer:
    """A tokenizer whose chat template is given as a function of (messages, add_generation_prompt)."""

    name_or_path = "fake/model"
    chat_template = "{{ fake }}"

    def __init__(self, render):
        self.render = render

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        return self.render(messages, add_generation_prompt)


def test_a_template_that_does_not_extend_the_prompt_is_a_row_error():
    def rewrites(messages, gen):  # e.g. a template that moves the last turn to the front
        return "".join(f"[{m['role']}]{m['content']}" for m in reversed(messages)) + ("[a]" if gen else "")

    with pytest.raises(DataRowError, match=r"^f\.jsonl:1: the chat template of fake/model does not render the "
                                           "assistant turn after the prompt"):
        render_chat(splits_of(chat_example()), FakeTokenizer(rewrites))


def test_a_template_that_raises_names_the_row():
    def strict(messages, gen):
        raise ValueError("Conversation roles must alternate user/assistant\nmore")

    with pytest.raises(DataRowError, match=r"^f\.jsonl:1: the chat template of fake/model cannot render this "
                                           "conversation: Conversation roles must alternate user/assistant$"):
        render_example(chat_example(), FakeTokenizer(strict), "fake/model")

    def unset(messages, gen):
        raise ValueError("Cannot use chat template functions because tokenizer.chat_template is not set")

    with pytest.raises(TaskError, match="^f.jsonl: messages rows need a chat template"):
        render_example(chat_example(), FakeTokenizer(unset), "fake/model")


def test_turn_end_is_the_text_after_the_reply():
    assert turn_end("Paris<|im_end|>\n", " Paris ") == "<|im_end|>"
    assert turn_end("Paris", "Paris") == ""
    assert turn_end("PARIS</s>", "Paris") == ""  # a template that rewrites the reply: no guess
    pipes = FakeTokenizer(lambda messages, gen: "".join(m["content"] + "|" for m in messages))
    assert render_chat(splits_of(chat_example(), stop=("\n\n",)), pipes).stop == ("\n\n", "|")  # kept, then added
