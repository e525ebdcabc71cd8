"""Run the real ``layerzo`` CLI with every training step slowed down, for the kill/Ctrl-C tests.

    python tests/kill_worker.py SECONDS tune --out ... [layerzo tune options]

A tiny model takes milliseconds per ZO step, too fast to interrupt at a chosen
step; sleeping SECONDS before each training batch is encoded leaves the
computation itself untouched (the results are bit-identical to an unslowed run).
"""

from __future__ import annotations

import sys
import time


def main() -> None:
    delay = float(sys.argv[1])
    import layerzo.data.objectives as objectives

    encode = objectives.encode_batch

    def slow_encode(*args, **kwargs):
        time.sleep(delay)
        return encode(*args, **kwargs)

    objectives.encode_batch = slow_encode  # what tune's training steps encode their batches with
    from layerzo.cli.main import app

    app(sys.argv[2:], prog_name="layerzo")


if __name__ == "__main__":
    main()
