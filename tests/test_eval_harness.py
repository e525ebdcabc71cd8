"""layerzo eval: the harness run on base and base + patch (layerzo's prompts and scores), the seed
taken from the patch, and the CLI's one-line errors. ``small_data_dir`` is shared with test_eval_tasks."""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import make_tiny_model
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
