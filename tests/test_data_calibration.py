"""Calibration texts for profiling: the source chosen from task / file / neither, and the file reader."""

from __future__ import annotations

import pytest

from layerzo.data.calibration import DEFAULT_CALIBRATION_TEXTS, calibration_for, read_calibration_file
from layerzo.data.tasks import calibration_texts
from layerzo.errors import ConfigError, DataRowError, TaskError


def test_read_calibration_file(tmp_path):
    plain = tmp_path / "c.txt"
    plain.write_text("first text\n\nsecond text\n")
    assert read_calibration_file(plain) == ["first text", "second text"]
    rows = tmp_path / "c.jsonl"
    rows.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert read_calibration_file(rows) == ["a", "b"]
    rows.write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(DataRowError, match="c.jsonl:2"):
        read_calibration_file(rows)


def test_read_calibration_file_refuses_missing_and_empty_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_calibration_file(tmp_path / "nope.txt")
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(ConfigError, match="has no texts"):
        read_calibration_file(tmp_path / "blank.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": \n')
    with pytest.raises(DataRowError, match="bad.jsonl:1: invalid JSON"):
        read_calibration_file(tmp_path / "bad.jsonl")


def test_calibration_from_a_task_is_its_seeded_training_contexts(data_dir):
    calib = calibration_for(task="rte", data_dir=data_dir, num_sequences=3, seed=2)
    assert list(calib.texts) == calibration_texts("rte", data_dir, n=3, seed=2)
    assert calib.description == "task rte (training inputs, seed 2)" and calib.note is None


def test_calibration_from_a_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("one\ntwo\n")
    calib = calibration_for(text_file=path, num_sequences=1)
    assert calib.texts == ("one", "two")  # profile_model keeps the first num_sequences
    assert calib.description == f"file {path}" and calib.note is None


def test_calibration_defaults_to_the_built_in_sentences_with_a_note():
    calib = calibration_for()
    assert calib.texts == DEFAULT_CALIBRATION_TEXTS and len(calib.texts) == 8
    assert calib.description == "built-in generic English sentences"
    assert calib.note == "no --task or --calib: calibrating on built-in generic English sentences"


def test_calibration_refuses_task_and_file_together_before_reading_either(tmp_path):
    with pytest.raises(ConfigError, match="either --task or --calib, not both"):
        calibration_for(task="no-such-task", text_file=tmp_path / "missing.txt")
    with pytest.raises(TaskError, match="unknown task"):
        calibration_for(task="no-such-task")


def test_a_calibration_file_that_is_a_folder_or_not_utf8_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="is a folder, not a file"):
        read_calibration_file(tmp_path)
    (tmp_path / "latin1.txt").write_bytes("café au lait\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.txt is not UTF-8 text"):
        read_calibration_file(tmp_path / "latin1.txt")
