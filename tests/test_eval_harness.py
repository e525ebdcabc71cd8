"""layerzo eval: the harness run on base and base + patch (layerzo's prompts and scores, for the
multiple-choice and the generative tasks), the seed taken from the patch, and the CLI's one-line
errors. ``small_data_dir`` is shared with test_eval_tasks."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import make_tiny_model, tiny_config
from layerzo.eval.harness import resolve_seed
from layerzo.eval.report import CARD_SECTION_TITLE, PER_TOKEN_METRIC
from layerzo.eval.tasks import harness_task_name
from layerzo.data.tasks import TASK_NAMES, load_task
from patch_helpers import make_patch

FIXTURES = Path(__file__).parent / "fixtures"
ROWS = 24  # rows per split copied into the small data dir


@pytest.fixture(scope="module")
def small_data_dir(tmp_path_factory, data_dir) -> Path:
    """All eight tasks, a few rows each: the shared data's first rows, BoolQ/MultiRC from tests/fixtures."""
    out = tmp_path_factory.mktemp("eval-data")
    for task in TASK_NAMES:
        src = data_dir / task if (data_dir / task).is_dir() else FIXTURES / task
        (out / task).mkdir()
        for split in ("train", "validation"):
            lines = (src / f"{split}.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
            (out / task / f"{split}.jsonl").write_text("".join(lines[:ROWS]), encoding="utf-8")
    return out


# ------------------------------------------------------------------ the harness builds layerzo's prompts


def test_every_offline_task_runs_layerzo_prompts_through_the_harness(small_data_dir, tokenizer):
    """Each task's documents, requests (context, continuation) and targets are layerzo's own
    examples for the same rows, and the harness' log-likelihoods give layerzo's scores."""
    import torch

    from layerzo.eval.harness import EvalConfig, make_lm, run_harness, task_manager, validate_tasks
    from layerzo.data.scoring import candidate_scores, encode_batch, encode_pair

    model = make_tiny_model("llama", num_layers=2)
    config = EvalConfig(tasks=TASK_NAMES, data_dir=str(small_data_dir), limit=3, batch_size=8, seed=1)
    selection = validate_tasks(config)
    with task_manager(selection, config) as manager:
        run = run_harness(make_lm(model, tokenizer, batch_size=8), tokenizer, selection, manager, config)

    for task in TASK_NAMES:
        examples = load_task(task, small_data_dir, num_test=3, seed=1).test
        samples = sorted(run.samples[harness_task_name(task)], key=lambda s: s["doc_id"])
        assert len(samples) == len(examples) == run.results[task].num_samples == 3
        for sample, ex in zip(samples, examples):
            assert [tuple(a) for a in sample["arguments"]] == [(ex.context, c) for c in ex.candidates], task
            assert sample["target"] == ex.label
            assert sample["doc"]["source"].endswith(ex.source.rsplit("/", 1)[-1])  # same file and line
            lls = torch.tensor([float(r[0]) for r in sample["filtered_resps"]])
            ntok = torch.tensor([len(encode_pair(tokenizer, ex.context, c)[1]) for c in ex.candidates])
            ours = candidate_scores(model, encode_batch(tokenizer, [ex]))[0, : len(ex.candidates)]
            torch.testing.assert_close(lls / ntok, ours, atol=1e-4, rtol=1e-4)
        metrics = run.results[task].metrics
        assert {"acc", "acc_norm", PER_TOKEN_METRIC} <= set(metrics)
        if all(len(encode_pair(tokenizer, e.context, c)[1]) == 1 for e in examples for c in e.candidates):
            assert metrics["acc"].value == metrics[PER_TOKEN_METRIC].value  # one token: sum == mean
    assert run.results["sst2"].metrics["acc"].value == run.results["sst2"].metrics[PER_TOKEN_METRIC].value


# ------------------------------------------------------------------ the seed


def _with_recipe(recipe: dict):
    """Just what resolve_seed reads of a LayerPatch."""
    return types.SimpleNamespace(manifest=types.SimpleNamespace(recipe=recipe))


def test_resolve_seed_prefers_the_given_seed_then_the_patch_recipe():
    assert resolve_seed(None) == 0
    assert resolve_seed(5) == 5
    assert resolve_seed(None, make_patch(make_tiny_model("llama", num_layers=2), layer=1)) == 0  # no seed recorded
    assert resolve_seed(None, _with_recipe({"seed": 7})) == 7
    assert resolve_seed(3, _with_recipe({"seed": 7})) == 3 and resolve_seed(0, _with_recipe({"seed": 7})) == 0
    for bad in (-1, "7", True, 2.0):  # not an integer >= 0: as if absent
        assert resolve_seed(None, _with_recipe({"seed": bad})) == 0, bad


# ------------------------------------------------------------------ the CLI


def _cli(*args: str):
    from layerzo.cli.main import app

    return CliRunner().invoke(app, ["eval", *args])


def _one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr  # one line, and last
    return errors[0]


def test_cli_base_and_patch_one_command(tmp_path, tiny_llama_dir, small_data_dir):
    patch = make_patch(make_tiny_model("llama", num_layers=4, seed=1), layer=2, scale=0.5)
    patch_dir = patch.save_pretrained(tmp_path / "patch")
    before = sorted(p.name for p in tiny_llama_dir.iterdir())
    result = _cli("--model", str(tiny_llama_dir), "--patch", str(patch_dir), "--tasks", "sst2,copa",
                  "--data-dir", str(small_data_dir), "--limit", "4", "--batch-size", "4", "--json",
                  "--output", str(tmp_path / "out.json"), "--write-card")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report == json.loads((tmp_path / "out.json").read_text())
    assert report["tasks"] == ["sst2", "copa"] and report["limit"] == 4 and report["seed"] == 0
    assert report["patch"]["base_fingerprint"] == patch.manifest.base_fingerprint
    for task in ("sst2", "copa"):
        assert report["results"][task]["num_samples"] == 4
        acc = report["results"][task]["metrics"]["acc"]
        assert acc["delta"] == pytest.approx(acc["patched"] - acc["base"])
    assert "delta" in result.stderr and PER_TOKEN_METRIC in result.stderr  # the table
    assert CARD_SECTION_TITLE in (patch_dir / "README.md").read_text()
    assert sorted(p.name for p in tiny_llama_dir.iterdir()) == before  # nothing merged on disk
    from layerzo.patch.format import LayerPatch

    LayerPatch.from_pretrained(patch_dir)  # the card edit keeps the patch loadable


def test_cli_unknown_task_one_line(monkeypatch, small_data_dir):
    import lm_eval.tasks

    class FakeRegistry:  # the real harness index takes ~25 s to build
        def __init__(self, include_path=None, include_defaults=True, **_):
            self.all_tasks = ["hellaswag", "arc_easy"] + (["layerzo_sst2"] if include_path else [])

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", FakeRegistry)
    line = _one_error_line(_cli("--tasks", "sst2,hellaswg", "--data-dir", str(small_data_dir)))
    assert "unknown task 'hellaswg'; did you mean 'hellaswag'?" in line


def test_cli_missing_split_one_line(tmp_path, small_data_dir):
    shutil.copytree(small_data_dir / "rte", tmp_path / "rte")
    (tmp_path / "rte" / "validation.jsonl").unlink()
    line = _one_error_line(_cli("--tasks", "rte", "--data-dir", str(tmp_path)))
    assert "rte/validation.jsonl" in line


def test_cli_patch_for_another_base_one_line(tmp_path, tiny_llama_dir, small_data_dir):
    other = make_patch(make_tiny_model("llama", num_layers=4, seed=2), layer=1)
    patch_dir = other.save_pretrained(tmp_path / "other")
    line = _one_error_line(_cli("--model", str(tiny_llama_dir), "--patch", str(patch_dir), "--tasks", "sst2",
                                "--data-dir", str(small_data_dir), "--limit", "2"))
    assert "differs from the one the patch was made from" in line


def test_write_card_needs_a_local_patch(small_data_dir):
    line = _one_error_line(_cli("--tasks", "sst2", "--data-dir", str(small_data_dir), "--write-card"))
    assert "--write-card needs --patch" in line


def test_a_seed_the_harness_cannot_take_is_refused_up_front():
    from layerzo.errors import EvalError
    from layerzo.eval.harness import EvalConfig

    EvalConfig(tasks=("sst2",), seed=2**32 - 1)
    with pytest.raises(EvalError, match=r"--seed must be an integer from 0 to 2\*\*32 - 1"):
        EvalConfig(tasks=("sst2",), seed=2**32)


def test_an_output_that_cannot_be_written_fails_before_the_model_loads(tmp_path, tiny_llama_dir, small_data_dir,
                                                                       monkeypatch):
    import layerzo.model.loading as loading

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded although the report cannot be saved")

    monkeypatch.setattr(loading, "load_model", no_loading)
    (tmp_path / "folder").mkdir()
    line = _one_error_line(_cli("--model", str(tiny_llama_dir), "--tasks", "sst2", "--data-dir", str(small_data_dir),
                                "--output", str(tmp_path / "folder")))
    assert "is a folder, not a file" in line
    line = _one_error_line(_cli("--model", str(tiny_llama_dir), "--tasks", "sst2", "--data-dir", str(small_data_dir),
                                "--output", str(tiny_llama_dir / "report.json")))
    assert "sits inside the input" in line



# ------------------------------------------------------------------ generative tasks: lm-eval generates what layerzo does

GEN_TOKENS = 6  # --max-new-tokens of these tests
QA_ROWS = 8  # --limit: load_task(num_test=8).test
NEWLINE, EOS = 198, 2  # the demo tokenizer's "\n" and <|im_end|> (also the tiny models' generation_config EOS)


def lively_model():
    """A random 2-layer Llama whose greedy answers differ per prompt and end all three ways.

    make_tiny_model's init (std 0.02) answers "::::::" to every prompt, so two decoders could agree by
    accident; std 0.2 gives prompt-dependent junk, and boosting the output rows of "\n" and EOS makes
    some answers stop at the newline, some at EOS and some at max_new_tokens.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama", num_layers=2)
    config.initializer_range, config.tie_word_embeddings = 0.2, False  # untied: the boost leaves the inputs be
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval().requires_grad_(False)
    with torch.no_grad():
        model.lm_head.weight[NEWLINE] *= 3
        model.lm_head.weight[EOS] *= 2
    return model


def lively_patch():
    return make_patch(lively_model(), layer=1, scale=0.5)


def layerzo_answers(model, tokenizer, examples, *, stop, max_length: int, max_new_tokens: int = GEN_TOKENS):
    """layerzo's Generator on ``examples``: (generator, new token ids per example), batched as
    GenerativeEvalSet batches (by prompt length in characters, 3 a batch; lm-eval: by tokens, 4)."""
    from layerzo.data.generation import Generator, encode_prompts

    generator = Generator(tokenizer, stop=stop, max_new_tokens=max_new_tokens)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].context))
    ids: list = [None] * len(examples)
    for start in range(0, len(order), 3):
        chunk = order[start:start + 3]
        batch = encode_prompts(tokenizer, [examples[i] for i in chunk], max_length=max_length,
                               max_new_tokens=max_new_tokens)
        for i, row in zip(chunk, generator.generate_ids(model, batch)):
            ids[i] = row
    return generator, ids


def tune_scores(model, tokenizer, splits, max_length: int, max_new_tokens: int = GEN_TOKENS) -> dict:
    """What `layerzo tune` reports as test f1 / em on these rows."""
    from layerzo.data.generation import Generator
    from layerzo.model.layers import find_layer_layout
    from layerzo.tune.batches import GenerativeEvalSet

    generator = Generator(tokenizer, stop=splits.stop, max_new_tokens=max_new_tokens)
    test = GenerativeEvalSet(tokenizer, splits.test, batch_size=3, max_length=max_length, generator=generator)
    return test.evaluate(model, find_layer_layout(model), 0)


def real_source(source: str) -> str:
    """``"path: data[i]..."`` with the path resolved: the harness reads the data through resolved paths,
    while the data_dir fixture may reach it through a symlink."""
    path, sep, rest = source.partition(": ")
    return os.path.realpath(path) + sep + rest


def check_generations(run, task: str, model, tokenizer, splits, max_length: int,
                      max_new_tokens: int = GEN_TOKENS) -> list[list[int]]:
    """The harness' documents, prompts, generated TEXTS and f1 / em are layerzo's; returns layerzo's token ids."""
    from layerzo.data.metrics import best_exact_match, best_f1

    samples = sorted(run.samples[harness_task_name(task)], key=lambda s: s["doc_id"])
    generator, ids = layerzo_answers(model, tokenizer, splits.test, stop=splits.stop, max_length=max_length,
                                     max_new_tokens=max_new_tokens)
    texts = [generator.text(row) for row in ids]
    assert [real_source(s["doc"]["source"]) for s in samples] == [real_source(e.source) for e in splits.test]
    assert [s["arguments"][0][0] for s in samples] == [e.context for e in splits.test]  # the prompt, as is
    assert [s["filtered_resps"][0] for s in samples] == texts  # every generation, to the character
    for s, e, text in zip(samples, splits.test, texts):
        assert s["doc"]["answers"] == list(e.answers)
        assert (s["f1"], s["em"]) == (best_f1(text, e.answers), best_exact_match(text, e.answers))
    metrics, tune = run.results[task].metrics, tune_scores(model, tokenizer, splits, max_length, max_new_tokens)
    assert set(metrics) == {"f1", "em"} and run.results[task].num_samples == len(splits.test)
    assert metrics["f1"].value == pytest.approx(tune["f1"], abs=1e-12)
    assert metrics["em"].value == pytest.approx(tune["em"], abs=1e-12)
    return ids


@pytest.fixture(scope="module")
def qa_data_dir(tmp_path_factory, data_dir, tokenizer) -> Path:
    """SQuAD with the gold answers of the 8 test questions rebuilt around lively_model's own answers.

    The real golds would score its junk 0, which any pair of decoders matches; these golds give
    exact matches (up to SQuAD normalization), partial F1 and max-over-golds cases instead.
    The test rows are the same (load_task draws them by count, not content).
    """
    out = tmp_path_factory.mktemp("qa-data")
    (out / "squad").mkdir()
    shutil.copyfile(data_dir / "squad" / "train.json", out / "squad" / "train.json")
    document = json.loads((data_dir / "squad" / "validation.json").read_text(encoding="utf-8"))
    splits = load_task("squad", data_dir, num_test=QA_ROWS, seed=0)
    generator, ids = layerzo_answers(lively_model(), tokenizer, splits.test, stop=splits.stop, max_length=512)
    for i, (example, row) in enumerate(zip(splits.test, ids)):
        answer = generator.text(row).strip()
        words = answer.split() or [""]
        golds = [[f"The {answer}!"], [f"{words[0]} and other words"], [], [example.answers[0], answer]][i % 4]
        golds = [g for g in golds if g.strip(" !")] or list(example.answers)
        a, p, q = map(int, re.search(r"data\[(\d+)\]\.paragraphs\[(\d+)\]\.qas\[(\d+)\]", example.source).groups())
        document["data"][a]["paragraphs"][p]["qas"][q]["answers"] = [{"text": g, "answer_start": 0} for g in golds]
    (out / "squad" / "validation.json").write_text(json.dumps(document), encoding="utf-8")
    return out


@pytest.mark.parametrize("max_length", [512, 96])
def test_squad_generations_and_scores_are_layerzo_s(qa_data_dir, tokenizer, max_length):
    """lm-eval's generate_until on layerzo_squad reproduces layerzo's Generator, base and base + patch:
    the same prompt per document, the same generated text to the character, and f1 / em equal to
    layerzo's metrics per document and to tune's GenerativeEvalSet over the rows.

    Covered: answers ending at "\n", at EOS and at max_new_tokens; max_length 96 left-truncates each of
    these prompts (all longer than 90 tokens) to 90 tokens in both; the two sides batch the rows
    differently (lm-eval: 4 a batch by descending token count; layerzo: 3 by character count), so
    each row is padded differently - in float32 on CPU no greedy choice flips because of it.
    """
    from layerzo.data.generation import encode_prompts
    from layerzo.eval.harness import EvalConfig, make_lm, run_harness, task_manager, validate_tasks
    from layerzo.patch.merge import apply_to_model

    model = lively_model()
    config = EvalConfig(tasks=("squad",), data_dir=str(qa_data_dir), limit=QA_ROWS, batch_size=4,
                        max_new_tokens=GEN_TOKENS, max_length=max_length)
    splits = load_task("squad", qa_data_dir, num_test=QA_ROWS, seed=0)
    truncated = encode_prompts(tokenizer, splits.test, max_length=max_length, max_new_tokens=GEN_TOKENS).truncated
    assert truncated == (QA_ROWS if max_length == 96 else 0)
    selection = validate_tasks(config)
    with task_manager(selection, config) as manager:
        lm = make_lm(model, tokenizer, batch_size=4, max_length=max_length)
        base_ids = check_generations(run_harness(lm, tokenizer, selection, manager, config), "squad", model,
                                     tokenizer, splits, max_length)
        apply_to_model(model, lively_patch())  # in place: the harness holds this very model
        patched_ids = check_generations(run_harness(lm, tokenizer, selection, manager, config), "squad", model,
                                        tokenizer, splits, max_length)
    assert patched_ids != base_ids  # the patch changed what is generated: the second check is not the first again
    endings = {"newline" if r[-1] == NEWLINE else "eos" if r[-1] == EOS else "length" for r in base_ids + patched_ids}
    assert endings == {"newline", "eos", "length"}
    assert all(len(r) == GEN_TOKENS for r in base_ids + patched_ids if r[-1] not in (NEWLINE, EOS))


def test_drop_fixture_generations_are_layerzo_s(tokenizer):
    """DROP from its original files (tests/fixtures/drop): every dev question, each with all its golds."""
    from layerzo.eval.harness import EvalConfig, make_lm, run_harness, task_manager, validate_tasks

    model = lively_model()
    config = EvalConfig(tasks=("drop",), data_dir=str(FIXTURES), batch_size=4, max_new_tokens=GEN_TOKENS)
    splits = load_task("drop", FIXTURES, num_test=config.num_test, seed=0)
    assert len(splits.test) == 2 and any(len(e.answers) > 1 for e in splits.test)
    selection = validate_tasks(config)
    with task_manager(selection, config) as manager:
        lm = make_lm(model, tokenizer, batch_size=4, max_length=config.max_length)
        run = run_harness(lm, tokenizer, selection, manager, config)
    check_generations(run, "drop", model, tokenizer, splits, max_length=config.max_length)


@pytest.mark.demo
def test_demo_squad_answers_are_layerzo_s(demo_model, data_dir):
    """SmolLM2-135M's real answers (F1 about 0.13 on these 8 rows, 12 tokens), lm-eval vs layerzo."""
    from layerzo.eval.harness import EvalConfig, make_lm, run_harness, task_manager, validate_tasks

    model, tokenizer = demo_model.model, demo_model.tokenizer
    config = EvalConfig(tasks=("squad",), data_dir=str(data_dir), limit=QA_ROWS, batch_size=4, max_new_tokens=12)
    splits = load_task("squad", data_dir, num_test=QA_ROWS, seed=0)
    selection = validate_tasks(config)
    with task_manager(selection, config) as manager:
        run = run_harness(make_lm(model, tokenizer, batch_size=4, max_length=config.max_length), tokenizer,
                          selection, manager, config)
    check_generations(run, "squad", model, tokenizer, splits, config.max_length, max_new_tokens=12)
    assert run.results["squad"].metrics["f1"].value > 0  # real, partly right answers


@pytest.mark.parametrize("adds_bos", [False, True])
def test_the_harness_generates_from_layerzo_s_prompt_tokens(data_dir, tokenizer, adds_bos):
    """HFLM.tok_batch_encode (generate_until's prompt encoding, as make_lm configures it) gives every row
    the ids encode_prompts gives: tokenizer.encode(prompt) - with the BOS when the tokenizer adds one -
    left-truncated to max_length - max_new_tokens."""
    from tokenizers.processors import TemplateProcessing

    from layerzo.data.generation import encode_prompts
    from layerzo.eval.harness import make_lm

    tok = copy.deepcopy(tokenizer)
    if adds_bos:  # the demo tokenizer, made to add its BOS as Llama-2's does
        tok.backend_tokenizer.post_processor = TemplateProcessing(
            single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    examples = load_task("squad", data_dir, num_test=5, seed=0).test
    for max_length in (512, 96):
        lm = make_lm(make_tiny_model("llama", num_layers=2), tok, batch_size=5, max_length=max_length)
        ids, mask = lm.tok_batch_encode([e.context for e in examples], left_truncate_len=lm.max_length - GEN_TOKENS)
        ours = encode_prompts(tok, examples, max_length=max_length, max_new_tokens=GEN_TOKENS)
        rows = [r[m.bool()].tolist() for r, m in zip(ids, mask)]
        assert rows == [r[m.bool()].tolist() for r, m in zip(ours.input_ids, ours.attention_mask)]
        assert all((r[0] == tok.bos_token_id) == (adds_bos and max_length == 512) for r in rows)


@pytest.fixture(scope="module")
def lively_dir(tmp_path_factory, tokenizer_dir) -> Path:
    out = tmp_path_factory.mktemp("lively-llama")
    lively_model().save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


def test_cli_squad_reports_tune_s_f1_and_em_for_base_and_patch(tmp_path, lively_dir, qa_data_dir, tokenizer):
    """`layerzo eval --tasks squad --max-new-tokens 6`: the report's f1 / em (base, patched, delta)
    are tune's test f1 / em of the same model on the same rows."""
    from layerzo.patch.merge import apply_to_model

    patch_dir = lively_patch().save_pretrained(tmp_path / "patch")
    result = _cli("--model", str(lively_dir), "--patch", str(patch_dir), "--tasks", "squad", "--data-dir",
                  str(qa_data_dir), "--limit", str(QA_ROWS), "--max-new-tokens", str(GEN_TOKENS), "--batch-size", "4",
                  "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["max_new_tokens"] == GEN_TOKENS and report["max_length"] == 512
    metrics = report["results"]["squad"]["metrics"]
    assert set(metrics) == {"f1", "em"} and report["results"]["squad"]["num_samples"] == QA_ROWS
    splits = load_task("squad", qa_data_dir, num_test=QA_ROWS, seed=0)
    model = lively_model()
    base = tune_scores(model, tokenizer, splits, 512)
    apply_to_model(model, lively_patch())
    patched = tune_scores(model, tokenizer, splits, 512)
    assert 0 < base["em"] < 1 and 0 < base["f1"] < 1  # the rebuilt golds: neither all nor nothing
    for name in ("f1", "em"):
        assert metrics[name]["base"] == pytest.approx(base[name], abs=1e-12)
        assert metrics[name]["patched"] == pytest.approx(patched[name], abs=1e-12)
        assert metrics[name]["delta"] == pytest.approx(patched[name] - base[name], abs=1e-12)
        assert metrics[name]["base_stderr"] is not None
    assert any("greedy answers of at most 6 tokens" in note for note in report["notes"])


def test_generation_lengths_default_to_tune_s_and_are_checked():
    from layerzo.errors import EvalError
    from layerzo.eval.harness import EvalConfig, validate_tasks
    from layerzo.tune.config import TuneConfig

    config = EvalConfig(tasks=("squad",))
    assert (config.max_length, config.max_new_tokens) == (TuneConfig.max_length, TuneConfig.max_new_tokens)
    for bad in ({"max_new_tokens": 0}, {"max_length": 1}, {"max_new_tokens": 2.0}):
        with pytest.raises(EvalError, match=f"--{next(iter(bad)).replace('_', '-')} must be an integer"):
            EvalConfig(tasks=("squad",), **bad)
    with pytest.raises(EvalError, match=r"--max-length \(50\) must exceed --max-new-tokens \(50\)"):
        validate_tasks(EvalConfig(tasks=("squad",), max_length=50))


def test_layerzo_tasks_run_at_tune_s_max_length_the_harness_own_at_the_model_s():
    from layerzo.eval.harness import EvalConfig, harness_parts

    config = EvalConfig(tasks=("sst2,squad,gsm8k",), max_length=300)
    parts = [(part.harness_names, length) for part, length in harness_parts(config.selection, config)]
    assert parts == [(("layerzo_sst2", "layerzo_squad"), 300), (("gsm8k",), None)]
    assert [length for _, length in harness_parts(EvalConfig(tasks=("gsm8k",)).selection, config)] == [None]
