"""What a layer patch changed, in words: the base model's and the patched model's greedy answers to one prompt.

:func:`compare_generations` loads the base ONCE, checks that the patch fits it
(architecture, layer count, tensor shapes, base fingerprint) before generating
anything, answers the prompt with the base, copies the patch's tensors into the
same in-memory model (:func:`layerzo.patch.merge.apply_to_model`) and answers
again. Both answers are greedy (:class:`layerzo.data.generation.Generator`: KV
cache, stop strings), so any difference is the patch's.

Defaults come from the patch's manifest: the base it was made on
(:func:`patch_base`), the stop strings of its task (SQuAD, DROP: the first
newline; :func:`task_stop`), its ``max_new_tokens``; the prompt keeps at most
the recipe's ``max_length`` tokens (its last ones, as tune cut its prompts).
``chat=True`` renders the prompt as one user turn with the tokenizer's chat
template (generation prompt added) and stops at the end of the assistant turn.

Streaming: ``on_token(label, text)`` receives each answer's text as it grows,
first ``(label, "")`` when that model starts; the pieces of one answer join to
its final text (text that a stop string may still cut, or half of a multi-byte
character, is held back until it is certain).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from layerzo.data.chat import render_example, turn_end
from layerzo.data.datafile import data_stop
from layerzo.data.generation import DEFAULT_MAX_NEW_TOKENS, Generator, encode_prompts
from layerzo.data.spec import Example
from layerzo.data.tasks import get_task, load_examples
from layerzo.errors import ConfigError, LayerzoError, ModelLoadError
from layerzo.model.loading import DEMO_MODEL_ID, check_model_source, load_model, resolve_source
from layerzo.patch.format import LayerPatch
from layerzo.patch.merge import apply_to_model, check_base
from layerzo.patch.replay import with_weights

DEFAULT_MAX_LENGTH = 512  # TuneConfig's max_length, for a patch whose recipe records none
CHAT_PROBE = "layerzo probe reply"  # a reply rendered to find the text the template writes after a turn
BASE_LABEL = "base"

OnToken = Callable[[str, str], None]


@dataclass(frozen=True)
class Generation:
    """One model's answer."""

    label: str  # "base", "patched (layer 11)"
    text: str  # special tokens dropped, cut at the first stop string
    num_tokens: int  # new tokens generated, the stop token included
    stopped: bool  # ended at a stop (string or EOS); False: cut at max_new_tokens


@dataclass(frozen=True)
class GenerationComparison:
    """The base's and the patched model's answers to the same prompt."""

    prompt: str  # as the models saw it (chat template applied)
    chat: bool
    base_model: str
    patch: str | None  # the patch folder or Hub id it was read from
    layers: tuple[int, ...]
    stop: tuple[str, ...]  # stop strings (the tokenizer's EOS always stops too)
    max_new_tokens: int
    truncated: bool  # the prompt was cut to its last max_length tokens
    base: Generation
    patched: Generation
    notes: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return self.base.text != self.patched.text

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["layers"], data["stop"], data["notes"] = list(self.layers), list(self.stop), list(self.notes)
        data["changed"] = self.changed
        return data


# ----------------------------------------------------------------------------- defaults from the patch


def patch_base(patch: LayerPatch) -> str | None:
    """The base ``patch`` was made on, as a :func:`load_model` spec: None for the demo, a Hub id or a local path.

    tune records a local base by its folder name only (unless ``record_paths``):
    one that is not here is a :class:`ModelLoadError` asking for the path.
    """
    m = patch.manifest
    recorded = m.recipe.get("model", m.base_model)
    if recorded in (None, "", "demo") or m.base_model == DEMO_MODEL_ID and recorded != DEMO_MODEL_ID:
        return None  # the demo GGUF (the Hub's SmolLM2 is recorded by its id in the recipe too)
    spec = str(recorded)
    try:
        resolve_source(spec)
    except ModelLoadError:
        raise ModelLoadError(f"the patch was made on the local model {spec!r}, which is not here",
                             "give the base with --model PATH") from None
    return spec


def task_stop(recipe: dict) -> tuple[tuple[str, ...], str | None]:
    """The stop strings of the recipe's task (SQuAD, DROP: ``("\\n",)``; a choice task: none) and a note
    when the task cannot be read here (a local task file recorded by name)."""
    task = recipe.get("task")
    if not isinstance(task, str) or not task:
        return (), None
    try:
        spec = get_task(task)
        stop = data_stop(load_examples(task, "train")) if spec.row_examples is not None else spec.stop
    except (LayerzoError, OSError):
        return (), f"the patch's task {task} is not here: no task stop strings apply (give them with --stop)"
    return tuple(stop), None


def patch_max_new_tokens(patch: LayerPatch) -> int:
    """The patch's generation length: its metrics' (generative tasks), else its recipe's, else the default."""
    m = patch.manifest
    for value in (m.metrics.get("max_new_tokens"), m.recipe.get("max_new_tokens")):
        if type(value) is int and value >= 1:
            return value
    return DEFAULT_MAX_NEW_TOKENS


def parse_stop(values: Sequence[str]) -> tuple[str, ...]:
    """Stop strings as typed on a command line: ``\\n``, ``\\t`` and ``\\\\`` are a newline, a tab and a
    backslash; ``""`` adds none (``[""]`` stops at EOS only)."""
    escapes = {"n": "\n", "t": "\t", "\\": "\\"}
    return tuple(re.sub(r"\\([nt\\])", lambda g: escapes[g.group(1)], v) for v in values)


