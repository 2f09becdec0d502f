"""Profile a model's train step with ``torch.profiler``, plus clean timings.

    python -m tune_pets.profiling cnn --data-dir data/oxford_pets --steps 50
    python -m tune_pets.profiling vit --data-dir data/oxford_pets --weights vit_tiny.safetensors

What is profiled is ``engine.Engine.step``, the step ``train.fit`` and every search trial run.
For a features model (the ViT probe) that is its head step on cached features; the frozen
backbone's one-time cost is reported as its ``features.extract`` throughput. Writes into
``<artifacts>/profiling/<model>/``: the ``*.pt.trace.json`` trace (``tensorboard --logdir`` with
torch-tb-profiler, or https://ui.perfetto.dev), ``top_ops.txt/.csv`` (the 25 ops with the largest
self CPU time) and ``summary.json`` (images_per_s, step_time_ms...). Timings come from a second,
unprofiled run of ``--steps`` steps, as the profiler's overhead would inflate them.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from tune_pets import cli
from tune_pets.config import RunConfig
from tune_pets.data import BadImageError, ImageSplit, cache_res, check_data_dir, decode_square
from tune_pets.data import scan_split
from tune_pets.engine import Engine, FitData, load_fit_data
from tune_pets.features import BACKBONE_BATCH_SIZE, extract
from tune_pets.layout import PROFILE_SUMMARY, TOP_OPS_CSV, TOP_OPS_TXT
from tune_pets.models import get_spec
from tune_pets.utils import UserError, atomic_write_csv, atomic_write_json, atomic_write_text
from tune_pets.utils import cli_main, env_info

PROFILE_WAIT, PROFILE_WARMUP = 1, 2  # profiler schedule: skip 1 step, warm up 2, record --steps
TIMED_WARMUP = 1  # untimed steps before the timed run: the first after the profiler is an outlier
TOP_OPS = 25
DEFAULT_BACKBONE_BATCHES = 3  # batches of BACKBONE_BATCH_SIZE timed for the backbone throughput
TRACE_GLOB = "*.pt.trace.json*"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _profiled_run(engine: Engine, batches: Iterator, steps: int, trace_dir: Path, memory: bool):
    from torch.profiler import ProfilerActivity, profile, record_function, schedule
    from torch.profiler import tensorboard_trace_handler

    activities = [ProfilerActivity.CPU]
    if engine.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    times = []
    with profile(
        activities=activities,
        schedule=schedule(wait=PROFILE_WAIT, warmup=PROFILE_WARMUP, active=steps, repeat=1),
        record_shapes=True,
        # Memory profiling multiplies the trace size and the run's peak memory: opt-in.
        profile_memory=memory,
        on_trace_ready=tensorboard_trace_handler(str(trace_dir), worker_name=engine.config.model),
    ) as prof:
        for _ in range(PROFILE_WAIT + PROFILE_WARMUP + steps):
            t0 = time.perf_counter()
            with record_function("batch"):
                x, y = next(batches)
            with record_function("train_step"):
                engine.step(x, y)
            _sync(engine.device)
            times.append(time.perf_counter() - t0)
            prof.step()
    return prof, times[PROFILE_WAIT + PROFILE_WARMUP :]


def _timed_run(engine: Engine, batches: Iterator, steps: int) -> list[tuple[float, float, int]]:
    """Unprofiled (data seconds, compute seconds, images) per step; on CUDA each step syncs
    before and after the train step so data and compute time can be told apart."""
    times = []
    for _ in range(TIMED_WARMUP + steps):
        t0 = time.perf_counter()
        x, y = next(batches)
        _sync(engine.device)
        t1 = time.perf_counter()
        engine.step(x, y)
        _sync(engine.device)
        times.append((t1 - t0, time.perf_counter() - t1, len(y)))
    return times[TIMED_WARMUP:]


def top_ops(prof, k: int = TOP_OPS) -> tuple[list[dict], str]:
    """The ``k`` ops with the largest self CPU time: CSV rows and the profiler's own table."""
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:k]
    rows = [
        {
            "rank": rank,
            "name": e.key,
            "calls": e.count,
            "self_cpu_time_us": round(e.self_cpu_time_total, 3),
            "self_cpu_pct": round(100.0 * e.self_cpu_time_total / total, 3),
            "cpu_time_total_us": round(e.cpu_time_total, 3),
            "self_device_time_us": round(getattr(e, "self_device_time_total", 0.0), 3),
            "device_time_total_us": round(getattr(e, "device_time_total", 0.0), 3),
            "self_cpu_memory_mb": round(e.self_cpu_memory_usage / 2**20, 3),
            "self_device_memory_mb": round(getattr(e, "self_device_memory_usage", 0) / 2**20, 3),
        }
        for rank, e in enumerate(top, 1)
    ]
    return rows, events.table(sort_by="self_cpu_time_total", row_limit=k)


