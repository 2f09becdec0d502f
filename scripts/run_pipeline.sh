#!/usr/bin/env bash
# The whole study: prepare -> sanity -> search -> reproduce -> report, for both models.
# Usage: bash scripts/run_pipeline.sh [--smoke] [--data-dir DIR] [--no-pretrained] [...]
# (all flags go to `python -m tune_pets.pipeline`; see its --help)
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m tune_pets.pipeline "$@"
