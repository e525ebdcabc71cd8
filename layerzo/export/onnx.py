"""ONNX export of a (patched) causal LM, verified against PyTorch with ONNX Runtime.

The exported graph has exactly two inputs, ``input_ids`` and ``attention_mask``
(int64, ``[batch, seq]``, both axes dynamic), and one output, ``logits``
(float, ``[batch, seq, vocab]``). Position ids are derived from the mask inside
the graph, so left- and right-padded batches give the same logits at real
tokens as an unpadded run.

Verification (:mod:`layerzo.export.verify`) never trusts the export example: it
runs ONNX Runtime at another batch size and sequence length, with padded rows,
and compares logits and argmax at every real (non-pad) position against PyTorch.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from layerzo.core.atomic import atomic_dir, check_can_write
from layerzo.core.outputs import check_output, output_lock
from layerzo.core.env import debug_enabled, first_line
from layerzo.errors import ConfigError, ExportError
from layerzo.export.verify import (
    INPUT_NAMES,
    OUTPUT_NAME,
    LatencyReport,
    VerifyReport,
    logits_only,
    make_verification_inputs,
    measure_latency,
    ort_session,
    verify_onnx,
    vocab_size,
)

ONNX_FILE_NAME = "model.onnx"
ONNX_DATA_NAME = "model.onnx.data"  # all weights as one external-data file beside the graph
REPORT_NAME = "export_report.json"
OPSETS = (17, 18)
EXPORTERS = ("auto", "dynamo", "torchscript")
EXPORT_DTYPES = ("float32",)  # ONNX Runtime's CPU provider lacks bf16 kernels for most ops
EXPORT_FORMATS = ("onnx",)  # what `layerzo export --format` accepts


@dataclass(frozen=True)
class ExportConfig:
    """Options of one export; CLI flags map one to one onto these fields."""

    opset: int = 18
    dtype: str = "float32"
    atol: float = 1e-3
    exporter: str = "auto"  # "dynamo" (torch.export + onnxscript), "torchscript", or dynamo then torchscript
    example_batch: int = 2
    example_len: int = 16
    verify_batch: int = 3
    verify_len: int = 23
    latency_runs: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        _check_export_args(self.opset, self.exporter, self.example_batch, self.example_len)
        if self.dtype not in EXPORT_DTYPES:
            raise ConfigError(f"export dtype {self.dtype!r} is not supported; use --dtype float32")
        if not (self.atol > 0):
            raise ConfigError(f"atol must be > 0, got {self.atol}")
        for name in ("verify_len", "latency_runs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.verify_batch < 2:  # one full row plus at least one padded row
            raise ConfigError(f"verify_batch must be >= 2 so some rows are padded, got {self.verify_batch}")
        if self.verify_len < 2:
            raise ConfigError(f"verify_len must be >= 2 so a row can be padded, got {self.verify_len}")
        if self.verify_batch == self.example_batch or self.verify_len == self.example_len:
            raise ConfigError(
                f"verification shape {self.verify_batch}x{self.verify_len} must differ from the export example "
                f"{self.example_batch}x{self.example_len} in both batch and length (else dynamic axes go untested)"
            )


@dataclass(frozen=True)
class ExportReport:
    out_dir: str
    onnx_path: str
    exporter: str  # the path that produced the file: "dynamo" or "torchscript"
    fallback_reason: str | None
    opset: int
    dtype: str
    example_shape: tuple[int, int]
    size_bytes: int  # graph + external data
    files: dict[str, int]
    export_seconds: float
    verify: VerifyReport
    latency: LatencyReport
    source: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def export_onnx(
    model,
    out_dir: str | os.PathLike,
    *,
    opset: int = 18,
    example_batch: int = 2,
    example_len: int = 16,
    exporter: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Export ``model`` to ``out_dir/model.onnx`` (+ ``model.onnx.data``) atomically; return the .onnx path."""
    _check_export_args(opset, exporter, example_batch, example_len)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        _export_into(model, tmp, opset=opset, exporter=exporter, example_batch=example_batch,
                     example_len=example_len)
    return Path(out_dir) / ONNX_FILE_NAME


