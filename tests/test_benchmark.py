"""scripts/benchmark.py end to end at its smoke size: every figure runs, and the JSON has the
keys that earlier results and the README use. Speed goals are measured by the script, never
asserted here (smoke numbers mean nothing).

    python -m pytest tests/test_benchmark.py -q      # about 45 s on 2 idle cores
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import run_script

REPO = Path(__file__).resolve().parents[1]
# The keys of each figure: the contract with earlier bench.json files and the README.
COMMON = set(
    "value unit goal goal_met loadavg_start loadavg_end runs machine versions data".split()
)
PIPELINE = COMMON | {"img_size", "way_a", "way_b", "cuda_train_augment", "note"}
FIGURES = {
    "vit_probe_search_speedup": COMMON
    | set(
        "way_a way_b ratio_trials_only process_warmup_s_not_counted projected_ratio_at_10_epochs "
        "projection_note params driver naive_s_per_image_step extract_s_per_image note".split()
    ),
    "input_pipeline_speedup": PIPELINE,
    "input_pipeline_speedup_224": PIPELINE,
    "input_pipeline_speedup_busy": PIPELINE | {"competitor"},
    "trial_overhead_s": COMMON | {"way_a", "params", "formula"},
    "optuna_trial_overhead_s": COMMON | {"way_a", "params", "formula"},
    "cnn_train_images_per_s": COMMON | {"cpu", "cuda", "cuda_note", "note"},
}
RATES = set(
    "images_per_s images_per_s_median_epoch images_per_s_best_epoch epoch_s images_per_epoch "
    "warmup_epochs_discarded".split()
)
NAIVE_LOADER = RATES | {"name", "imagefolder_scan_s", "num_workers", "transform", "note"}
CACHED_LOADER = RATES | set(
    "name cache_res cache_build_s cache_reload_s cache_bytes torch_threads "
    "images_per_s_with_1_torch_thread images_per_s_incl_cache_build_over_50_epochs".split()
)
CNN_STEP = set(
    "images_per_s ms_per_step steps_timed warmup_steps batch_size amp_bf16 channels_last "
    "torch_threads".split()
)


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> tuple[dict, str]:
    """One ``--smoke`` run of every figure on the package's shipped photos: (JSON, stdout)."""
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "bench" / "bench.json"
    args = ["--smoke", "--out", out, "--data-dir", "sample"]
    proc = run_script(REPO / "scripts/benchmark.py", args, tmp, timeout=300,
                      TUNE_PETS_CACHE=str(tmp / "cache"))  # fmt: skip
    stdout = proc.stdout
    return json.loads(out.read_text()), stdout


@pytest.mark.slow
def test_smoke_run_writes_every_figure_with_its_keys(smoke_run):
    result, stdout = smoke_run
    assert "met?" in stdout and "vit_probe_search_speedup" in stdout  # the table
    assert "note: --smoke: tiny sizes" in stdout  # why its goals may read NO
    top = "benchmark created argv quick mode settings machine versions data figures note table"
    assert set(top.split()) | {"total_wall_s"} <= set(result)
    assert result["mode"] == "smoke" and result["quick"] is False
    assert result["data"]["source"] in ("sample", "synthetic")
    machine = "cpu cpu_count gpu cuda platform torch_threads loadavg_at_start"
    assert set(machine.split()) <= set(result["machine"])
    assert result["versions"]["torch"] and "ray" in result["versions"]
    assert set(result["figures"]) == set(FIGURES)
    for name, keys in FIGURES.items():
        f = result["figures"][name]
        assert set(f) == keys, (name, set(f) ^ keys)
        assert positive(f["value"]), (name, f["value"])
    assert len(result["table"]) == len(FIGURES) - 1  # the Optuna anchor shares the Ray row


@pytest.mark.slow
def test_smoke_run_raw_numbers_behind_each_ratio(smoke_run):
    figs = smoke_run[0]["figures"]
    for name in (
        "input_pipeline_speedup",
        "input_pipeline_speedup_224",
        "input_pipeline_speedup_busy",
    ):
        f = figs[name]
        naive, cached = f["way_a"], f["way_b"]
        assert set(naive) == NAIVE_LOADER
        assert set(cached) == CACHED_LOADER
        assert math.isclose(f["value"], cached["images_per_s"] / naive["images_per_s"])
        assert all(positive(t) for t in naive["epoch_s"] + cached["epoch_s"])
    assert figs["input_pipeline_speedup_busy"]["competitor"]["cpu_s"] > 0  # it did compete
    ray = figs["trial_overhead_s"]["way_a"]
    assert ray["trial_errors"] == 0 and ray["trials"] == 6 and positive(ray["work_s"])
    vit = figs["vit_probe_search_speedup"]
    assert vit["way_b"]["backbone_forwards"] == vit["params"]["n_train"] + vit["params"]["n_val"]
    assert {"load_split", "extract", "build_backbone"} <= set(
        vit["way_b"]["decode_and_extract_breakdown"]
    )
    cnn = figs["cnn_train_images_per_s"]["cpu"]
    assert set(cnn) == {"128", "224"} and all(set(v) == CNN_STEP for v in cnn.values())
