"""The command line as a whole: ``--help`` of every command at 80 columns, and ``--layers`` in tune and sweep.

Bad inputs (one line, no traceback, nothing written) are in test_bad_inputs.py.
"""

from __future__ import annotations

import json
import re

import pytest
import typer
from typer.testing import CliRunner

from layerzo.cli.main import app
from layerzo.tune.config import TuneConfig

COMMANDS = sorted(typer.main.get_command(app).commands)


def help_text(*command: str) -> str:
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    return result.stdout


def help_records(command: str) -> list[tuple[object, str]]:
    """(parameter, its help entry as --help shows it) for each option of ``command``."""
    cmd = typer.main.get_command(app).commands[command]
    ctx = typer.Context(cmd, info_name=command)
    return [(p, " ".join(record[1].split())) for p in cmd.params
            if p.param_type_name == "option" and (record := p.get_help_record(ctx)) is not None]


def test_every_command_is_tested_here():
    assert COMMANDS == sorted(["profile", "tune", "apply", "push", "pull", "eval", "generate", "export", "export-onnx",
                               "sweep"])


@pytest.mark.parametrize("command", COMMANDS)
def test_help_at_80_columns_shows_every_option_name_in_full(command):
    text = help_text(command)
    cmd = typer.main.get_command(app).commands[command]
    names = [name for p in cmd.params for name in (*p.opts, *p.secondary_opts) if name.startswith("-")]
    assert names and "--help" in text
    missing = [name for name in names if f"{name} " not in text and f"{name}," not in text and f"{name}\n" not in text]
    assert missing == [], f"{command} --help at 80 columns lacks {missing}"
    assert "…" not in text  # nothing cut short
    def flat(words: str) -> str:  # click wraps after a hyphen too: "no-trust-" / "remote-code"
        return re.sub(r"(?<=\w-) ", "", " ".join(words.split()))

    cut = [p.opts[0] for p, entry in help_records(command) if flat(entry) not in flat(text)]
    assert cut == [], f"{command} --help at 80 columns does not show the whole help (and default) of {cut}"
    assert max(len(line) for line in text.splitlines()) <= 80


def test_root_help_lists_every_command():
    text = help_text()
    assert all(f"  {command} " in text for command in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_the_default_of_every_option_that_has_one(command):
    """An option with a default value says it: click's "[default: x]", or (tune: its options default to
    None so a recipe can fill them) the TuneConfig default written into the help."""
    recipe = TuneConfig().to_dict() if command == "tune" else {}
    lacking = [p.opts[0] for p, entry in help_records(command)
               if recipe.get(p.name, p.default) not in (None, False) and "default" not in entry]
    assert lacking == [], f"{command} --help shows no default for {lacking}"


def test_tune_help_defaults_are_the_tune_config_defaults():
    """tune writes its defaults into the help by hand: they must be TuneConfig's."""
    defaults = TuneConfig().to_dict()
    wrong = []
    for p, entry in help_records("tune"):
        if defaults.get(p.name) is None:
            continue
        shown = entry.split("[default: ")[1].split("]")[0]
        want = defaults[p.name]
        if isinstance(want, bool):
            ok = shown == (p.opts[0] if want else p.secondary_opts[0]).removeprefix("--")
        elif isinstance(want, (int, float)):
            ok = float(shown) == float(want)
        else:
            ok = shown == str(want)
        if not ok:
            wrong.append(f"{p.opts[0]}: help says {shown!r}, TuneConfig has {want!r}")
    assert wrong == []


@pytest.mark.parametrize("command", ["tune", "sweep"])
def test_layers_help_documents_ranges_and_the_last_layer(command):
    text = " ".join(help_text(command).split())
    entry = text[text.index("--layers"):][:200]
    assert "0-3,11" in entry and "-1 (the last layer)" in entry


def _tune(tiny_llama_dir, data_dir, out, layers: str):
    return CliRunner().invoke(app, [str(a) for a in [
        "tune", "--model", tiny_llama_dir, "--data-dir", data_dir, "--task", "sst2", "--layers", layers, "--steps", "1",
        "--batch-size", "2", "--num-train", "4", "--num-dev", "2", "--num-test", "2", "--quiet", "--json", "-o", out]])


@pytest.mark.parametrize("layers, expected", [("0-2", [0, 1, 2]), ("1,-1", [1, 3]), ("-1", [3])])
def test_tune_takes_layer_ranges_and_the_last_layer_like_sweep(layers, expected, tiny_llama_dir, data_dir, tmp_path):
    from layerzo.sweep.run import layer_ranges

    result = _tune(tiny_llama_dir, data_dir, tmp_path / "patch", layers)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["layers"] == expected == list(layer_ranges(layers, 4))
