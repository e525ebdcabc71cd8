"""``layerzo sweep``: ZO-tune every layer alone (same recipe, same seed) + the whole-model MeZO baseline.

Options map one to one onto :class:`layerzo.sweep.run.SweepConfig` fields and the runs' recipe keys.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import DataDirOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, SeedOpt, emit_json, err_console, handle_errors


def register(app: typer.Typer) -> None:
    """Add ``sweep`` to the app."""
    app.command("sweep")(sweep)


@handle_errors
def sweep(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for sweep.jsonl/.json/.csv/.md/.png.")],
    model: ModelOpt = None,
    task: Annotated[str, typer.Option("--task", help="Task name (sst2, rte, ...) or task YAML.")] = "sst2",
    tasks: Annotated[Optional[str], typer.Option("--tasks", help="Several tasks, e.g. sst2,rte (overrides --task).")] = None,
    data_dir: DataDirOpt = None,
    layers: Annotated[str, typer.Option("--layers", help="Layers tuned one at a time: all, 0-29, 3,7, 0-3,11 or -1 (the last layer).")] = "all",
    full: Annotated[bool, typer.Option("--full/--no-full", help="Also run the whole-model MeZO baseline.")] = True,
    steps: Annotated[int, typer.Option("--steps", help="ZO steps per run.")] = 100,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per step.")] = 16,
    lr: Annotated[float, typer.Option("--lr", help="Learning rate of a one-layer run.")] = 1e-3,
    full_lr: Annotated[Optional[str], typer.Option(
        "--full-lr", help="Learning rate of the whole-model run (default: lr / num_layers); a comma list or auto "
                          "(tune --lr auto's grid) runs each rate and reports the best dev.")] = None,
    eps: Annotated[float, typer.Option("--eps", help="Perturbation scale.")] = 1e-3,
    seed: SeedOpt = 0,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Dev evaluation every N steps.")] = 50,
    num_train: Annotated[int, typer.Option("--num-train", help="Training examples.")] = 1000,
    num_dev: Annotated[int, typer.Option("--num-dev", help="Dev examples.")] = 200,
    num_test: Annotated[int, typer.Option("--num-test", help="Test examples.")] = 500,
    eval_batch_size: Annotated[int, typer.Option("--eval-batch-size", help="Batch size for dev/test.")] = 32,
    max_length: Annotated[int, typer.Option("--max-length", help="Tokens per sequence at most.")] = 128,
    objective: Annotated[Optional[str], typer.Option(
        "--objective", help="Training loss: auto (choice for classification, ce for generative), choice, ce, ... "
                            "[default: auto]")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(
        "--max-new-tokens", help="Generative tasks: the longest greedy answer on dev/test. [default: 50]")] = None,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    resume: Annotated[bool, typer.Option("--resume", help="Skip runs already in OUT/sweep.jsonl (same recipe only).")] = False,
    merge: Annotated[Optional[list[Path]], typer.Option(
        "--merge", metavar="<path>", help="Fold in the runs of another sweep folder (same options; repeatable), then resume.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Tune each layer ALONE with one recipe, compare with whole-model MeZO, mark the profiled layer."""
    from layerzo.sweep.run import SweepConfig, parse_full_lr, run_sweep

    names = tuple(t.strip() for t in (tasks or task).split(",") if t.strip())
    config = SweepConfig.from_dict({
        "tasks": names, "layers": layers, "full": full, "full_lr": parse_full_lr(full_lr), "model": model,
        "data_dir": str(data_dir) if data_dir else None, "steps": steps, "batch_size": batch_size, "lr": lr,
        "eps": eps, "seed": seed, "eval_every": eval_every, "num_train": num_train, "num_dev": num_dev,
        "num_test": num_test, "eval_batch_size": eval_batch_size, "max_length": max_length, "dtype": dtype,
        "device": device, **({"objective": objective} if objective is not None else {}),
        **({"max_new_tokens": max_new_tokens} if max_new_tokens is not None else {})})
    command = "layerzo " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    doc = run_sweep(config, out, resume=resume, progress=not quiet, log=lambda m: err_console.print(m, highlight=False),
                    command=command, merge=merge or ())
    if json_out:
        emit_json(doc)
        return
    _print_table(doc)
    typer.echo(doc["verdict"])


def _print_table(doc: dict) -> None:
    from rich.table import Table

    from layerzo.sweep.report import pct, rank_of

    for task, s in doc["tasks"].items():
        table = Table(title=f"{task}: each layer tuned alone", title_justify="left")
        m = s.get("metric_label", "acc")
        for col in ("layer", f"dev {m}", f"test {m}", "rank", "final loss", "wall s"):
            table.add_column(col, justify="right")
        for r in s["layers"]:
            name = f"[bold red]{r['layer']} (pick)[/]" if r["is_profiled_pick"] else str(r["layer"])
            loss = "-" if r["final_loss"] is None else f"{r['final_loss']:.4f}"
            table.add_row(name, pct(r["dev_acc"]), pct(r["test_acc"]), str(rank_of(s["layers"], r["layer"])), loss,
                          f"{r['wall_seconds']:.0f}")
        if s["full"] is not None:
            f = s["full"]
            loss = "-" if f["final_loss"] is None else f"{f['final_loss']:.4f}"
            table.add_row("all (MeZO)", pct(f["dev_acc"]), pct(f["test_acc"]), "-", loss, f"{f['wall_seconds']:.0f}")
        err_console.print(table)
