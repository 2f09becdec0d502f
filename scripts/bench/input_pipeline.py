"""input_pipeline_speedup (128 px) and input_pipeline_speedup_224: images/s delivered for CNN
training (decode + augment, no model). The project's way is the batches ``train.fit`` trains on
(``Engine(...).batches``: uint8 cache + ``train_augment``); the homework's, ImageFolder + PIL
transforms in a DataLoader with ``os.cpu_count()`` workers.

input_pipeline_speedup_busy: the 224 px pair again beside a process that the harness starts to
spin single-threaded matmuls on one core (another job on the machine; issue 10 item 7)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from bench.harness import Context, cuda_sync, figure, log, loadavg, now

AMORTIZE = 50  # epochs the homework trained the CNN for
NOTE = ("steady state: the first {} epoch(s) of each way are discarded; the ways' epochs are "
        "interleaved (ABBA) so load from other jobs hits both; images_per_s = images / time of "
        "the measured epochs; the one-time cache build is apart (cache_build_s) and amortized "
        "over 50 epochs. No model runs.")
SPINNER = ("import sys, time, numpy as np\n"  # one core of competing work until the deadline
           "end = time.time() + float(sys.argv[1])\n"
           "a = np.random.default_rng(0).random((384, 384))\n"
           "while time.time() < end: a = a @ a; a /= np.abs(a).max()\n")
ONE_THREAD = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


def naive_epoch_fn(data_dir: Path, size: int) -> tuple:
    """(one epoch of the homework's loader, its record)."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms as T

    from tune_pets.models import get_spec

    dc = get_spec("cnn").data_config(get_spec("cnn").defaults)
    tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(dc["mean"], dc["std"])])
    t0 = now()
    loader = DataLoader(datasets.ImageFolder(str(data_dir / "train"), transform=tf),
                        batch_size=64, num_workers=os.cpu_count() or 1, shuffle=True)
    info = {"imagefolder_scan_s": now() - t0, "num_workers": os.cpu_count(),
            "transform": repr(tf).replace("\n", ""), "note": "persistent_workers=False (the "
            "default, as the homework): every epoch restarts the worker processes"}
    return lambda: sum(len(y) for _, y in loader), info


def cached_epoch_fn(data_dir: Path, size: int, cache_dir: Path, device: torch.device) -> tuple:
    """(one epoch of the ``Engine`` train batches ``fit`` iterates, homework CNN at ``size``,
    batch 64; its record), after building the uint8 cache (timed) and reloading it."""
    from tune_pets.data import load_split
    from tune_pets.engine import Engine, FitData
    from tune_pets.models import get_spec

    spec = get_spec("cnn")
    config = spec.defaults.replace(img_size=size, batch_size=64)
    dc, res, times = spec.data_config(config), spec.cache_res(config), []
    for _ in range(2):  # build, then reload from the cache
        t0 = now()
        split = load_split(data_dir, "train", res, interpolation=dc["interpolation"],
                           cache_dir=cache_dir, progress=False)
        times.append(now() - t0)
    data = FitData("images", split.classes, split.images, split.labels, preprocess=dc)
    batches = Engine(config, data, device).batches
    info = {"cache_res": res, "cache_build_s": times[0], "cache_reload_s": times[1],
            "cache_bytes": int(split.images.nbytes)}
    return lambda: sum(len(y) for _, y in batches.train(1)), info


