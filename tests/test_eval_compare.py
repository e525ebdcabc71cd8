"""The base's and the patched model's answers to one prompt: the same greedy generations as the models alone."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from typer.testing import CliRunner

import layerzo
from conftest import make_tiny_model
from layerzo.data.generation import Generator, encode_prompts
from layerzo.data.spec import Example
from layerzo.errors import BaseMismatchError, ConfigError, ModelLoadError
from layerzo.eval.compare import (
    TextStream,
    compare_generations,
    held_back,
    parse_stop,
    patch_base,
    patch_max_new_tokens,
    patched_label,
    task_stop,
)
from layerzo.model.loading import DEMO_MODEL_ID, load_model
from layerzo.patch.format import LayerPatch
from layerzo.tune.config import TuneConfig
from layerzo.tune.loop import tune

PROMPT = "Title: Cats\nContext: The cat sat on the mat.\nQuestion: Where did the cat sit?\nAnswer:"


@pytest.fixture(scope="module")
def squad_patch(tiny_llama_dir, data_dir, tmp_path_factory):
    """A squad patch of layer 2 whose large steps move the weights a lot (so the answers differ)."""
    config = TuneConfig(task="squad", data_dir=str(data_dir), model=str(tiny_llama_dir), layers="2", steps=2,
                        batch_size=4, eval_every=2, num_train=8, num_dev=0, num_test=2, max_length=256,
                        max_new_tokens=6).replace(lr=1.0, eps=1e-1)
    out = tmp_path_factory.mktemp("squad") / "patch"
    tune(config, out, progress=False, record_paths=True)
    return out


def greedy(model, tokenizer, prompt: str, stop=("\n",), max_new_tokens: int = 6) -> str:
    generator = Generator(tokenizer, stop=stop, max_new_tokens=max_new_tokens)
    batch = encode_prompts(tokenizer, [Example(prompt, ("",), 0)], max_length=256 + max_new_tokens,
                           max_new_tokens=max_new_tokens)
    return generator.generate(model, batch)[0]


def test_the_answers_are_the_base_and_the_patched_models_own_greedy_answers(squad_patch, tiny_llama_dir):
    pieces: dict[str, list[str]] = {}
    result = compare_generations(squad_patch, PROMPT, max_new_tokens=12, stop=[],
                                 on_token=lambda label, text: pieces.setdefault(label, []).append(text))
    base = load_model(str(tiny_llama_dir))
    assert result.base.text == greedy(base.model, base.tokenizer, PROMPT, stop=(), max_new_tokens=12)
    model, tokenizer = layerzo.load(str(tiny_llama_dir), squad_patch)
    assert result.patched.text == greedy(model, tokenizer, PROMPT, stop=(), max_new_tokens=12)
    assert result.changed and result.base.text != result.patched.text
    assert result.layers == (2,) and result.patched.label == "patched (layer 2)" and result.base.label == "base"
    assert result.base_model == str(tiny_llama_dir) and result.prompt == PROMPT and result.stop == ()
    # streamed: each model's pieces, in order, starting with "" and joining to its final text
    assert list(pieces) == ["base", "patched (layer 2)"]
    assert pieces["base"][0] == "" and "".join(pieces["base"]) == result.base.text
    assert "".join(pieces["patched (layer 2)"]) == result.patched.text
    assert len(pieces["base"]) > 2  # token by token, not at the end
    assert 1 <= result.base.num_tokens <= 12 and result.to_dict()["changed"] is True


def test_the_defaults_come_from_the_patch(squad_patch):
    patch = LayerPatch.from_pretrained(squad_patch)
    assert task_stop(patch.manifest.recipe) == (("\n",), None)  # squad stops at the first newline
    assert patch_max_new_tokens(patch) == 6
    result = compare_generations(patch, PROMPT)  # the base: the recorded local path
    assert result.stop == ("\n",) and result.max_new_tokens == 6
    assert "\n" not in result.base.text and "\n" not in result.patched.text
    assert result.base.num_tokens <= 6


def with_base(patch: LayerPatch, base_model: str, model: str | None) -> LayerPatch:
    m = patch.manifest
    return LayerPatch(dataclasses.replace(m, base_model=base_model, recipe={**m.recipe, "model": model}),
                      patch.tensors)


def test_patch_base_is_the_recorded_base(squad_patch, tiny_llama_dir):
    patch = LayerPatch.from_pretrained(squad_patch)
    assert patch_base(patch) == str(tiny_llama_dir)  # tuned with record_paths: the path
    assert patch_base(with_base(patch, DEMO_MODEL_ID, None)) is None  # made on the demo: load_model(None)
    assert patch_base(with_base(patch, DEMO_MODEL_ID, "SmolLM2-135M-Instruct.Q4_1.gguf")) is None  # the demo's file
    assert patch_base(with_base(patch, DEMO_MODEL_ID, DEMO_MODEL_ID)) == DEMO_MODEL_ID  # the Hub's SmolLM2
    assert patch_base(with_base(patch, "org/model", "org/model")) == "org/model"
    with pytest.raises(ModelLoadError) as err:  # a local base recorded by its folder name only
        patch_base(with_base(patch, "tiny-llama-xyz", "tiny-llama-xyz"))
    assert err.value.one_line() == ("the patch was made on the local model 'tiny-llama-xyz', which is not here "
                                    "(give the base with --model PATH)")


def test_an_unknown_task_gives_no_stop_and_a_note():
    stop, note = task_stop({"task": "my_task.yaml"})
    assert stop == () and "my_task.yaml is not here" in note
    assert task_stop({"task": "sst2"}) == ((), None) and task_stop({}) == ((), None)


def test_chat_renders_one_user_turn_and_stops_at_the_end_of_turn(squad_patch):
    result = compare_generations(squad_patch, "Hi there", chat=True, max_new_tokens=4)
    assert result.chat and "Hi there" in result.prompt and result.prompt != "Hi there"
    assert result.prompt.rstrip().endswith("assistant")  # the generation prompt
    assert result.stop == ("<|im_end|>",)


def test_chat_without_a_template_is_one_line(squad_patch, tiny_llama_dir, tmp_path):
    bare = shutil.copytree(tiny_llama_dir, tmp_path / "bare")
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ConfigError, match="--chat needs a chat template, and the tokenizer of .* has none"):
        compare_generations(squad_patch, "Hi", model=str(bare), chat=True)


def test_an_empty_prompt_and_a_wrong_base_are_refused(squad_patch, tiny_llama_dir, tmp_path):
    for prompt in ("", "  \n"):
        with pytest.raises(ConfigError, match="the prompt is empty"):
            compare_generations(squad_patch, prompt)
    other = tmp_path / "other"  # same architecture and shapes, other weights
    make_tiny_model("llama", num_layers=4, seed=7).save_pretrained(other)
    for f in tiny_llama_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, other / f.name)
    with pytest.raises(BaseMismatchError, match="differs from the one the patch was made from"):
        compare_generations(squad_patch, PROMPT, model=str(other))


def test_streaming_holds_back_half_characters_and_stop_string_starts(tokenizer):
    assert held_back("abc\ufffd", ()) == "abc"
    assert held_back("answer ##", ("###",)) == "answer " and held_back("answer #", ("\n",)) == "answer #"
    generator = Generator(tokenizer, stop=("\n",), max_new_tokens=8)
    ids = tokenizer.encode(" 猫が好き 𝔘𝔫𝔦 done")  # byte-level tokens: a prefix may end in half a character
    assert any("\ufffd" in tokenizer.decode(ids[:i]) for i in range(1, len(ids)))
    shown: list[str] = []
    stream = TextStream(generator, shown.append)
    for i in ids:
        stream.step([i])
    stream.show(generator.text(ids))
    assert "".join(shown) == generator.text(ids) and not any("\ufffd" in piece for piece in shown)


def test_patched_label_names_the_layers():
    assert patched_label([11]) == "patched (layer 11)" and patched_label([2, 3]) == "patched (layers 2,3)"


def test_parse_stop_reads_backslash_escapes():
    assert parse_stop(["\\n", "a\\tb", "\\\\n", "", "###"]) == ("\n", "a\tb", "\\n", "", "###")


# ----------------------------------------------------------------------------- the CLI


def cli(*args) -> CliRunner.Result:
    from layerzo.cli.main import app

    return CliRunner().invoke(app, ["generate", *map(str, args)])


def one_error_line(result) -> str:
    """Exit code 1, no traceback, and ONE error line, the last on stderr (progress lines may come before it)."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr
    return errors[0]


