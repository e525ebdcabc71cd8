"""ONNX export of a (patched) causal LM, verified against PyTorch with ONNX Runtime.

The exported graph has exactly two inputs, ``input_ids`` and ``attention_mask``
(int64, ``[batch, seq]``, both axes dynamic), and one output, ``logits``
(float, ``[batch, seq, vocab]``). Position ids are derived from the mask inside
the graph, so left- and right-padded batches give the same logits at real
tokens as an unpadded run.

Verification never trusts the export example: it runs ONNX Runtime at another
batch size and sequence length, with padded rows, and compares logits and
argmax at every real (non-pad) position against PyTorch.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import os
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .atomic import atomic_dir
from .errors import ConfigError, ExportError

ONNX_FILE_NAME = "model.onnx"
ONNX_DATA_NAME = "model.onnx.data"  # all weights as one external-data file beside the graph
REPORT_NAME = "export_report.json"
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "logits"
OPSETS = (17, 18)
EXPORTERS = ("auto", "dynamo", "torchscript")
EXPORT_DTYPES = ("float32",)  # ONNX Runtime's CPU provider lacks bf16 kernels for most ops


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
class VerifyReport:
    """ONNX Runtime vs PyTorch at one padded batch. Differences are over real positions only."""

    batch: int
    seq_len: int
    padded_rows: int
    real_positions: int
    max_abs_diff: float
    atol: float
    argmax_mismatches: int
    passed: bool


@dataclass(frozen=True)
class LatencyReport:
    """Median wall time of one forward pass at ``shape`` (ms); ratio = ORT / PyTorch."""

    shape: tuple[int, int]
    runs: int
    ort_ms: float
    torch_ms: float
    ratio: float
    torch_threads: int


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


def logits_only(model):
    """Wrap ``model`` as ``(input_ids [B,S] int64, attention_mask [B,S] int64) -> logits [B,S,V]``.

    No cache and no extra outputs, so the graph has exactly two inputs and one
    output. Position ids come from the mask when the model accepts them.
    """
    import torch

    accepts_positions = "position_ids" in inspect.signature(model.forward).parameters

    class LogitsOnly(torch.nn.Module):
        def __init__(self, inner) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            kwargs = {}
            if accepts_positions:
                # Count real tokens so a left-padded row starts at position 0, as it would unpadded.
                kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                             return_dict=True, **kwargs)
            return out.logits

    return LogitsOnly(model).eval()


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
            errors.append(f"dynamo: {type(exc).__name__}: {_first_line(exc)}")
            for p in directory.glob(f"{ONNX_FILE_NAME}*"):
                p.unlink()
            if exporter == "dynamo":
                raise ExportError(f"ONNX export failed ({errors[0]})",
                                  "try --exporter torchscript or --opset 17") from exc
    try:
        with torch.no_grad(), _attention_implementation(model, "eager"):
            _export_torchscript(wrapper, example, directory / ONNX_FILE_NAME, opset)
    except Exception as exc:
        errors.append(f"torchscript: {type(exc).__name__}: {_first_line(exc)}")
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


def make_verification_inputs(model, tokenizer, batch: int, seq_len: int, *, seed: int = 0):
    """A padded batch ``(input_ids, attention_mask)``, both int64 ``[batch, seq_len]``.

    Row 0 is full; odd rows are left-padded and even rows right-padded by
    different amounts (each keeps at least one real token), so both padding
    sides are checked in one run. Token ids are random over the vocabulary.
    """
    import torch

    vocab = _vocab_size(model)
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, seq_len), generator=gen, dtype=torch.long)
    attention_mask = torch.ones(batch, seq_len, dtype=torch.long)
    pad_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    for row in range(1, batch):
        n_pad = min(seq_len - 1, 1 + (row * 5) % max(seq_len - 1, 1))
        span = slice(0, n_pad) if row % 2 else slice(seq_len - n_pad, seq_len)
        attention_mask[row, span] = 0
        if pad_id is not None:
            input_ids[row, span] = pad_id
    return input_ids, attention_mask


def verify_onnx(
    onnx_path_or_session,
    model,
    tokenizer=None,
    *,
    batch: int = 3,
    seq_len: int = 23,
    atol: float = 1e-3,
    seed: int = 0,
    inputs=None,
) -> VerifyReport:
    """Compare ONNX Runtime with PyTorch logits on a padded batch; raise ExportError on a mismatch.

    ``inputs`` = ``(input_ids, attention_mask)`` overrides the generated batch.
    Passes iff max |Δlogits| over real positions <= ``atol`` and the argmax
    agrees at every real position.
    """
    import numpy as np

    if inputs is None:
        inputs = make_verification_inputs(model, tokenizer, batch, seq_len, seed=seed)
    input_ids, attention_mask = inputs
    session = ort_session(onnx_path_or_session)
    ort_logits = _run_ort(session, input_ids, attention_mask)
    ref_logits = _run_torch(model, input_ids, attention_mask).float().numpy()
    if ort_logits.shape != ref_logits.shape:
        raise ExportError(f"ONNX logits have shape {ort_logits.shape}, PyTorch {ref_logits.shape}",
                          "the graph's axes are not dynamic; re-export")
    real = attention_mask.bool().numpy()
    diff = np.abs(ort_logits[real].astype(np.float64) - ref_logits[real].astype(np.float64))
    max_diff = float(np.nan_to_num(diff, nan=np.inf).max())
    mismatches = int((ort_logits[real].argmax(-1) != ref_logits[real].argmax(-1)).sum())
    report = VerifyReport(
        batch=int(input_ids.shape[0]), seq_len=int(input_ids.shape[1]),
        padded_rows=int((~real).any(-1).sum()), real_positions=int(real.sum()),
        max_abs_diff=max_diff, atol=atol, argmax_mismatches=mismatches,
        passed=max_diff <= atol and mismatches == 0,
    )
    if not report.passed:
        raise ExportError(
            f"ONNX output differs from PyTorch at batch {report.batch}x{report.seq_len}: max |dlogits| "
            f"{max_diff:.3g} (atol {atol:g}), argmax differs at {mismatches} of {report.real_positions} "
            "real positions",
            "re-export with --exporter torchscript or --opset 17; raise --atol only if the argmax agrees",
        )
    return report


def measure_latency(onnx_path_or_session, model, input_ids, attention_mask, *, runs: int = 5) -> LatencyReport:
    """Median forward time of ORT and PyTorch on the same inputs (one warm-up each, interleaved runs)."""
    import torch

    session = ort_session(onnx_path_or_session)
    _run_ort(session, input_ids, attention_mask)
    _run_torch(model, input_ids, attention_mask)
    ort_times, torch_times = [], []
    for _ in range(runs):  # interleaved so a noisy neighbour slows both sides alike
        t0 = time.perf_counter()
        _run_ort(session, input_ids, attention_mask)
        t1 = time.perf_counter()
        _run_torch(model, input_ids, attention_mask)
        t2 = time.perf_counter()
        ort_times.append(t1 - t0)
        torch_times.append(t2 - t1)
    ort_ms, torch_ms = statistics.median(ort_times) * 1e3, statistics.median(torch_times) * 1e3
    return LatencyReport(shape=(int(input_ids.shape[0]), int(input_ids.shape[1])), runs=runs,
                         ort_ms=round(ort_ms, 3), torch_ms=round(torch_ms, 3),
                         ratio=round(ort_ms / torch_ms, 4), torch_threads=torch.get_num_threads())


def onnx_size_bytes(onnx_path: str | os.PathLike) -> int:
    """Bytes of the graph file plus its external-data sidecar (if any)."""
    path = Path(onnx_path)
    return sum(p.stat().st_size for p in (path, path.with_name(path.name + ".data")) if p.is_file())


# -- helpers -------------------------------------------------------------------------------------------------------


def _example_inputs(model, batch: int, seq_len: int):
    import torch

    gen = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(0, _vocab_size(model), (batch, seq_len), generator=gen, dtype=torch.long)
    attention_mask = torch.ones(batch, seq_len, dtype=torch.long)
    if batch > 1:  # trace with a padded row so mask handling is not specialised to all-ones
        attention_mask[-1, : seq_len // 3] = 0
    return input_ids, attention_mask


def _vocab_size(model) -> int:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:
        vocab = model.get_input_embeddings().num_embeddings
    return int(vocab)


def ort_session(onnx_path_or_session, *, threads: int | None = None):
    """A CPU ONNX Runtime session (``threads`` intra-op threads; None = ORT's default)."""
    import onnxruntime as ort

    if isinstance(onnx_path_or_session, ort.InferenceSession):
        return onnx_path_or_session
    path = Path(onnx_path_or_session)
    if not path.is_file():
        raise ExportError(f"ONNX file {path} does not exist")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT's warnings would land in the user's terminal
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run_ort(session, input_ids, attention_mask):
    feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
    return session.run([OUTPUT_NAME], feeds)[0]


def _run_torch(model, input_ids, attention_mask):
    import torch

    with torch.inference_mode():
        return logits_only(model)(input_ids, attention_mask)


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
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO() if not _debug() else sys.stderr):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _debug() -> bool:
    return os.environ.get("LAYERZO_DEBUG", "").strip() not in ("", "0", "false", "False")


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(exc).__name__
