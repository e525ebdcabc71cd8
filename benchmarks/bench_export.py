"""Benchmark: ``layerzo export-onnx`` on the demo model + a one-layer patch; ORT vs PyTorch.

1. Makes (once, cached in ``--work``) a patch of the demo SmolLM2-135M's middle
   layer: base weights + 1e-3 · N(0, 1) noise, seed 0 — a stand-in for a tuned
   layer with the real file format and fingerprints.
2. Runs the CLI exactly as a user would, in a subprocess:
   ``layerzo export-onnx --patch PATCH -o OUT --json --overwrite`` (export,
   verification at 3x23 with padded rows, latency) and keeps its JSON report.
3. In this process, loads the same patched model and the exported graph and,
   at fixed shapes, measures max |Δlogits| over real positions and the median
   forward time of ONNX Runtime and PyTorch (interleaved, same inputs).

Writes ``benchmarks/results/export.json`` and ``export.md``.

    python benchmarks/bench_export.py [--out /tmp/smol-onnx] [--work DIR] [--shapes 1x128,4x64] [--runs 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def prepare_patch(work: Path) -> Path:
    """A float32 patch of the demo's middle layer (cached: reused when present)."""
    import torch

    from layerzo import __version__
    from layerzo.core.hashing import tensor_sha256
    from layerzo.model.layers import layer_parameter_names
    from layerzo.model.loading import load_model
    from layerzo.patch.format import LayerPatch
    from layerzo.patch.manifest import FORMAT_VERSION, MANIFEST_NAME, PatchManifest

    patch_dir = work / "patch"
    if (patch_dir / MANIFEST_NAME).is_file():
        return patch_dir
    loaded = load_model(None)
    layer = loaded.num_layers // 2
    names = layer_parameter_names(loaded.model, loaded.layout, layer)
    state = loaded.model.state_dict()
    gen = torch.Generator().manual_seed(0)
    tensors = {n: state[n] + 1e-3 * torch.randn(state[n].shape, generator=gen) for n in names}
    manifest = PatchManifest(
        format_version=FORMAT_VERSION, layerzo_version=__version__, base_model=loaded.source.name,
        base_revision=None, architecture=type(loaded.model).__name__, num_layers=loaded.num_layers,
        layers=(layer,), kind="layers", dtype="float32",
        base_fingerprint={n: tensor_sha256(state[n]) for n in names}, recipe={"benchmark": "export"},
        profile=None, metrics={},
    )
    LayerPatch(manifest, tensors).save_pretrained(patch_dir, overwrite=True)
    return patch_dir


def cli_argv(patch: Path | None, out: Path, opset: int) -> list[str]:
    argv = ["layerzo", "export-onnx", "-o", str(out), "--opset", str(opset), "--json", "--overwrite"]
    return argv[:2] + ["--patch", str(patch)] + argv[2:] if patch is not None else argv


def run_cli(patch: Path | None, out: Path, opset: int) -> tuple[dict, float, list[str]]:
    """The user-facing command in a fresh process; returns (its JSON report, wall seconds, argv)."""
    argv = cli_argv(patch, out, opset)
    cli = [sys.executable, "-c", "from layerzo.cli.main import main; main()", *argv[1:]]
    t0 = time.perf_counter()
    proc = subprocess.run(cli, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"export failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout), seconds, argv


def measure(out: Path, patch: Path | None, shapes: list[tuple[int, int]], runs: int, atol: float,
            threads: int) -> list[dict]:
    """max |Δlogits| and ORT/PyTorch latency at each padded shape, same model the CLI exported.

    Both runtimes get the same thread count: on a shared machine a 2-thread
    PyTorch loses far more to spin-waiting than ORT does, which skews the ratio.
    """
    import torch

    from layerzo.export.onnx import ONNX_FILE_NAME
    from layerzo.export.verify import make_verification_inputs, measure_latency, ort_session, verify_onnx

    if patch is not None:
        from layerzo.api import load

        model, tokenizer = load(None, patch)
    else:
        from layerzo.model.loading import load_model

        loaded = load_model(None)
        model, tokenizer = loaded.model, loaded.tokenizer
    torch.set_num_threads(threads)
    session = ort_session(out / ONNX_FILE_NAME, threads=threads)
    rows = []
    for batch, seq_len in shapes:
        inputs = make_verification_inputs(model, tokenizer, batch, seq_len, seed=1)
        check = verify_onnx(session, model, inputs=inputs, atol=atol)
        lat = measure_latency(session, model, *inputs, runs=runs)
        rows.append({"shape": [batch, seq_len], "padded_rows": check.padded_rows,
                     "max_abs_diff": check.max_abs_diff, "argmax_mismatches": check.argmax_mismatches,
                     "ort_ms": lat.ort_ms, "torch_ms": lat.torch_ms, "ratio": lat.ratio, "runs": runs})
    return rows


def versions() -> dict:
    import onnx
    import onnxruntime
    import onnxscript
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "onnxscript": onnxscript.__version__,
            "torch_threads": torch.get_num_threads()}


