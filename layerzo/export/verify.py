"""Check an exported ONNX graph against PyTorch: logits on a padded batch, and latency side by side.

Verification never trusts the export example: ONNX Runtime runs at another
batch size and sequence length, with left- AND right-padded rows, and logits
and argmax are compared at every real (non-pad) position. Latency is the
median of interleaved runs, so a noisy neighbour slows both sides alike.

The graph's interface (:data:`INPUT_NAMES`, :data:`OUTPUT_NAME`) and the
PyTorch side of it (:func:`logits_only`) live here, below the exporter
(:mod:`layerzo.export.onnx`), which imports them; this module imports nothing
from it.
"""

from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from layerzo.errors import ExportError

INPUT_NAMES = ("input_ids", "attention_mask")  # the exported graph's inputs, int64 [batch, seq]
OUTPUT_NAME = "logits"  # its one output, float [batch, seq, vocab]


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


def vocab_size(model) -> int:
    """The model's vocabulary size: ``config.vocab_size``, else the input embedding's row count."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:
        vocab = model.get_input_embeddings().num_embeddings
    return int(vocab)


def logits_only(model):
    """Wrap ``model`` as ``(input_ids [B,S] int64, attention_mask [B,S] int64) -> logits [B,S,V]``.

    No cache and no extra outputs, so the graph has exactly two inputs and one
    output. Position ids come from the mask when the model accepts them. The
    exporter traces this wrapper and verification runs it as the reference, so
    both sides compute the same function.
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


def make_verification_inputs(model, tokenizer, batch: int, seq_len: int, *, seed: int = 0):
    """A padded batch ``(input_ids, attention_mask)``, both int64 ``[batch, seq_len]``.

    Row 0 is full; odd rows are left-padded and even rows right-padded by
    different amounts (each keeps at least one real token), so both padding
    sides are checked in one run. Token ids are random over the vocabulary.
    """
    import torch

    vocab = vocab_size(model)
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
    feeds = dict(zip(INPUT_NAMES, (input_ids.numpy(), attention_mask.numpy())))
    return session.run([OUTPUT_NAME], feeds)[0]


def _run_torch(model, input_ids, attention_mask):
    import torch

    with torch.inference_mode():
        return logits_only(model)(input_ids, attention_mask)
