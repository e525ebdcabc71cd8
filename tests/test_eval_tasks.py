"""layerzo eval's task handling: splitting names into layerzo and harness tasks, suggestions for
unknown names, data-dir checks, and the task folder written for the harness."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from layerzo.errors import EvalError
from layerzo.eval.tasks import (
    check_data_dir,
    check_harness_tasks,
    harness_task_name,
    parse_tasks,
    write_task_dir,
)
from test_eval_harness import small_data_dir  # noqa: F401  (fixture)


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


def test_a_data_dir_that_is_a_file_says_so(tmp_path):
    (tmp_path / "data").write_text("x")
    with pytest.raises(EvalError, match="data dir .* is a file, not a folder"):
        check_data_dir(["rte"], tmp_path / "data")