def rates(times: list[float], counts: list[int], warmup: int) -> dict:
    t, c = times[warmup:], counts[warmup:]
    per = sorted(n / s for n, s in zip(c, t, strict=True))
    return {"images_per_s": sum(c) / sum(t), "images_per_s_median_epoch": per[len(per) // 2],
            "images_per_s_best_epoch": per[-1], "epoch_s": times, "images_per_epoch": counts[0],
            "warmup_epochs_discarded": warmup}


def pipeline_pair(ctx: Context, size: int, cache_dir: Path) -> tuple[dict, dict]:
    """Both ways' epochs interleaved (ABBA...) so drifting load hits both alike, then the cached
    way once more with 1 torch thread (how much a busy core costs it)."""
    warmup, epochs = ctx.s["pipe_warmup_epochs"], ctx.s["pipe_epochs"]
    ways = {"cached": cached_epoch_fn(ctx.data_dir, size, cache_dir, torch.device("cpu")),
            "naive": naive_epoch_fn(ctx.data_dir, size)}
    t: dict[str, list] = {"naive": [], "cached": []}
    n: dict[str, list] = {"naive": [], "cached": []}
    for i in range(warmup + epochs):
        for way in ("naive", "cached") if i % 2 == 0 else ("cached", "naive"):
            t0 = now()
            n[way].append(ways[way][0]())
            t[way].append(now() - t0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0, images = now(), sum(ways["cached"][0]() for _ in range(max(1, epochs)))
    one_thread = images / (now() - t0)
    torch.set_num_threads(threads)
    cached = {**rates(t["cached"], n["cached"], warmup), **ways["cached"][1],
              "torch_threads": threads, "images_per_s_with_1_torch_thread": one_thread}
    per_epoch, build_s = cached["images_per_epoch"], cached["cache_build_s"]
    cached[f"images_per_s_incl_cache_build_over_{AMORTIZE}_epochs"] = per_epoch * AMORTIZE / (
        build_s + AMORTIZE * per_epoch / cached["images_per_s"])
    return {**rates(t["naive"], n["naive"], warmup), **ways["naive"][1]}, cached


def cuda_rate(ctx: Context, size: int, cache_dir: Path, epochs: int = 3) -> dict:
    """The same Engine batches on the GPU (pinned host-to-device copy, augmentation there)."""
    epoch, _ = cached_epoch_fn(ctx.data_dir, size, cache_dir, torch.device("cuda"))
    times, count = [], 0
    for i in range(epochs + 1):  # the first epoch is warmup
        cuda_sync()
        t0, n = now(), epoch()
        cuda_sync()
        times.append(now() - t0)
        count += n if i else 0
    return {"images_per_s": count / sum(times[1:]), "epoch_s": times,
            "warmup_epochs_discarded": 1, "device": torch.cuda.get_device_name(0)}


def pair_figure(name: str, ctx: Context, size: int) -> dict:
    la0, cache_dir = loadavg(), ctx.tmp / f"cache_{name}"  # each figure builds its own cache
    naive, cached = pipeline_pair(ctx, size, cache_dir)
    return figure(
        name, cached["images_per_s"] / naive["images_per_s"],
        "x (cached images/s / naive images/s)", la0, img_size=size,
        way_a={"name": "naive: ImageFolder + PIL RandomResizedCrop/flip/ToTensor/Normalize, "
                       "DataLoader(batch_size=64, num_workers=os.cpu_count(), shuffle=True)",
               **naive},
        way_b={"name": "cached: load_split uint8 cache + Engine(...).batches.train "
                       "(to_device_uint8 + train_augment), batches of 64", **cached},
        cuda_train_augment=cuda_rate(ctx, size, cache_dir) if torch.cuda.is_available() else None,
        note=NOTE.format(ctx.s["pipe_warmup_epochs"]))


def run(ctx: Context) -> dict:
    out = {}
    for size in ctx.s["pipe_sizes"]:
        log(f"input pipeline @{size}px: cache build, then interleaved epochs of both ways")
        name = "input_pipeline_speedup" + ("" if size == 128 else f"_{size}")
        out[name] = pair_figure(name, ctx, size)
    return out


def run_busy(ctx: Context) -> dict:
    """The pair while one core spins; the spinner stops at ``busy_max_s`` or when the pair is
    done, whichever comes first."""
    size, limit = ctx.s["busy_size"], ctx.s["busy_max_s"]
    log(f"input pipeline @{size}px beside a busy core (spinner bounded to {limit} s)")
    spinner = subprocess.Popen([sys.executable, "-c", SPINNER, str(limit)],
                               env={**os.environ, **ONE_THREAD})
    t0 = now()
    try:
        fig = pair_figure("input_pipeline_speedup_busy", ctx, size)
    finally:
        # wait4, not Popen.wait: it also returns the spinner's CPU time (proof it competed).
        pid, status, usage = os.wait4(spinner.pid, os.WNOHANG)
        if pid == 0:
            os.kill(spinner.pid, signal.SIGTERM)
            _, status, usage = os.wait4(spinner.pid, 0)
        spinner.returncode = os.waitstatus_to_exitcode(status)
    wall, cpu_s = now() - t0, usage.ru_utime + usage.ru_stime
    fig["competitor"] = {"what": "numpy 384x384 matmul loop, 1 BLAS thread", "max_s": limit,
                         "cpu_s": cpu_s, "wall_s": wall, "busy_share_of_a_core": cpu_s / wall,
                         "stopped_early": pid == 0}
    fig["note"] += (f" Beside the competitor, which held {cpu_s / wall:.0%} of a core over the "
                    "run; compare input_pipeline_speedup_224, measured quiet.")
    return {"input_pipeline_speedup_busy": fig}
