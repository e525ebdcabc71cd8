#!/usr/bin/env bash
# One prepared GPU run (< 8 minutes on one H200): ZO step times on a Llama-2-7B-shaped model built from
# its config on the GPU (random bf16 weights, no download), batch 16 x 256 tokens, interleaved variants.
# Writes benchmarks/results/gpu_step.{json,md}. Usage on the device machine, from the repository root:
#   bash benchmarks/gpu_step.sh            # needs a venv with torch (CUDA build) and layerzo installed
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 470 "$PY" benchmarks/bench_gpu_step.py --shape llama2-7b --device cuda --dtype bfloat16 \
    --batch-size 16 --tokens 256 --rounds "${ROUNDS:-5}" "$@"
