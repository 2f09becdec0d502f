"""What every figure shares: sizes per mode, timing, the machine record, the photos (real, the
package's shipped sample, or synthetic JPEGs) and the goal/ratio table."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing

from tune_pets.utils import env_info  # noqa: E402

DEFAULT_DATA = REPO_ROOT.parent / "shared/data/oxford_pets_sample"
GOALS = {  # figure: (comparison, threshold)
    "vit_probe_search_speedup": (">=", 30.0),
    "input_pipeline_speedup": (">=", 4.0),
    "input_pipeline_speedup_224": (">=", 4.0),
    "input_pipeline_speedup_busy": (">=", 1.0),  # issue 10: the cached way stays ahead
    "trial_overhead_s": ("<=", 0.5),
}
# Every size knob in one place. quick: about 3 minutes, noisier; smoke: what the tests run.
_COMMON = {"pipe_sizes": (128, 224), "ray_sleep_s": 0.05, "busy_size": 224, "cnn_batch_size": 32}
SETTINGS = {
    "full": {"vit_images": 200, "vit_trials": 16, "vit_epochs": 2, "pipe_warmup_epochs": 1,
             "pipe_epochs": 3, "ray_trials": 24, "optuna_trials": 24, "busy_max_s": 300,
             "cnn_steps": {128: (1, 6), 224: (1, 3)}, "cuda_steps": (10, 50)},
    "quick": {"vit_images": 64, "vit_trials": 4, "vit_epochs": 2, "pipe_warmup_epochs": 1,
              "pipe_epochs": 1, "ray_trials": 24, "optuna_trials": 24, "busy_max_s": 120,
              "cnn_steps": {128: (1, 2), 224: (1, 1)}, "cuda_steps": (5, 20)},
    "smoke": {"vit_images": 40, "vit_trials": 1, "vit_epochs": 1, "pipe_warmup_epochs": 0,
              "pipe_epochs": 1, "ray_trials": 6, "optuna_trials": 6, "busy_max_s": 60,
              "cnn_steps": {128: (0, 1), 224: (0, 1)}, "cuda_steps": (1, 2), "cnn_batch_size": 4},
}


def settings(mode: str) -> dict:
    return {**_COMMON, **SETTINGS[mode]}


@dataclass
class Context:  # what a figure gets: settings, a scratch dir, the photos (when it reads any)
    s: dict
    tmp: Path
    data_dir: Path | None = None


now = time.perf_counter


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cuda_sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable, name: str, record: dict) -> Callable:
    """``fn`` adding (calls, seconds) into ``record[name]``: timing the package unedited."""

    def wrapper(*args, **kwargs):
        t = now()
        try:
            return fn(*args, **kwargs)
        finally:
            calls, secs = record.get(name, (0, 0.0))
            record[name] = (calls + 1, secs + now() - t)

    return wrapper


@contextlib.contextmanager
def timed_attrs(targets: list[tuple[object, str]], record: dict) -> Iterator[None]:
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr in targets]
    for obj, attr, fn in saved:
        setattr(obj, attr, timed(fn, attr, record))
    try:
        yield
    finally:
        for obj, attr, fn in saved:
            setattr(obj, attr, fn)


def figure(name: str, value: float | None, unit: str, la0: list | None, **fields) -> dict:
    op, thr = GOALS.get(name, (None, None))
    met = None if op is None or value is None else (value >= thr if op == ">=" else value <= thr)
    return {"value": value, "unit": unit, "goal": op and f"{op} {thr:g}", "goal_met": met,
            **fields, "loadavg_start": la0, "loadavg_end": loadavg(), "runs": 1}


def machine_record() -> tuple[dict, dict]:
    env = env_info()
    machine = {k: env.get(k) for k in ("cpu", "cpu_count", "gpu", "cuda", "platform")}
    return {**machine, "torch_threads": torch.get_num_threads(), "loadavg_at_start": loadavg()}, env


# ---------------------------------------------------------------- photos
def resolve_data(data_dir: str, tmp: Path) -> tuple[Path, dict]:
    """``data_dir`` if it has ``train/`` (``sample``: the shipped photos), else the shipped
    sample, else synthetic JPEGs under ``tmp``."""
    from tune_pets.sample import SAMPLE_NAME, sample_dir

    try:
        shipped = sample_dir()
    except FileNotFoundError:  # installed without its data files
        shipped = None
    path = shipped if data_dir == SAMPLE_NAME else Path(data_dir)
    info = {}
    if path is None or not (path / "train").is_dir():
        log(f"{data_dir}/train not found: using the shipped sample (or synthetic JPEGs)")
        path, info = shipped, {"requested_dir": data_dir}
    if path is None:
        path = make_synthetic_jpegs(tmp / "synthetic")
        return path, {"source": "synthetic", "dir": str(path), **info, "n_train_files": 8 * 40,
                      "note": "synthetic 500x375 JPEGs (8 classes x 40): decode cost differs "
                              "from photos, ratios are indicative only"}
    info["n_train_files"] = sum(1 for p in (path / "train").rglob("*") if p.is_file())
    if path == shipped:
        return path, {"source": "sample", "dir": str(path), **info, "note": "the package's "
                      "shipped sample (5 photos per class, shorter side 144 px): indicative only"}
    return path, {"source": "real", "dir": str(path.resolve()), **info,
                  "note": "real Oxford-IIIT Pet photos (ImageFolder layout)"}


def make_synthetic_jpegs(root: Path, classes: int = 8, per_class: int = 40) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
    for c in range(classes):
        for split, n in (("train", per_class), ("test", per_class // 4)):
            (root / split / f"class_{c:02d}").mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a, b, d = rng.uniform(-1, 1, 3)
                arr = (128 + 60 * np.sin(a * xx / 37 + b * yy / 29 + d * 6))[..., None] * 0.6
                arr = arr + np.array([40 * c, 90 * c + 30, 150 + 20 * c]) % 256 * 0.4
                arr = np.clip(arr + rng.normal(0, 12, arr.shape[:2] + (3,)), 0, 255)
                Image.fromarray(arr.astype(np.uint8)).save(
                    root / split / f"class_{c:02d}" / f"img_{i:03d}.jpg", quality=90)
    return root


# ---------------------------------------------------------------- the table
def _fmt(v, unit: str = "") -> str:
    if v is None:
        return "-"
    return f"{v:.3g}{unit}" if abs(v) < 100 else f"{v:.0f}{unit}"


def table_rows(figs: dict) -> list[tuple[str, ...]]:
    """Rows of figure, way A, way B, ratio, goal, met? (one per device for the CNN)."""
    rows = []
    for name, f in figs.items():
        met = "-" if f["goal_met"] is None else ("yes" if f["goal_met"] else "NO")
        if name == "cnn_train_images_per_s":
            rows += [(f"{name} [{dev}]", *(f"{k}px {_fmt(v['images_per_s'], ' img/s')}"
                                           for k, v in f[dev].items()), "-", "-", "-")
                     for dev in ("cpu", "cuda") if f[dev]]
        elif name == "trial_overhead_s":
            anchor = figs.get("optuna_trial_overhead_s", {}).get("value")
            # The goal is on way B's own value (s per trial), not on the ratio to plain Optuna.
            rows.append((name, f"plain optuna {_fmt(anchor, ' s')}",
                         f"ray+make_tuner {_fmt(f['value'], ' s')}",
                         _fmt(anchor and f["value"] / anchor, "x the cost"), f["goal"], met))
        elif name == "optuna_trial_overhead_s":
            if "trial_overhead_s" not in figs:
                rows.append((name, "-", f"plain optuna {_fmt(f['value'], ' s')}", "-", "-", "-"))
        else:
            a, b = f["way_a"], f["way_b"]
            size = f" @{f['img_size']}px" if "img_size" in f else ""
            unit, key = (" img/s", "images_per_s") if size else (" s", "wall_s")
            rows.append((f"{name}{size}", f"naive {_fmt(a[key], unit)}",
                         f"cached {_fmt(b[key], unit)}", _fmt(f["value"], "x"), f["goal"], met))
    return rows


def format_table(rows: list[tuple[str, ...]]) -> str:
    head = ("figure", "way A", "way B", "ratio", "goal", "met?")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(6)]
    lines = [head, tuple("-" * w for w in widths), *rows]
    pad = [[c.ljust(w) for c, w in zip(r, widths, strict=True)] for r in lines]
    return "\n".join("  ".join(r).rstrip() for r in pad)
