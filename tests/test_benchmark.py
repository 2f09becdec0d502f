"""scripts/benchmark.py end to end on its cheapest figures: runs, writes complete JSON with the
machine, versions and positive raw numbers. Speed goals are measured by the script, never
asserted here.

    python -m pytest tests/test_benchmark.py -m slow -q
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO_ROOT.parent / "shared/data/oxford_pets_sample"


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_benchmark_quick_writes_complete_json(tmp_path):
    real = (SAMPLE_DIR / "train").is_dir()
    # Without the real photos the script must fall back to synthetic JPEGs and say so.
    data_dir = SAMPLE_DIR if real else tmp_path / "no_such_data"
    out = tmp_path / "bench" / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts/benchmark.py"), "--quick", "--out", str(out),
         "--data-dir", str(data_dir), "--only", "optuna_trial_overhead_s",
         "input_pipeline_speedup"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "TUNE_PETS_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "input_pipeline_speedup" in proc.stdout and "met?" in proc.stdout  # the table

    result = json.loads(out.read_text())
    assert result["quick"] is True
    assert result["data"]["source"] == ("real" if real else "synthetic")
    for key in ("cpu", "cpu_count", "gpu"):
        assert key in result["machine"]
    assert result["versions"]["torch"] and result["versions"]["ray"] is not None
    figs = result["figures"]
    assert set(figs) == {"optuna_trial_overhead_s", "input_pipeline_speedup",
                         "input_pipeline_speedup_224"}
    for f in figs.values():
        assert positive(f["value"]), f
        assert f["machine"]["cpu_count"] and "torch" in f["versions"]

    opt = figs["optuna_trial_overhead_s"]["way_a"]
    assert positive(opt["wall_s"]) and opt["trials"] >= 20 and positive(opt["work_s"])

    for name, size in (("input_pipeline_speedup", 128), ("input_pipeline_speedup_224", 224)):
        f = figs[name]
        assert f["img_size"] == size
        assert "goal" in f and "goal_met" in f  # recorded, not asserted
        naive, cached = f["way_a"], f["way_b"]
        assert positive(naive["images_per_s"]) and positive(cached["images_per_s"])
        assert math.isclose(f["value"], cached["images_per_s"] / naive["images_per_s"])
        assert all(positive(t) for t in naive["epoch_s"] + cached["epoch_s"])
        assert positive(cached["cache_build_s"])
        prof = f["profile_train_augment"]
        assert all(positive(v) for v in prof["ms_per_batch_by_stage"].values())
        # The candidate faster augmentation must compute the same thing.
        assert prof["candidate_fix"]["max_abs_diff_vs_train_augment"] < 1e-3
        assert prof["candidate_uint8_resize"]["max_abs_diff_vs_torchvision_resized_crop_0_255"] <= 1
