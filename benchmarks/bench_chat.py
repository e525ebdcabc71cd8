"""Benchmark: the demo model tuned on chat-format data (SST-2 rendered as ``messages``), zero-shot vs tuned.

The rows of ``<data-dir>/sst2/train.jsonl`` become conversations — the user
turn asks for the sentiment of the review, the assistant turn answers
"positive" or "negative" — written to a temporary ``chat.jsonl`` (derived
data stays out of the project). ``layerzo tune --task chat.jsonl`` detects the
messages format, renders every conversation with SmolLM2's ChatML template,
learns the assistant turn with the ``ce`` objective and scores greedy answers
(stopped at the end of the turn) by F1 / exact match on dev and test carved
from the file.

    python benchmarks/bench_chat.py --rows 1500 --steps 100

Writes benchmarks/results/chat_sst2.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import header, stamp, write_report
from layerzo.tune.config import TuneConfig
from layerzo.tune.loop import tune

QUESTION = "Is the sentiment of this movie review positive or negative? Answer with one word.\n\nReview: {}"


def write_chat_file(data_dir: Path, rows: int, out: Path) -> Path:
    lines = (data_dir / "sst2" / "train.jsonl").read_text(encoding="utf-8").splitlines()[:rows]
    path = out / "sst2_chat.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            row = json.loads(line)
            f.write(json.dumps({"messages": [
                {"role": "user", "content": QUESTION.format(row["sentence"].strip())},
                {"role": "assistant", "content": "positive" if row["label"] else "negative"}]}) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--rows", type=int, default=1500)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--layers", default="dominant")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        chat = write_chat_file(Path(args.data_dir), args.rows, Path(tmp))
        config = TuneConfig.from_dict(dict(task=str(chat), layers=args.layers, steps=args.steps,
                                           batch_size=args.batch_size, lr=args.lr, eps=args.eps,
                                           eval_every=max(1, args.steps // 2), num_train=1000, num_dev=200,
                                           num_test=300, eval_batch_size=32, max_length=256, max_new_tokens=8))
        t0 = time.perf_counter()
        result = tune(config, Path(tmp) / "patch", progress=False, note=print)
        wall = time.perf_counter() - t0
    m = result.metrics
    out = stamp({"task": "sst2 as chat messages", "rows": args.rows, "config": config.recipe(),
                 "layers": list(result.layers), "metrics": m, "wall_seconds": wall})
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = [header("Chat-format data: SST-2 as messages on the demo model", out), "",
             f"{args.rows} SST-2 training rows as user/assistant conversations (ChatML via the tokenizer's "
             f"template; loss on the assistant turn), layer {', '.join(map(str, result.layers))}, objective ce, "
             f"{m['steps']} steps of batch {args.batch_size}, lr {args.lr}, eps {args.eps}; "
             f"{m['num_train']} train / {m['num_dev']} dev / {m['num_test']} test carved from the file.", "",
             "| | zero-shot | tuned |", "|---|---|---|",
             f"| dev F1 | {pct(m['zero_shot_dev_f1'])} | {pct(m['best_dev_f1'])} (best, step {m['best_step']}) |",
             f"| test F1 | {pct(m['zero_shot_test_f1'])} | {pct(m['test_f1'])} |",
             f"| test EM | {pct(m['zero_shot_test_em'])} | {pct(m['test_em'])} |", "",
             f"Wall time {wall:.0f} s ({m['step_seconds']:.0f} s in ZO steps, "
             f"{m['step_seconds'] / max(1, m['steps']):.2f} s/step)."]
    write_report("chat_sst2", out, "\n".join(lines))
    print("\n".join(lines[2:]))


if __name__ == "__main__":
    main()