@torch.no_grad()
def backbone_throughput(
    config: RunConfig, dc: dict, device: torch.device, images: np.ndarray | None, batches: int
) -> dict:
    """Images/s of the frozen backbone in ``features.extract``: the one-time cost of the feature
    cache. ``images``: uint8 ``[N, R, R, 3]`` at the cache resolution, or random pixels (a ViT's
    speed does not depend on them)."""
    n = batches * BACKBONE_BATCH_SIZE
    res = cache_res(dc["img_size"], dc["crop_pct"])
    source = "images"
    if images is None or len(images) == 0:
        rng = np.random.default_rng(0)
        images, source = rng.integers(0, 256, (n, res, res, 3), dtype=np.uint8), "random"
    images = images[np.resize(np.arange(len(images)), n)]  # repeat tiny data up to n images
    labels = np.zeros(n, dtype=np.int64)
    warm = ImageSplit("profile", images[:8], labels[:8], [""] * 8, [], "")
    backbone = get_spec(config.model).build_backbone(config).to(device)
    extract(backbone, warm, dc, device, batch_size=8, progress=False)
    _sync(device)
    t0 = time.perf_counter()
    split = ImageSplit("profile", images, labels, [""] * n, [], "")
    extract(backbone, split, dc, device, batch_size=BACKBONE_BATCH_SIZE, progress=False)
    _sync(device)
    seconds = time.perf_counter() - t0
    return {
        "backbone": config.backbone,
        "backbone_images_per_s": round(n / seconds, 2),
        "backbone_batch_size": BACKBONE_BATCH_SIZE,
        "backbone_images": n,
        "backbone_input": source,
        "backbone_seconds": round(seconds, 3),
    }


def sample_images(data_dir: str | os.PathLike, preprocess: dict, n: int) -> np.ndarray:
    """``n`` train images, evenly spaced over the sorted file list, as the feature cache holds
    them."""
    data_dir = check_data_dir(data_dir)
    paths = scan_split(data_dir, "train").paths
    res = cache_res(preprocess["img_size"], preprocess["crop_pct"])
    picks = np.unique(np.linspace(0, len(paths) - 1, num=min(n, len(paths))).round().astype(int))
    out = []
    for i in picks:
        try:
            out.append(decode_square(str(data_dir / paths[i]), res, preprocess["interpolation"]))
        except BadImageError:
            continue
    return np.stack(out) if out else np.empty((0, res, res, 3), dtype=np.uint8)


def run_profile(
    config: RunConfig,
    data: FitData,
    steps: int,
    out_dir: str | os.PathLike,
    device: torch.device | None = None,
    *,
    backbone_images: np.ndarray | None = None,
    backbone_batches: int = DEFAULT_BACKBONE_BATCHES,
    memory: bool = False,
) -> dict:
    """Profile ``steps`` train steps and time ``steps`` more without the profiler; writes the
    trace, ``top_ops.{csv,txt}`` and ``summary.json`` into ``out_dir`` and returns the summary."""
    if steps < 1:
        raise UserError(f"--steps must be a positive integer, got {steps}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Kineto logs USDT probe lines and, without a GPU, a GPU-count ERROR on every run; 6 is above
    # every level. It reads this when the profiler first starts.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    # what fit runs: Engine.step on the train batches of epoch 1, 2, ...
    engine = Engine(config, data, device)
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)

    # The new trace waits in a temp folder until every number is measured, then replaces the
    # old one with the files that describe it: a run stopped before leaves the old set whole.
    with tempfile.TemporaryDirectory(prefix=".trace-", dir=out_dir) as tmp:
        summary, rows, table = _measure(
            engine, steps, Path(tmp), memory, backbone_images, backbone_batches
        )
        traces = sorted(Path(tmp).glob(TRACE_GLOB))
        for old in out_dir.glob(TRACE_GLOB) if traces else ():
            old.unlink()
        for t in traces:
            os.replace(t, out_dir / t.name)
    summary["trace_files"] = sorted(p.name for p in out_dir.glob(TRACE_GLOB))
    atomic_write_csv(out_dir / TOP_OPS_CSV, rows)
    header = (
        f"# {config.model}: {summary['step']}; {steps} profiled steps, batch "
        f"{summary['batch_size']}, img {summary['img_size']}px, device {engine.device}; sorted by "
        "self CPU time\n"
    )
    atomic_write_text(out_dir / TOP_OPS_TXT, header + table + "\n")
    atomic_write_json(out_dir / PROFILE_SUMMARY, summary)
    return summary


