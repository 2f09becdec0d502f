"""Where everything lives: every path that a command writes or ``report`` reads.

artifacts/data_sanity/              sanity: counts, sizes, odd files, grids, summary.json
artifacts/search/<name>/            search: best_config.json, trials.csv, val_split.json,
                                    optuna.db, plots, search_spec.json (for --resume)
artifacts/ray_results/<name>/       Ray Tune's experiment state and trial checkpoints
artifacts/train/<run>/              train: exploratory runs (never read by report)
artifacts/<tag>/                    reproduce: checkpoint_best.pt (checkpoint_seed<N>.pt per
                                    extra seed), config.json, metrics.json,
                                    per_class_<split>.csv  (tag: cnn, cnn_baseline, vit, ...)
artifacts/confusion_<tag>.png/.csv  reproduce
artifacts/profiler/<tag>/           reproduce's profile of the retrained config
artifacts/profiling/<model>/        profiling: standalone profiles
artifacts/evaluate/<name>/          evaluate: scores of a checkpoint on a split
artifacts/metrics.csv               one row per (tag, split): reproduce and evaluate
artifacts/REPORT.md                 report
runs/                               TensorBoard: train/<run>, search/<name>/<trial>,
                                    <tag>-seed<N>
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_DATA_DIR = "data/oxford_pets"
DEFAULT_ARTIFACTS_DIR = "artifacts"
DEFAULT_RUNS_DIR = "runs"
BASELINE_SUFFIX = "_baseline"


def result_tag(model: str, baseline: bool = False) -> str:  # cnn (tuned) or cnn_baseline
    return model + (BASELINE_SUFFIX if baseline else "")


@dataclass(frozen=True)
class Layout:
    artifacts: Path = Path(DEFAULT_ARTIFACTS_DIR)
    runs: Path = Path(DEFAULT_RUNS_DIR)

    @property
    def data_sanity(self) -> Path:
        return self.artifacts / "data_sanity"

    @property
    def sanity_summary(self) -> Path:
        return self.data_sanity / "summary.json"

    def sanity_grid(self, split: str) -> Path:
        return self.data_sanity / f"grid_{split}.png"

    def search(self, name: str) -> Path:
        return self.artifacts / "search" / name

    def best_config(self, name: str) -> Path:
        return self.search(name) / "best_config.json"

    def trials_csv(self, name: str) -> Path:
        return self.search(name) / "trials.csv"

    def search_val_split(self, name: str) -> Path:
        return self.search(name) / "val_split.json"

    def search_spec(self, name: str) -> Path:  # what --resume continues with
        return self.search(name) / "search_spec.json"

    def optuna_db(self, name: str) -> Path:
        return self.search(name) / "optuna.db"

    def search_lock(self, name: str) -> Path:
        return self.search(name) / ".lock"

    @property
    def pipeline_lock(self) -> Path:  # one pipeline at a time per artifacts dir
        return self.artifacts / ".pipeline.lock"

    def search_plot(self, name: str, plot: str) -> Path:
        return self.search(name) / f"{plot}.png"

    @property
    def ray_results(self) -> Path:
        return self.artifacts / "ray_results"

    def search_tb(self, name: str) -> Path:
        return self.runs / "search" / name

    def train_run(self, run_name: str) -> Path:
        return self.artifacts / "train" / run_name

    def train_tb(self, run_name: str) -> Path:
        return self.runs / "train" / run_name

    def result(self, tag: str) -> Path:
        return self.artifacts / tag

    def checkpoint(self, tag: str, seed: int | None = None) -> Path:
        name = "checkpoint_best.pt" if seed is None else f"checkpoint_seed{seed}.pt"
        return self.result(tag) / name

    def result_config(self, tag: str) -> Path:
        return self.result(tag) / "config.json"

    def per_class(self, tag: str, split: str) -> Path:
        return self.result(tag) / f"per_class_{split}.csv"

    def result_metrics(self, tag: str) -> Path:
        return self.result(tag) / "metrics.json"

    @property
    def metrics_csv(self) -> Path:
        return self.artifacts / "metrics.csv"

    def confusion(self, tag: str, ext: str) -> Path:
        return self.artifacts / f"confusion_{tag}.{ext}"

    def profile(self, tag: str) -> Path:
        return self.artifacts / "profiler" / tag

    def reproduce_tb(self, tag: str, seed: int) -> Path:
        return self.runs / f"{tag}-seed{seed}"

    def standalone_profile(self, model: str) -> Path:
        return self.artifacts / "profiling" / model

    def evaluation(self, name: str) -> Path:
        return self.artifacts / "evaluate" / name

    def evaluation_file(self, name: str, split: str, kind: str) -> Path:
        """``kind``: per_class.csv, confusion.csv, confusion.png or metrics.json."""
        return self.evaluation(name) / f"{split}_{kind}"

    @property
    def report(self) -> Path:
        return self.artifacts / "REPORT.md"


# File names inside a profile folder, for profiling (the writer) and report (the reader).
TOP_OPS_CSV, TOP_OPS_TXT, PROFILE_SUMMARY = "top_ops.csv", "top_ops.txt", "summary.json"
