"""``layerzo eval``: lm-evaluation-harness on the base model and on base + patch, one command.

Options map onto :class:`layerzo.eval.harness.EvalConfig`; the table goes to
stderr, ``--json`` prints the report on stdout, ``--output`` saves it and
``--write-card`` adds it to the patch's README.md.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import (
    DataDirOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    RevisionOpt,
    TokenOpt,
    TrustRemoteCodeOpt,
    debug_enabled,
    emit_json,
    err_console,
    handle_errors,
)


def register(app: typer.Typer) -> None:
    """Add ``eval`` to the app."""
    app.command("eval")(eval_command)


@handle_errors
def eval_command(
    tasks: Annotated[str, typer.Option("--tasks", "-t", help="Comma-separated: sst2,rte,cb,boolq,copa,wic,wsc,multirc,"
                                       "squad,drop (offline, layerzo's prompts and scores) and/or any lm-eval task "
                                       "name.")],
    model: ModelOpt = None,
    patch: Annotated[Optional[str], typer.Option("--patch", "-p", help="Layer patch folder or Hub repo id; "
                                                 "evaluated on the same in-memory base after the base run.")] = None,
    data_dir: DataDirOpt = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Documents per task (layerzo tasks: the same rows as "
                                                 "`layerzo tune --num-test N`) (default: all).", show_default=False)] = None,
    num_fewshot: Annotated[Optional[int], typer.Option("--num-fewshot", help="Few-shot examples per prompt "
                                                       "(default: 0).", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Harness batch size.")] = 16,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", help="Longest greedy answer of squad/drop "
                                                          "in tokens, as `layerzo tune --max-new-tokens` (default: "
                                                          "50).", show_default=False)] = None,
    max_length: Annotated[Optional[int], typer.Option("--max-length", help="Tokens per sequence at most for layerzo "
                                                      "tasks, as `layerzo tune --max-length` (default: 512; lm-eval "
                                                      "tasks: the model's context length).",
                                                      show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Row sampling and harness seed (default: the patch "
                                                "recipe's seed, else 0).", show_default=False)] = None,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    revision: RevisionOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    token: TokenOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Apply the patch even if the base fingerprint differs.")] = False,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Save the report as JSON here.")] = None,
    write_card: Annotated[bool, typer.Option("--write-card", help="Add/replace the 'lm-eval results' section of "
                                             "the patch's README.md (local patch folders only).")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Run lm-evaluation-harness on the base model and on base + layer patch; print one table."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # the harness' own bars stay
    if not debug_enabled():
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    from layerzo.errors import EvalError
    from layerzo.eval.report import save_json, write_card_section
    from layerzo.eval.harness import EvalConfig, evaluate, load_patch, resolve_seed
    from layerzo.patch.manifest import CARD_NAME

    if output is not None:  # before the work: a report that cannot be saved fails now, in one line
        from layerzo.core.atomic import check_file_output

        check_file_output(output, inputs=[model, patch, data_dir], command="layerzo eval")
    if write_card and patch is None:
        raise EvalError("--write-card needs --patch")
    if write_card and not Path(patch).expanduser().is_dir():
        raise EvalError(f"--write-card needs a local patch folder, got {patch}", "pull the patch first")
    layer_patch = load_patch(patch, token=token) if patch is not None else None
    lengths = {k: v for k, v in (("max_new_tokens", max_new_tokens), ("max_length", max_length)) if v is not None}
    config = EvalConfig(tasks=(tasks,), data_dir=str(data_dir) if data_dir is not None else None, limit=limit,
                        num_fewshot=num_fewshot, batch_size=batch_size, seed=resolve_seed(seed, layer_patch),
                        **lengths)  # unset: EvalConfig's defaults, tune's
    report = evaluate(config, model=model, patch=layer_patch, dtype=dtype, device=device, revision=revision,
                      trust_remote_code=trust_remote_code, token=token, force=force,
                      progress=lambda msg: err_console.print(f"[dim]{msg}[/]"))
    if output is not None:
        err_console.print(f"results: {save_json(report, output)}")
    if write_card:
        err_console.print(f"model card: {write_card_section(Path(patch).expanduser() / CARD_NAME, report)}")
    _print_table(report)
    if json_out:
        emit_json(report.to_dict())


def _print_table(report) -> None:
    from rich.table import Table

    from layerzo.eval.report import METRIC_NOTES, TABLE_HEADER, table_cells

    s = report.settings
    title = (f"{report.base_model}" + (" + patch" if report.patched is not None else "")
             + f" | limit {s['limit'] or 'all'}, {s['num_fewshot']}-shot, seed {s['seed']}")
    table = Table(title=title, title_justify="left")
    for i, col in enumerate(TABLE_HEADER):
        table.add_column(col, justify="left" if i < 2 else "right")
    for row in report.rows():
        table.add_row(*table_cells(row))
    err_console.print(table)
    for name in dict.fromkeys(r.metric for r in report.rows()):
        if name in METRIC_NOTES:
            err_console.print(f"[dim]{name}: {METRIC_NOTES[name]}[/]", highlight=False)
    for note in report.notes:
        err_console.print(f"[dim]note: {note}[/]", highlight=False)
