"""``layerzo profile``: find the dominant (first massive-activation) decoder layer."""

from __future__ import annotations

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
    SeedOpt,
    TrustRemoteCodeOpt,
    emit_json,
    err_console,
    handle_errors,
)


def register(app: typer.Typer) -> None:
    """Add ``profile`` to the app."""
    app.command("profile")(profile)


@handle_errors
def profile(
    model: ModelOpt = None,
    task: Annotated[Optional[str], typer.Option("--task", help="Task (or task YAML) whose training inputs calibrate.")] = None,
    data_dir: DataDirOpt = None,
    calib: Annotated[
        Optional[Path], typer.Option("--calib", help='Calibration texts: one per line, or .jsonl with a "text" field.')
    ] = None,
    num_sequences: Annotated[int, typer.Option("--num-sequences", help="Calibration sequences.")] = 8,
    max_length: Annotated[int, typer.Option("--max-length", help="Tokens per sequence at most.")] = 512,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per forward pass.")] = 8,
    max_threshold: Annotated[float, typer.Option("--max-threshold", help="Outlier layer: max|h| above this.")] = 100.0,
    ratio_threshold: Annotated[
        float, typer.Option("--ratio-threshold", help="Outlier layer: max|h|/median|h| at least this.")
    ] = 1000.0,
    persist_window: Annotated[int, typer.Option("--persist-window", help="Layers after an outlier to check.")] = 3,
    persist_min: Annotated[int, typer.Option("--persist-min", help="Of those, how many must keep the outlier.")] = 2,
    same_channel: Annotated[
        bool, typer.Option("--same-channel/--any-channel", help="Persisting needs the same massive channel.")
    ] = True,
    seed: SeedOpt = 0,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    revision: RevisionOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    json_out: JsonOpt = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a PNG of max|h| and ratio per layer.")] = None,
    sensitivity: Annotated[bool, typer.Option(
        "--sensitivity", help="Also measure each layer's ZO sensitivity on --task's training batches (forward passes only).")] = False,
    directions: Annotated[int, typer.Option("--directions", help="With --sensitivity: random directions K per layer.")] = 8,
    sensitivity_batches: Annotated[int, typer.Option(
        "--sensitivity-batches", help="With --sensitivity: training batches per direction.")] = 2,
    sensitivity_batch_size: Annotated[Optional[int], typer.Option(
        "--sensitivity-batch-size", help="With --sensitivity: examples per batch. [default: --batch-size]")] = None,
    one_sided: Annotated[bool, typer.Option(
        "--one-sided/--central", help="With --sensitivity: (L(θ+εz) − L(θ))/ε against one shared plain pass, K "
                                      "forwards a layer instead of 2K (an O(ε) bias).")] = False,
    sensitivity_plot: Annotated[Optional[Path], typer.Option(
        "--sensitivity-plot", help="With --sensitivity: write a PNG of the per-layer sensitivity.")] = None,
) -> None:
    """Profile residual-stream activations per layer and pick the dominant layer (Sun et al. 2024)."""
    from layerzo.data.calibration import calibration_for
    from layerzo.profile.rule import ProfileConfig
    from layerzo.zo.sensitivity import SensitivityConfig

    from layerzo.core.atomic import check_file_output
    from layerzo.errors import ConfigError

    for figure in (plot, sensitivity_plot):  # before the work: a figure that cannot be saved fails now
        if figure is not None:
            check_file_output(figure, inputs=[model, calib, data_dir, task], command="layerzo profile")
    if (sensitivity or sensitivity_plot) and task is None:
        raise ConfigError("--sensitivity measures the ZO signal on a task's training batches", "pass --task")
    # built before the (slow) model load, so a bad --directions fails now
    sens_config = (SensitivityConfig(directions=directions, seed=seed, one_sided=one_sided)
                   if sensitivity or sensitivity_plot else None)
    config = ProfileConfig(
        max_threshold=max_threshold, ratio_threshold=ratio_threshold, persist_window=persist_window,
        persist_min=persist_min, same_channel=same_channel, num_sequences=num_sequences,
        max_length=max_length, batch_size=batch_size,
    )
    # calibration first: a bad task or file fails before the (slow) model load
    calibration = calibration_for(task=task, data_dir=data_dir, text_file=calib, num_sequences=num_sequences, seed=seed)
    if calibration.note is not None:
        err_console.print(calibration.note)

    from layerzo.model.loading import load_model
    from layerzo.profile.run import profile_model

    with err_console.status("loading model..."):
        loaded = load_model(model, dtype=dtype, device=device, revision=revision, trust_remote_code=trust_remote_code)
    texts = calibration.texts
    with err_console.status(f"profiling {loaded.num_layers} layers on {min(len(texts), num_sequences)} sequences..."):
        report = profile_model(
            loaded.model, loaded.tokenizer, texts, config, loaded.layout,
            model_name=loaded.source.name, calibration=calibration.description,
        )
    _print_table(report)
    if plot is not None:
        from layerzo.profile.plot import plot_profile

        written = plot_profile(report, plot)
        err_console.print(f"plot written to {written}")
    sens = _sensitivity(loaded, task, data_dir, sens_config, sensitivity_batches,
                        batch_size if sensitivity_batch_size is None else sensitivity_batch_size, max_length, seed,
                        sensitivity_plot) if sens_config is not None else None
    if json_out:
        emit_json({**report.to_dict(), **({"sensitivity": sens.to_dict()} if sens is not None else {})})