def _measure(
    engine: Engine,
    steps: int,
    trace_dir: Path,
    memory: bool,
    backbone_images: np.ndarray | None,
    backbone_batches: int,
) -> tuple[dict, list[dict], str]:
    """The profiled steps (trace into ``trace_dir``), then the timed ones: the summary, and the
    top ops as CSV rows and as the profiler's table."""
    config, data, device = engine.config, engine.data, engine.device
    batches = engine.batches.forever()
    prof, prof_s = _profiled_run(engine, batches, steps, trace_dir, memory)
    rows, table = top_ops(prof)
    del prof

    data_s, compute_s, n_images = zip(*_timed_run(engine, batches, steps), strict=True)
    step_s = [a + b for a, b in zip(data_s, compute_s, strict=True)]
    mean_s = statistics.fmean(step_s)
    spe = engine.steps_per_epoch
    env = env_info()
    summary = {
        "model": config.model,
        "step": (
            "full CNN on augmented image batches"
            if data.kind == "images"
            else "probe head on cached frozen-backbone features"
        ),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else env["cpu"],
        "torch_threads": torch.get_num_threads(),
        "steps": steps,
        "batch_size": int(max(n_images)),  # the real one: below config's on a tiny split
        "img_size": int(data.preprocess.get("img_size", config.img_size)),
        "images_per_s": round(sum(n_images) / sum(step_s), 2),  # a tiny split: batch < size
        "step_time_ms": round(1000 * mean_s, 3),
        "step_time_ms_median": round(1000 * statistics.median(step_s), 3),
        "step_time_ms_min": round(1000 * min(step_s), 3),
        "step_time_ms_max": round(1000 * max(step_s), 3),
        "data_time_ms": round(1000 * statistics.fmean(data_s), 3),
        "compute_time_ms": round(1000 * statistics.fmean(compute_s), 3),
        "profiled_step_time_ms": round(1000 * statistics.fmean(prof_s), 3),
        "n_train": len(data.train_y),
        "steps_per_epoch": spe,
        "epoch_time_est_s": round(spe * mean_s, 3),
        "trainable_params": sum(p.numel() for p in engine.model.parameters() if p.requires_grad),
        "precision": engine.precision,
        "profile_memory": memory,
        "top_ops": [r["name"] for r in rows[:5]],
    }
    if device.type == "cuda":
        summary["peak_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    else:
        summary["max_rss_mb"] = _max_rss_mb()
    if data.kind == "features":
        bb = backbone_throughput(config, data.preprocess, device, backbone_images, backbone_batches)
        n_extract = max(1, config.feature_views) * len(data.train_y)
        bb["feature_extract_train_est_s"] = round(n_extract / bb["backbone_images_per_s"], 2)
        summary.update(bb)
    summary["config"] = config.to_dict()
    summary["env"] = env
    return summary, rows, table


def _max_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def build_parser() -> cli.ArgumentParser:
    p = cli.command_parser(__doc__, "python -m tune_pets.profiling")
    cli.add_model_arg(p, "which model's train step to profile")
    p.add_argument(
        "--steps",
        type=cli.profile_steps,
        default=20,
        help="profiled steps; as many again are timed without the profiler",
    )
    p.add_argument(
        "--profile-memory",
        action="store_true",
        help="record allocations too (a much larger trace and more memory)",
    )
    p.add_argument(
        "--backbone-batches",
        type=cli.positive_int,
        default=DEFAULT_BACKBONE_BATCHES,
        help=f"features models: batches of {BACKBONE_BATCH_SIZE} for the backbone throughput",
    )
    cli.add_data_args(p, val_split=False)
    cli.add_weights_args(p)
    cli.add_device_args(p)
    cli.add_hparam_args(p, ("img_size", "batch_size", "seed"))
    cli.add_output_args(p, runs=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    run = cli.resolve_run_args(build_parser().parse_args(argv))
    args, spec, config, device, data_dir = run.args, run.spec, run.config, run.device, run.data_dir
    out = run.layout.standalone_profile(spec.name)
    data = load_fit_data(config, data_dir, full_train=True, device=device, **cli.data_options(args))
    n_images = args.backbone_batches * BACKBONE_BATCH_SIZE
    images = sample_images(data_dir, data.preprocess, n_images) if data.kind == "features" else None
    print(
        f"profiling {spec.name} ({data.info['n_train']} train images, device "
        f"{device}): {args.steps} steps under torch.profiler, {args.steps} timed",
        flush=True,
    )
    kw = {"backbone_batches": args.backbone_batches, "memory": args.profile_memory}
    s = run_profile(config, data, args.steps, out, device, backbone_images=images, **kw)
    print(
        f"{s['model']}: {s['images_per_s']:.1f} images/s, step {s['step_time_ms']:.1f} ms "
        f"(data {s['data_time_ms']:.1f} + compute {s['compute_time_ms']:.1f}), batch "
        f"{s['batch_size']} @ {s['img_size']}px; {s['step']}"
    )
    if "backbone_images_per_s" in s:
        print(
            f"  frozen backbone: {s['backbone_images_per_s']:.1f} images/s "
            f"(feature extraction for the train split ~{s['feature_extract_train_est_s']:.0f} s)"
        )
    print(f"  top ops by self CPU time: {', '.join(s['top_ops'][:3])}")
    print(
        f"wrote {out}/ (top_ops.txt, top_ops.csv, summary.json, {len(s['trace_files'])} trace); "
        f"view with https://ui.perfetto.dev (open the .pt.trace.json), or tensorboard --logdir "
        f"{out.parent} with the torch-tb-profiler plugin installed"
    )
    return 0


if __name__ == "__main__":
    cli_main(main, prog="python -m tune_pets.profiling")
