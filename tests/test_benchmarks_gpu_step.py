"""The prepared GPU step benchmark (benchmarks/gpu_step.sh) runs end to end on a tiny config on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_step_benchmark_runs_on_a_tiny_config_and_writes_its_report(tmp_path):
    script = REPO / "benchmarks" / "bench_gpu_step.py"
    done = subprocess.run([sys.executable, str(script), "--shape", "tiny", "--device", "cpu", "--dtype", "float32",
                           "--batch-size", "2", "--tokens", "16", "--rounds", "1", "--results-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_step.json").read_text())
    assert set(result["median_s"]) == {"two_forwards", "layer2", "layer16", "layer16_paired", "lora",
                                         "full"}
    assert all(v > 0 for v in result["median_s"].values()) and result["batch"] == [2, 16]
    assert result["full_over"]["layer16"] > 1  # the upper layer alone is cheaper than the whole model
    assert "full / layer2" in (tmp_path / "gpu_step.md").read_text()
    assert 0 < result["paired_over_two"] and "One forward for + and -" in (tmp_path / "gpu_step.md").read_text()
    assert "bench_gpu_step.py --shape llama2-7b --device cuda" in (REPO / "benchmarks" / "gpu_step.sh").read_text()
