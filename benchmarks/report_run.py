"""Write a benchmark report (JSON + Markdown) for a finished ``layerzo tune`` run from its patch folder.

The patch's manifest holds the deterministic results (zero-shot and tuned
dev/test scores, steps, the recipe); ``metrics.jsonl`` holds the per-step
timing. The exact command and its wall time are passed in, since the run
was made by the CLI (e.g. under ``time``).

    python benchmarks/report_run.py --patch runs/squad-demo --stem squad_smollm2 --wall-seconds 1900 \\
        --run-command "layerzo tune --recipe recipes/smollm2-135m-squad.yaml --data-dir ../shared/data --out runs/squad-demo"

Writes benchmarks/results/<stem>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import header, stamp, write_report  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patch", type=Path, required=True)
    ap.add_argument("--stem", required=True)
    ap.add_argument("--run-command", required=True)
    ap.add_argument("--wall-seconds", type=float, required=True)
    ap.add_argument("--title", default=None)
    args = ap.parse_args()
    manifest = json.loads((args.patch / "layerzo_patch.json").read_text())
    rows = [json.loads(x) for x in (args.patch / "metrics.jsonl").read_text().splitlines()]
    m, recipe = manifest["metrics"], manifest["recipe"]
    step_s = statistics.median(r["seconds"] for r in rows)
    evals = [r["eval_seconds"] for r in rows if "eval_seconds" in r]
    name = m.get("metric", "acc")
    result = stamp({"run_command": args.run_command, "wall_seconds": args.wall_seconds, "layers": manifest["layers"],
                    "metrics": m, "recipe": recipe, "median_step_seconds": step_s, "dev_eval_seconds": evals,
                    "dev_curve": [[r["step"], r.get(f"dev_{name}"), r.get("dev_em")] for r in rows if f"dev_{name}" in r],
                    "selection": (manifest.get("profile") or {}).get("pick") or (manifest.get("profile") or {}).get("reason")})
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = [header(args.title or f"layerzo tune: {recipe['task']} on {manifest['base_model']}", result), "",
             f"Run: `{args.run_command}` — wall time {args.wall_seconds / 60:.1f} min.", "",
             f"Layer {', '.join(map(str, manifest['layers']))} of {manifest['num_layers']}, objective "
             f"{m.get('objective', 'choice')}, {m['steps']} steps of batch {recipe['batch_size']}, lr {recipe['lr']}, "
             f"eps {recipe['eps']}; {m['num_train']} train / {m['num_dev']} dev / {m['num_test']} test; "
             f"median {step_s:.2f} s per ZO step; dev evaluations took {', '.join(f'{e:.0f}' for e in evals)} s.", "",
             "| | zero-shot | tuned |", "|---|---|---|",
             f"| dev {name} | {pct(m[f'zero_shot_dev_{name}'])} | {pct(m[f'best_dev_{name}'])} (best, step "
             f"{m['best_step']}) |",
             f"| test {name} | {pct(m[f'zero_shot_test_{name}'])} | {pct(m[f'test_{name}'])} |"]
    if "test_em" in m:
        lines.append(f"| test em | {pct(m['zero_shot_test_em'])} | {pct(m['test_em'])} |")
    lines += ["", "Dev curve (step, score" + (", em" if "test_em" in m else "") + "): "
              + ", ".join(f"({s}, {pct(a)}" + (f", {pct(e)})" if e is not None else ")") for s, a, e in result["dev_curve"])]
    write_report(args.stem, result, "\n".join(lines))
    print("\n".join(lines[2:]))


if __name__ == "__main__":
    main()