def export_model(
    model,
    tokenizer,
    out_dir: str | os.PathLike,
    config: ExportConfig | None = None,
    *,
    overwrite: bool = False,
    source: dict[str, Any] | None = None,
) -> ExportReport:
    """Export, copy the tokenizer and config, verify and time — all before ``out_dir`` appears.

    A failed verification raises :class:`ExportError` and leaves no ``out_dir``.
    """
    config = config or ExportConfig()
    model_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    if model_dtype != config.dtype:
        raise ConfigError(f"the model is {model_dtype} but the export dtype is {config.dtype}",
                          f"load the model with dtype={config.dtype!r}")
    out = Path(out_dir)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        start = time.perf_counter()
        exporter_used, fallback_reason = _export_into(
            model, tmp, opset=config.opset, exporter=config.exporter, example_batch=config.example_batch,
            example_len=config.example_len)
        export_seconds = time.perf_counter() - start
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if getattr(model, "config", None) is not None:
            model.config.save_pretrained(tmp)
        onnx_path = tmp / ONNX_FILE_NAME
        session = ort_session(onnx_path)
        input_ids, attention_mask = make_verification_inputs(model, tokenizer, config.verify_batch,
                                                             config.verify_len, seed=config.seed)
        verify = verify_onnx(session, model, inputs=(input_ids, attention_mask), atol=config.atol)
        latency = measure_latency(session, model, input_ids, attention_mask, runs=config.latency_runs)
        del session
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.name.startswith(ONNX_FILE_NAME)}
        report = ExportReport(
            out_dir=str(out), onnx_path=str(out / ONNX_FILE_NAME), exporter=exporter_used,
            fallback_reason=fallback_reason, opset=config.opset, dtype=config.dtype,
            example_shape=(config.example_batch, config.example_len), size_bytes=sum(files.values()),
            files=files, export_seconds=round(export_seconds, 2), verify=verify, latency=latency,
            source=dict(source or {}),
        )
        (tmp / REPORT_NAME).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def check_export_format(fmt: str) -> str:
    """The normalised (lower-case) export format; :class:`ConfigError` if it is not one of EXPORT_FORMATS."""
    name = fmt.lower()
    if name not in EXPORT_FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    return name


def export_checkpoint(
    out_dir: str | os.PathLike,
    base: str | os.PathLike | None = None,
    patch: str | os.PathLike | None = None,
    config: ExportConfig | None = None,
    *,
    fmt: str = "onnx",
    overwrite: bool = False,
    revision: str | None = None,
    token: str | None = None,
    trust_remote_code: bool = False,
    progress: Callable[[str], None] | None = None,
) -> ExportReport:
    """Load ``base`` (None = the demo) with ``patch`` applied, then :func:`export_model` it to ``out_dir``.

    What ``layerzo export`` / ``export-onnx`` do. The format, the config and a
    taken ``out_dir`` are refused before the slow model load. ``progress`` is
    told each stage ("loading model", "exporting ...") as it starts.
    """
    from layerzo.model.loading import load_model
    from layerzo.patch.merge import apply_to_model
    from layerzo.patch.format import LayerPatch
    from layerzo.patch.replay import with_weights

    check_export_format(fmt)
    config = config or ExportConfig()
    plan = check_output(out_dir, inputs=[base, patch], overwrite=overwrite, command="layerzo export",
                        markers=[REPORT_NAME])
    check_can_write(out_dir)
    report_stage = progress or (lambda stage: None)
    if plan.replaces:
        report_stage(plan.note("layerzo export"))
    report_stage("loading model")
    layer_patch = None if patch is None else with_weights(LayerPatch.from_pretrained(patch, token=token), base,
                                                          revision=revision)  # trajectory-only: rebuilt
    loaded = load_model(base, dtype=config.dtype, revision=revision, trust_remote_code=trust_remote_code)
    if layer_patch is not None:
        apply_to_model(loaded.model, layer_patch)
    source = {"base_model": loaded.source.name, "revision": revision, "patch": None if patch is None else str(patch)}
    report_stage(f"exporting to ONNX (opset {config.opset}) and verifying with ONNX Runtime")
    with output_lock(out_dir, "layerzo export"):
        return export_model(loaded.model, loaded.tokenizer, out_dir, config, overwrite=overwrite, source=source)


def _check_export_args(opset: int, exporter: str, example_batch: int, example_len: int) -> None:
    if opset not in OPSETS:
        raise ConfigError(f"opset {opset} is not supported; choose one of {', '.join(map(str, OPSETS))}")
    if exporter not in EXPORTERS:
        raise ConfigError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    if example_batch < 1 or example_len < 2:
        raise ConfigError(f"export example {example_batch}x{example_len} is too small; need batch >= 1, length >= 2")


