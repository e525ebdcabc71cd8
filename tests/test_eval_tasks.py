"""layerzo eval's task handling: splitting names into layerzo and harness tasks, suggestions for
unknown names, data-dir checks, the task folder written for the harness, and the hooks (utils.py)
of the generative tasks."""

from __future__ import annotations

import importlib.util
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
from layerzo.data.tasks import load_task
from test_eval_harness import FIXTURES, small_data_dir  # noqa: F401  (fixture)


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
        "data_dir": str(small_data_dir.resolve()), "seed": 3, "num_test": 7, "max_new_tokens": 50}
    assert not (out / "layerzo_rte.yaml").exists()  # only the asked-for tasks


def test_a_data_dir_that_is_a_file_says_so(tmp_path):
    (tmp_path / "data").write_text("x")
    with pytest.raises(EvalError, match="data dir .* is a file, not a folder"):
        check_data_dir(["rte"], tmp_path / "data")


# ------------------------------------------------------------------ generative tasks


def test_generative_tasks_are_layerzo_tasks():
    sel = parse_tasks("squad,layerzo_drop,sst2,drop_harness_task")
    assert sel.offline == ("squad", "drop", "sst2") and sel.generative == ("squad", "drop")
    assert sel.harness == ("drop_harness_task",)
    assert sel.harness_names[:2] == ("layerzo_squad", "layerzo_drop")
    with pytest.raises(EvalError, match="unknown task 'squda'; did you mean 'squad'"):
        check_harness_tasks(["squda"], known={"hellaswag"})


def test_generative_data_files_are_their_json_documents(tmp_path):
    (tmp_path / "squad").mkdir()
    (tmp_path / "squad" / "train.json").write_text("{}")
    with pytest.raises(EvalError, match=r"no squad/validation\.json \(needed by task squad\)"):
        check_data_dir(["squad"], tmp_path)
    with pytest.raises(EvalError, match=r"no drop/drop_dataset_train\.json"):
        check_data_dir(["drop"], tmp_path)
    check_data_dir(["drop"], FIXTURES)


def test_generative_task_files(tmp_path):
    """generate_until on layerzo's rows (custom_dataset, no harness data keys), greedy until the
    task's stop, this run's max_gen_toks, scored by utils.process_results_qa as f1 and em."""
    from lm_eval.tasks._yaml_loader import load_yaml

    out = write_task_dir(["squad", "drop"], tmp_path / "tasks", data_dir=FIXTURES, seed=0, num_test=5,
                         max_new_tokens=7)
    assert json.loads((out / "layerzo_eval.json").read_text())["max_new_tokens"] == 7
    for task in ("squad", "drop"):
        cfg = load_yaml(out / f"{harness_task_name(task)}.yaml", resolve_func=False)
        assert cfg["task"] == f"layerzo_{task}" and cfg["output_type"] == "generate_until"
        assert cfg["generation_kwargs"] == {"until": ["\n"], "do_sample": False, "num_beams": 1,
                                            "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "max_gen_toks": 7}
        assert cfg["custom_dataset"].endswith(f"utils.dataset_{task}") and "dataset_path" not in cfg
        assert cfg["process_results"].endswith("utils.process_results_qa")
        assert [m["metric"] for m in cfg["metric_list"]] == ["f1", "em"]
        assert cfg["test_split"] == "validation" and cfg["fewshot_split"] == "train"
        assert cfg["target_delimiter"] == " " and cfg["fewshot_delimiter"] == "\n\n"  # MeZO's demos


def _hooks(task_dir: Path):
    """The utils.py written into ``task_dir``, imported as the harness imports it (by path)."""
    spec = importlib.util.spec_from_file_location(f"layerzo_hooks_{task_dir.parent.name}", task_dir / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generative_hooks_build_layerzo_s_rows_and_scores(tmp_path):
    out = write_task_dir(["drop"], tmp_path / "tasks", data_dir=FIXTURES, seed=0, num_test=5)
    hooks = _hooks(out)
    docs = hooks.dataset_drop(version=1.0)  # the harness passes the task's metadata
    splits = load_task("drop", FIXTURES, num_test=5, seed=0)
    for split, examples in (("validation", splits.test), ("train", splits.train)):
        assert [(d["context"], d["answers"], d["target"], d["source"]) for d in docs[split]] == [
            (e.context, list(e.answers), e.candidates[0], e.source) for e in examples]
    doc = docs["validation"][0]
    assert hooks.doc_to_text(doc) == splits.test[0].context and hooks.doc_to_answer(doc) == splits.test[0].answers[0]
    golds = {"answers": ["Denver Broncos", "the Broncos"]}
    assert hooks.process_results_qa(golds, [" The Broncos."]) == {"f1": 1.0, "em": 1.0}  # max over the golds
    assert hooks.process_results_qa(golds, [" Denver"]) == {"f1": pytest.approx(2 / 3), "em": 0.0}
    assert hooks.process_results_qa(golds, [""]) == {"f1": 0.0, "em": 0.0}
