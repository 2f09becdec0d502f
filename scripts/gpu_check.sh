#!/usr/bin/env bash
# The one prepared GPU check (about 5 minutes on one CUDA GPU); see scripts/gpu_check.py.
#   bash scripts/gpu_check.sh                 # JSON and logs under artifacts/gpu_check
#   OUT=/tmp/gpu bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-artifacts/gpu_check}"
mkdir -p "$OUT"
nvidia-smi
exec python scripts/gpu_check.py --out "$OUT"
