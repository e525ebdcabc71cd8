"""layerzo eval: offline lm-eval task files, the harness run on base and base + patch,
the report (table rows, JSON, model-card section) and the CLI's one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import make_tiny_model
from layerzo.errors import EvalError
from layerzo.eval.report import (
    CARD_SECTION_TITLE,
    PER_TOKEN_METRIC,
    EvalReport,
    Metric,
    TaskResult,
    card_section,
    replace_section,
    save_json,
    write_card_section,
)
from layerzo.eval.tasks import (
    check_data_dir,
    check_harness_tasks,
    harness_task_name,
    parse_tasks,
    write_task_dir,
)
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


# ------------------------------------------------------------------ task names and files


def test_parse_tasks_splits_layerzo_and_harness_names():
    sel = parse_tasks("sst2, layerzo_rte,hellaswag,SST2,,arc_easy")
    assert sel.offline == ("sst2", "rte")
    assert sel.harness == ("hellaswag", "arc_easy")
    assert sel.harness_names == ("layerzo_sst2", "layerzo_rte", "hellaswag", "arc_easy")
    assert sel.display_name("layerzo_rte") == "rte" and sel.display_name("hellaswag") == "hellaswag"
    with pytest.raises(EvalError, match="no tasks"):
        parse_tasks(" , ")


@pytest.mark.parametrize("name, suggestion", [("sst3", "sst2"), ("hellaswg", "hellaswag"), ("mulitrc", "multirc")])
def test_unknown_task_suggests_the_closest_name(name, suggestion):
    with pytest.raises(EvalError, match=f"unknown task '{name}'; did you mean '{suggestion}'"):
        check_harness_tasks([name], known={"hellaswag", "arc_easy", "layerzo_sst2"})
    check_harness_tasks(["hellaswag"], known={"hellaswag"})  # known names pass


def test_missing_split_is_named(tmp_path):
    (tmp_path / "rte").mkdir()
    (tmp_path / "rte" / "train.jsonl").write_text("{}\n")
    with pytest.raises(EvalError, match=r"no rte/validation\.jsonl"):
        check_data_dir(["rte"], tmp_path)
    with pytest.raises(EvalError, match="does not exist"):
        check_data_dir(["rte"], tmp_path / "nowhere")


def test_task_files_point_to_absolute_data_files(tmp_path, small_data_dir):
    from lm_eval.tasks._yaml_loader import load_yaml

    out = write_task_dir(["sst2", "copa"], tmp_path / "tasks", data_dir=small_data_dir, seed=3, num_test=7)
    cfg = load_yaml(out / "layerzo_copa.yaml", resolve_func=False)
    assert cfg["task"] == harness_task_name("copa") == "layerzo_copa"
    files = cfg["dataset_kwargs"]["data_files"]
    assert Path(files["validation"]).is_absolute() and Path(files["validation"]) == small_data_dir.resolve() / "copa/validation.jsonl"
    assert cfg["dataset_path"] == "json" and cfg["test_split"] == "validation"
    assert cfg["target_delimiter"] == "" and cfg["output_type"] == "multiple_choice"
    assert cfg["process_docs"].endswith("utils.process_docs_copa")
    assert json.loads((out / "layerzo_eval.json").read_text()) == {
        "data_dir": str(small_data_dir.resolve()), "seed": 3, "num_test": 7}
    assert not (out / "layerzo_rte.yaml").exists()  # only the asked-for tasks


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


# ------------------------------------------------------------------ report, JSON, card


def _report(patched: bool = True) -> EvalReport:
    def result(acc: float) -> dict[str, TaskResult]:
        return {"sst2": TaskResult("sst2", "layerzo_sst2", 200, {"acc": Metric(acc, 0.03), PER_TOKEN_METRIC: Metric(acc)})}

    return EvalReport(tasks=("sst2",), base_model="tiny/llama", base=result(0.5), patched=result(0.75) if patched else None,
                      settings={"limit": 200, "num_fewshot": 0, "seed": 0}, lm_eval_version="0.4.x",
                      layerzo_version="0.1.0")


def test_report_rows_and_json(tmp_path):
    rows = _report().rows()
    assert [(r.task, r.metric) for r in rows] == [("sst2", "acc"), ("sst2", PER_TOKEN_METRIC)]
    assert rows[0].delta == pytest.approx(0.25)
    assert _report(patched=False).rows()[0].delta is None
    data = json.loads(save_json(_report(), tmp_path / "r.json").read_text())
    assert data["results"]["sst2"]["metrics"]["acc"] == {
        "base": 0.5, "base_stderr": 0.03, "patched": 0.75, "patched_stderr": 0.03, "delta": 0.25}
    assert data["limit"] == 200 and data["lm_eval_version"] == "0.4.x"


def test_card_section_is_added_once_and_replaced(tmp_path):
    card = tmp_path / "README.md"
    card.write_text("---\nlicense: apache-2.0\n---\n# patch\n\nintro\n\n## Usage\n\nuse it\n")
    write_card_section(card, _report())
    first = card.read_text()
    assert first.count(CARD_SECTION_TITLE) == 1 and "## Usage\n\nuse it" in first and "0.7500" in first
    write_card_section(card, _report(patched=False))
    second = card.read_text()
    assert second.count(CARD_SECTION_TITLE) == 1 and "0.7500" not in second
    assert second.startswith(first[: first.index(CARD_SECTION_TITLE)])
    # a section in the middle keeps what follows it
    middle = replace_section(f"# t\n\n{CARD_SECTION_TITLE}\n\nold\n\n## Next\n\nkeep\n", card_section(_report()))
    assert "old" not in middle and middle.endswith("## Next\n\nkeep\n")


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
