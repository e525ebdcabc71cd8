"""``layerzo export-onnx`` (also ``layerzo export --format onnx``): base + patch → verified ONNX.

The options are declared once, on ``export``; ``export-onnx`` is the same
command without ``--format``. Loading, the output check and the export itself
are :func:`layerzo.export.onnx.export_checkpoint`.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from .common import (
    JsonOpt,
    ModelOpt,
    RevisionOpt,
    TokenOpt,
    TrustRemoteCodeOpt,
    emit_json,
    err_console,
    handle_errors,
)

PatchOpt = Annotated[
    Optional[str], typer.Option("--patch", "-p", help="Layer patch folder or Hub id, applied before export.")
]
OutOpt = Annotated[Path, typer.Option("--output", "-o", help="Output folder (model.onnx + data + tokenizer).")]
OpsetOpt = Annotated[int, typer.Option("--opset", help="ONNX opset: 17 or 18.")]
AtolOpt = Annotated[float, typer.Option("--atol", help="Max |Δlogits| allowed at real positions (ORT vs PyTorch).")]
ExporterOpt = Annotated[
    str, typer.Option("--exporter", help="auto (dynamo, then TorchScript if it fails), dynamo or torchscript.")
]
VerifyBatchOpt = Annotated[int, typer.Option("--verify-batch", help="Verification batch size (≠ export example's 2).")]
VerifyLenOpt = Annotated[int, typer.Option("--verify-len", help="Verification sequence length (≠ example's 16).")]
RunsOpt = Annotated[int, typer.Option("--runs", help="Timed forward passes per runtime (median reported).")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Model precision for export: float32 (ORT CPU needs it).")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace the output folder if it exists.")]
FormatOpt = Annotated[str, typer.Option("--format", "-f", help="Export format: onnx.")]

EXPORT_ONNX_HELP = "Export base (+ patch) to ONNX, then verify it with ONNX Runtime at another shape, with padding."


def register(app: typer.Typer) -> None:
    """Add ``export-onnx`` and its alias ``export --format onnx`` to the app."""
    app.command("export-onnx", help=EXPORT_ONNX_HELP)(_without_format(export))
    app.command("export")(export)


@handle_errors
def export(
    output: OutOpt,
    format: FormatOpt = "onnx",
    model: ModelOpt = None,
    patch: PatchOpt = None,
    opset: OpsetOpt = 18,
    atol: AtolOpt = 1e-3,
    dtype: DtypeOpt = "float32",
    exporter: ExporterOpt = "auto",
    verify_batch: VerifyBatchOpt = 3,
    verify_len: VerifyLenOpt = 23,
    runs: RunsOpt = 5,
    overwrite: OverwriteOpt = False,
    revision: RevisionOpt = None,
    token: TokenOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Export base (+ patch) to a deployable format (same options as export-onnx)."""
    from layerzo.export.onnx import ExportConfig, export_checkpoint

    config = ExportConfig(opset=opset, dtype=dtype, atol=atol, exporter=exporter, verify_batch=verify_batch,
                          verify_len=verify_len, latency_runs=runs)
    with err_console.status("loading model") as status:
        report = export_checkpoint(output, model, patch, config, fmt=format, overwrite=overwrite, revision=revision,
                                   token=token, trust_remote_code=trust_remote_code, progress=status.update)
    if report.fallback_reason:
        err_console.print(f"[yellow]note:[/] dynamo exporter failed, used TorchScript ({report.fallback_reason})",
                          highlight=False, soft_wrap=True)
    if json_out:
        emit_json(report.to_dict())
        return
    v, lat = report.verify, report.latency
    typer.echo(f"wrote {report.onnx_path} ({report.size_bytes / 2**20:.1f} MiB with external data; "
               f"exporter {report.exporter}, opset {report.opset})")
    typer.echo(f"verified at batch {v.batch}x{v.seq_len} ({v.padded_rows} padded rows): max |Δlogits| "
               f"{v.max_abs_diff:.2e} <= {v.atol:g}, argmax identical at {v.real_positions} real positions")
    typer.echo(f"latency at {lat.shape[0]}x{lat.shape[1]} (median of {lat.runs}): ONNX Runtime {lat.ort_ms:.1f} ms, "
               f"PyTorch {lat.torch_ms:.1f} ms (ratio {lat.ratio:.2f})")


def _without_format(command: Callable[..., None]) -> Callable[..., None]:
    """``command`` with its ``--format`` option removed (it keeps its default, onnx): the export-onnx command."""
    signature = inspect.signature(command, eval_str=True)

    @functools.wraps(command)
    def without_format(**kwargs: Any) -> None:
        command(**kwargs)

    without_format.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[p for p in signature.parameters.values() if p.name != "format"])
    return without_format
