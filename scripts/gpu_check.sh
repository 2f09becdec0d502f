#!/usr/bin/env bash
# One prepared GPU check, under 5 minutes on one CUDA GPU:
#   1. nvidia-smi and a CUDA sanity line,
#   2. the suite's GPU-marked tests (python -m pytest -m gpu -q),
#   3. the quick benchmark (CUDA paths: CNN train_step with bf16 autocast + channels_last,
#      train_augment on the GPU) -> $OUT/bench.json,
#   4. a tiny CNN search with fractional GPUs (2 trials share one GPU) -> $OUT/art.
#
#   bash scripts/gpu_check.sh                      # outputs under artifacts/bench
#   OUT=/tmp/gpu bash scripts/gpu_check.sh
#   DATA_DIR=/path/to/imagefolder bash scripts/gpu_check.sh
#
# Without the real photos (DATA_DIR, default ../shared/data/oxford_pets_sample) the benchmark
# uses its own synthetic JPEGs and the search gets a small synthetic ImageFolder.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-artifacts/bench}"
DATA_DIR="${DATA_DIR:-../shared/data/oxford_pets_sample}"
mkdir -p "$OUT"
export TUNE_PETS_CACHE="${TUNE_PETS_CACHE:-$OUT/cache}"

echo "== nvidia-smi"
nvidia-smi
python - <<'PY'
import torch
assert torch.cuda.is_available(), "torch sees no CUDA device"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}, "
      f"bf16 {torch.cuda.is_bf16_supported()}")
PY

echo "== pytest -m gpu"
# Exit code 5 means no test is marked gpu: not a failure of this check.
rc=0
python -m pytest -m gpu -q || rc=$?
if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then
  echo "gpu_check: GPU tests failed (exit $rc)" >&2
  exit "$rc"
fi

echo "== benchmark --quick"
python scripts/benchmark.py --quick --data-dir "$DATA_DIR" --out "$OUT/bench.json"

echo "== tiny search, --gpus-per-trial 0.5"
if [ ! -d "$DATA_DIR/train" ]; then
  DATA_DIR="$OUT/synthetic_data"
  echo "real photos not found: writing a small synthetic ImageFolder to $DATA_DIR"
  python - "$DATA_DIR" <<'PY'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

root, rng = Path(sys.argv[1]), np.random.default_rng(0)
for c in range(4):
    for split, n in (("train", 24), ("test", 6)):
        d = root / split / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = np.clip(rng.normal(60 * c + 40, 30, (96, 128, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(d / f"{i}.jpg", quality=90)
PY
fi
python -m tune_pets.search cnn --data-dir "$DATA_DIR" \
  --search-space search_spaces/smoke/cnn.yaml --gpus-per-trial 0.5 --max-concurrent 2 \
  --overwrite --artifacts-dir "$OUT/art" --no-progress

echo "gpu_check: OK ($OUT/bench.json, $OUT/art/search/cnn/)"