def write_markdown(result: dict, path: Path) -> None:
    rep, m = result["cli_report"], result["machine"]
    cli_s = "reused" if result["cli_seconds"] is None else f"{result['cli_seconds']:.0f} s"
    v = rep["verify"]
    lines = [
        "# layerzo export-onnx: demo model + one-layer patch", "",
        f"Command: `{result['command']}`  ",
        f"Export command (run by the benchmark{'; output reused from an earlier run' if result['cli_seconds'] is None else ''}): "
        f"`{result['export_command']}`  ",
        f"Machine: {m['platform']}, {m['cpus']} CPUs; " + ", ".join(f"{k} {v_}" for k, v_ in result["versions"].items()),
        "",
        f"Model: {rep['source'].get('base_model')} + patch {result['patch_desc']}; exporter **{rep['exporter']}** "
        f"(opset {rep['opset']}, {rep['dtype']}), export {rep['export_seconds']:.0f} s, whole CLI run "
        f"{cli_s}.", "",
        f"Size: **{rep['size_bytes'] / 2**20:.1f} MiB** ({rep['size_bytes']} bytes: "
        + ", ".join(f"{k} {b}" for k, b in rep["files"].items()) + ").", "",
        f"CLI verification at {v['batch']}x{v['seq_len']} ({v['padded_rows']} padded rows, {v['real_positions']} real "
        f"positions): max |Δlogits| {v['max_abs_diff']:.2e} (atol {v['atol']:g}), argmax mismatches "
        f"{v['argmax_mismatches']}. Export example shape {rep['example_shape'][0]}x{rep['example_shape'][1]}.", "",
        "| shape (padded rows) | max abs Δlogits | argmax mismatches | ORT ms | PyTorch ms | ORT / PyTorch |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["fixed_shapes"]:
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} ({r['padded_rows']}) | {r['max_abs_diff']:.2e} | "
                     f"{r['argmax_mismatches']} | {r['ort_ms']:.1f} | {r['torch_ms']:.1f} | **{r['ratio']:.2f}x** |")
    lines += ["", f"Latency: median of {result['runs']} interleaved forward passes per runtime (one warm-up each), "
              "same padded inputs, ONNX Runtime CPUExecutionProvider vs PyTorch eager (sdpa), both with "
              f"{result['threads']} intra-op thread(s). The CLI's own latency line ({rep['latency']['shape'][0]}x"
              f"{rep['latency']['shape'][1]}, default threads): ORT {rep['latency']['ort_ms']:.1f} ms, PyTorch "
              f"{rep['latency']['torch_ms']:.1f} ms. The machine is shared, so absolute times are "
              "noisy; the ratio, measured side by side, is the number to read.", ""]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/smol-onnx"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/layerzo-bench-export"))
    parser.add_argument("--no-patch", action="store_true", help="Export the base model only.")
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument("--shapes", default="1x128,4x64")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="Threads for both runtimes in the fixed-shape timing.")
    parser.add_argument("--reuse", action="store_true", help="Reuse OUT and its export_report.json (skip export).")
    args = parser.parse_args()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]

    args.work.mkdir(parents=True, exist_ok=True)
    patch = None if args.no_patch else prepare_patch(args.work)
    if args.reuse:
        report, cli_seconds, argv = (
            json.loads((args.out / "export_report.json").read_text()), None, cli_argv(patch, args.out, args.opset))
    else:
        report, cli_seconds, argv = run_cli(patch, args.out, args.opset)
    rows = measure(args.out, patch, shapes, args.runs, report["verify"]["atol"], args.threads)
    result = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "export_command": " ".join(argv),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "versions": versions(),
        "patch_desc": "none (base only)" if patch is None else
        "of the middle layer (base + 1e-3·N(0,1), seed 0; made by this benchmark)",
        "cli_seconds": None if cli_seconds is None else round(cli_seconds, 1),
        "threads": args.threads,
        "cli_report": report,
        "runs": args.runs,
        "fixed_shapes": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "export.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, RESULTS / "export.md")
    print((RESULTS / "export.md").read_text())


if __name__ == "__main__":
    main()
