#!/usr/bin/env bash
# The whole study: prepare -> sanity -> search -> reproduce -> report, for both models.
# Usage: bash scripts/run_pipeline.sh [--smoke] [--data-dir DIR] [--no-pretrained] [...]
# (all flags go to `python -m tune_pets.pipeline`; see its --help)
set -euo pipefail
# The checkout's package first, without leaving the caller's folder: relative --data-dir and
# --artifacts-dir paths stay relative to where the command was typed.
repo="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec python -m tune_pets.pipeline "$@"
