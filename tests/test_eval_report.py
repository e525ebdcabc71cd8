"""The eval report: table rows with deltas, the JSON file, and the model-card section."""

from __future__ import annotations

import json

import pytest

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