def _sensitivity(loaded, task, data_dir, config, batches, batch_size, max_length, seed, figure):
    from layerzo.tune.select import task_sensitivity
    from layerzo.zo.sensitivity import plot_sensitivity

    with err_console.status(f"ZO sensitivity of {loaded.num_layers} layers ({config.directions} directions × "
                            f"{batches} batches of {batch_size})..."):
        sens = task_sensitivity(loaded, task, None if data_dir is None else str(data_dir), config=config,
                                num_batches=batches,
                                batch_size=batch_size, max_length=max_length, seed=seed)
    _print_sensitivity(sens)
    if figure is not None:
        err_console.print(f"sensitivity plot written to {plot_sensitivity(sens, figure)}")
    return sens


def _print_sensitivity(sens) -> None:
    from rich import box
    from rich.table import Table

    table = Table(title=f"ZO sensitivity: K={sens.config.directions}, {sens.num_batches} batch(es), "
                  f"{sens.seconds:.1f} s = {sens.cost_in_forwards:.0f}× one plain forward of the batches "
                  f"(work: {sens.forward_equivalents:.0f} forward-equivalents)", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    for name in ("layer", "grad/w", "stable", "final Δ", "growth", "pick"):
        table.add_column(name, justify="right" if name != "pick" else "left", no_wrap=True)
    for s in sens.layers:
        table.add_row(str(s.layer), f"{s.grad_per_weight:.2e}", f"{s.stability:.2f}", f"{s.final_change:.2e}",
                      f"{s.growth:.2f}", "★" if s.layer == sens.pick else "")
    err_console.print(table)
    err_console.print(f"[bold]sensitivity pick: layer {sens.pick}[/] — {sens.reason}", highlight=False, soft_wrap=True)


def _print_table(report) -> None:
    from rich import box
    from rich.table import Table

    from layerzo.profile.rule import is_outlier

    table = Table(title=f"{report.model} — {report.num_sequences} sequences, {report.num_tokens} tokens "
                  f"({report.calibration})", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    # short headers and fixed-point numbers so the table fits an 80-column (non-TTY) stderr
    for name in ("layer", "max|h|", "med|h|", "ratio", "seq:pos", "chan", "token", "out", "pick"):
        table.add_column(name, justify="left" if name in ("token", "out", "pick") else "right", no_wrap=True)
    for i, s in enumerate(report.layers):
        token = repr(s.token) if s.token is not None else ""
        table.add_row(
            str(i), f"{s.max_abs:.1f}", f"{s.median_abs:.3g}", f"{s.ratio:.1f}", f"{s.sequence}:{s.position}",
            str(s.channel), token if len(token) <= 12 else token[:11] + "…",
            "yes" if is_outlier(s, report.config) else "", "★" if i == report.pick.layer else "",
        )
    err_console.print(table)
    colour = "green" if report.pick.confidence == "high" else "yellow"
    err_console.print(
        f"[bold {colour}]dominant layer: {report.pick.layer}[/] ({report.pick.confidence} confidence) — "
        f"{report.pick.reason}",
        highlight=False, soft_wrap=True,
    )