def test_cli_streams_both_answers_under_their_headers(squad_patch):
    result = cli("--patch", squad_patch, "--max-new-tokens", "12", "--stop", "", PROMPT)
    assert result.exit_code == 0, result.output
    want = compare_generations(squad_patch, PROMPT, max_new_tokens=12, stop=[""])
    assert result.stdout == f"base:\n{want.base.text}\npatched (layer 2):\n{want.patched.text}\n"


def test_cli_json_is_one_object_with_both_answers(squad_patch):
    result = cli("--patch", squad_patch, "--json", PROMPT)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["stop"] == ["\n"] and data["max_new_tokens"] == 6 and data["layers"] == [2]
    assert data["base"]["label"] == "base" and data["patched"]["label"] == "patched (layer 2)"
    assert {"text", "num_tokens", "stopped"} <= set(data["base"]) and isinstance(data["changed"], bool)


def test_cli_refusals_are_one_line(squad_patch, tiny_llama_dir, tmp_path):
    assert "the prompt is empty" in one_error_line(cli("--patch", squad_patch, ""))
    assert str(tmp_path / "nosuch") in one_error_line(cli("--patch", tmp_path / "nosuch", PROMPT))
    bare = shutil.copytree(tiny_llama_dir, tmp_path / "bare")
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    line = one_error_line(cli("--patch", squad_patch, "--model", bare, "--chat", "Hi"))
    assert "--chat needs a chat template" in line and "drop --chat" in line