def _export_into(model, directory: Path, *, opset: int, exporter: str, example_batch: int,
                 example_len: int) -> tuple[str, str | None]:
    """Write model.onnx + model.onnx.data into ``directory``; return (exporter used, why dynamo was skipped).

    ``exporter="auto"`` tries the dynamo exporter (torch.export + onnxscript) and
    falls back to the TorchScript tracer with eager attention if it raises.
    """
    import torch

    wrapper = logits_only(model)
    example = _example_inputs(model, example_batch, example_len)
    errors: list[str] = []
    if exporter in ("auto", "dynamo"):
        try:
            _export_dynamo(wrapper, example, directory / ONNX_FILE_NAME, opset)
            return "dynamo", None
        except (ConfigError, ExportError):
            raise
        except Exception as exc:  # the exporter raises many unrelated types; any of them means "try the other"
            errors.append(f"dynamo: {type(exc).__name__}: {first_line(exc)[:300]}")
            for p in directory.glob(f"{ONNX_FILE_NAME}*"):
                p.unlink()
            if exporter == "dynamo":
                raise ExportError(f"ONNX export failed ({errors[0]})",
                                  "try --exporter torchscript or --opset 17") from exc
    try:
        with torch.no_grad(), _attention_implementation(model, "eager"):
            _export_torchscript(wrapper, example, directory / ONNX_FILE_NAME, opset)
    except Exception as exc:
        errors.append(f"torchscript: {type(exc).__name__}: {first_line(exc)[:300]}")
        raise ExportError(f"ONNX export failed ({'; '.join(errors)})",
                          "set LAYERZO_DEBUG=1 for the traceback") from exc
    return "torchscript", (errors[0] if errors else None)


def _export_dynamo(wrapper, example, path: Path, opset: int) -> None:
    import torch

    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    dims = {0: batch, 1: seq}
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            wrapper, example, dynamo=True, verbose=False, opset_version=opset,
            input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
            dynamic_shapes={"input_ids": dims, "attention_mask": dims},
        )
        program.save(str(path), external_data=True)
    _require_single_data_file(path)


def _export_torchscript(wrapper, example, path: Path, opset: int) -> None:
    import onnx
    import torch

    axes = {0: "batch", 1: "seq"}
    embedded = path.with_name(path.name + ".embedded")
    with _quiet_exporter():
        torch.onnx.export(
            wrapper, example, str(embedded), dynamo=False, verbose=False, opset_version=opset,
            input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
            dynamic_axes={"input_ids": axes, "attention_mask": axes, OUTPUT_NAME: axes},
        )
    # The TorchScript exporter embeds the weights; move them to one sidecar so both paths ship the same layout.
    proto = onnx.load(str(embedded))
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=ONNX_DATA_NAME, size_threshold=1024)
    embedded.unlink()
    _require_single_data_file(path)


def _require_single_data_file(path: Path) -> None:
    extra = sorted(p.name for p in path.parent.iterdir()
                   if p.name not in (ONNX_FILE_NAME, ONNX_DATA_NAME) and p.name.startswith("model"))
    if not path.is_file() or extra:
        raise ExportError(f"exporter wrote unexpected files {extra or '(no model.onnx)'} in {path.parent}")


def onnx_size_bytes(onnx_path: str | os.PathLike) -> int:
    """Bytes of the graph file plus its external-data sidecar (if any)."""
    path = Path(onnx_path)
    return sum(p.stat().st_size for p in (path, path.with_name(path.name + ".data")) if p.is_file())


# -- helpers -------------------------------------------------------------------------------------------------------


def _example_inputs(model, batch: int, seq_len: int):
    import torch

    gen = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(0, vocab_size(model), (batch, seq_len), generator=gen, dtype=torch.long)
    attention_mask = torch.ones(batch, seq_len, dtype=torch.long)
    if batch > 1:  # trace with a padded row so mask handling is not specialised to all-ones
        attention_mask[-1, : seq_len // 3] = 0
    return input_ids, attention_mask


@contextlib.contextmanager
def _attention_implementation(model, name: str) -> Iterator[None]:
    """Temporarily switch the attention kernel (the TorchScript tracer mis-traces SDPA's shape checks)."""
    setter = getattr(model, "set_attn_implementation", None)
    original = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if setter is None or original in (None, name):
        yield
        return
    setter(name)
    try:
        yield
    finally:
        setter(original)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Keep exporter chatter off stdout (which carries --json) and drop its warnings."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        sink = sys.stderr if debug_enabled() else io.StringIO()
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