def patched_label(layers: Sequence[int]) -> str:
    """``patched (layer 11)`` / ``patched (layers 2,3)``."""
    return f"patched (layer{'s' if len(layers) > 1 else ''} {','.join(map(str, layers))})"


def chat_prompt(prompt: str, tokenizer) -> tuple[str, str]:
    """``prompt`` as one user turn of the tokenizer's chat template, plus the template's end-of-turn text."""
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"--chat needs a chat template, and the tokenizer of {name} has none",
                          "drop --chat to give the prompt as plain text")
    probe = Example("", ("",), 0, "the --chat prompt", messages=(("user", prompt), ("assistant", CHAT_PROBE)))
    rendered = render_example(probe, tokenizer, name)
    return rendered.context, turn_end(rendered.candidates[0], CHAT_PROBE)


# ----------------------------------------------------------------------------- streaming


def held_back(text: str, stop: Sequence[str]) -> str:
    """``text`` without what may still change: a trailing half character (U+FFFD) or the start of a stop string."""
    text = text.rstrip("\ufffd")
    cut = max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[:len(text) - cut]


class TextStream:
    """Feeds ``emit`` the new text of a growing token list, decoded whole each step (multi-byte tokens stay intact)."""

    def __init__(self, generator: Generator, emit: Callable[[str], None]) -> None:
        self.generator, self.emit = generator, emit
        self.ids: list[int] = []
        self.shown = ""

    def step(self, row_ids: list[int]) -> None:
        """``Generator.generate_ids``' ``on_token``: this step's token of the one row."""
        self.ids.append(row_ids[0])
        self.show(held_back(self.generator.text(self.ids), self.generator.stop))

    def show(self, text: str) -> None:
        if len(text) > len(self.shown) and text.startswith(self.shown):
            self.emit(text[len(self.shown):])
            self.shown = text


def answer(generator: Generator, model, batch, label: str, on_token: OnToken | None) -> Generation:
    stream = TextStream(generator, lambda piece: on_token(label, piece)) if on_token is not None else None
    if on_token is not None:
        on_token(label, "")
    ids = generator.generate_ids(model, batch, on_token=stream.step if stream is not None else None)[0]
    text = generator.text(ids)
    if stream is not None:
        stream.show(text)
    stopped = bool(ids) and ids[-1] in set(generator.stop_ids.tolist())
    return Generation(label, text, len(ids), stopped)


# ----------------------------------------------------------------------------- the comparison


def compare_generations(
    patch: LayerPatch | str | os.PathLike,
    prompt: str,
    *,
    model: str | os.PathLike | None = None,
    chat: bool = False,
    max_new_tokens: int | None = None,
    stop: Sequence[str] | None = None,
    on_token: OnToken | None = None,
    force: bool = False,
    dtype: str = "float32",
    device: str = "cpu",
    revision: str | None = None,
    token: str | None = None,
    trust_remote_code: bool = False,
    progress: Callable[[str], None] | None = None,
) -> GenerationComparison:
    """Greedy answers of the base and of base + ``patch`` to ``prompt`` (see the module doc).

    ``model``: the base (None: the one the patch was made on, :func:`patch_base`;
    "demo": the demo); ``stop``: stop strings instead of the task's (``[]``:
    EOS only); ``force``: apply even if the base fingerprint differs.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError("the prompt is empty", "give the text the models should answer")
    say = progress or (lambda _msg: None)
    if not isinstance(patch, LayerPatch):
        patch = LayerPatch.from_pretrained(patch, token=token)
    m = patch.manifest
    base = patch_base(patch) if model is None else model
    revision = revision if revision is not None or model is not None else m.base_revision
    check_model_source(base, revision=revision, device=device, trust_remote_code=trust_remote_code)
    if not patch.weights_included:
        say("rebuilding the trajectory-only patch's weights from the base")
        patch = with_weights(patch, base, revision=revision)
    say("loading the base model")
    loaded = load_model(base, dtype=dtype, device=device, revision=revision, trust_remote_code=trust_remote_code)
    check_base(loaded.model, patch, force=force)  # a wrong base: one line before any answer
    text, turn_stop = chat_prompt(prompt, loaded.tokenizer) if chat else (prompt, "")
    notes: list[str] = []
    if stop is None:
        stop, note = ((turn_stop,) if turn_stop else (), None) if chat else task_stop(m.recipe)
        notes += [note] if note else []
    new = max_new_tokens if max_new_tokens is not None else patch_max_new_tokens(patch)
    generator = Generator(loaded.tokenizer, stop=tuple(stop), max_new_tokens=new)
    budget = m.recipe.get("max_length") if type(m.recipe.get("max_length")) is int else DEFAULT_MAX_LENGTH
    batch = encode_prompts(loaded.tokenizer, [Example(text, ("",), 0)], max_length=budget + new, max_new_tokens=new)
    if batch.truncated:
        notes.append(f"the prompt was cut to its last {budget} tokens (the patch's max_length)")
    base_answer = answer(generator, loaded.model, batch, BASE_LABEL, on_token)
    notes += apply_to_model(loaded.model, patch, force=force)
    patched_answer = answer(generator, loaded.model, batch, patched_label(m.layers), on_token)
    return GenerationComparison(
        prompt=text, chat=chat, base_model=loaded.source.name, patch=patch.source, layers=tuple(m.layers),
        stop=generator.stop, max_new_tokens=new, truncated=bool(batch.truncated), base=base_answer,
        patched=patched_answer, notes=tuple(notes),
    )
