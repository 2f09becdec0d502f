"""cnn_train_images_per_s: the homework CNN's training step rate at 128 and 224 px, batch 32,
on CPU (and on CUDA when present: bf16 autocast where native, channels_last). The step is
``Engine.step``, the one ``train.fit`` and every search trial run; batches come from the
engine's own augmentation and are drawn before the clock starts (model throughput only)."""

from __future__ import annotations

import numpy as np
import torch
from bench.harness import Context, cuda_sync, figure, loadavg, log, now

NUM_CLASSES = 37  # Oxford-IIIT Pet breeds
DRAWN = 8  # distinct batches cycled through (enough variety, bounded memory)


def step_rate(device: torch.device, size: int, warmup: int, steps: int,
              batch_size: int = 32) -> dict:
    """Images/s of ``Engine.step`` for the homework CNN config at ``size``."""
    from tune_pets.data import cache_res
    from tune_pets.engine import Engine, FitData
    from tune_pets.models import get_spec

    spec = get_spec("cnn")
    config = spec.defaults.replace(img_size=size, batch_size=batch_size)
    dc = spec.data_config(config)
    res, n = cache_res(size, dc["crop_pct"]), batch_size * DRAWN
    # Random pixels: a step's cost does not depend on what the images show.
    rng = np.random.default_rng(0)
    data = FitData("images", [f"class_{i}" for i in range(NUM_CLASSES)],
                   rng.integers(0, 256, (n, res, res, 3), dtype=np.uint8),
                   rng.integers(0, NUM_CLASSES, n).astype(np.int64), preprocess=dc)
    engine = Engine(config, data, device)
    it = engine.batches.forever()
    batches = [next(it) for _ in range(min(DRAWN, warmup + steps))]
    for i in range(warmup):
        engine.step(*batches[i % len(batches)])
    cuda_sync()
    t0 = now()
    for i in range(steps):
        loss, _ = engine.step(*batches[(warmup + i) % len(batches)])
    float(loss)  # waits for the device
    dt = now() - t0
    return {"images_per_s": batch_size * steps / dt, "ms_per_step": 1000 * dt / steps,
            "steps_timed": steps, "warmup_steps": warmup, "batch_size": batch_size,
            "amp_bf16": engine.precision == "bf16", "channels_last": engine.batches.channels_last,
            "torch_threads": torch.get_num_threads()}


def run(ctx: Context) -> dict:
    la0, cpu, cuda, batch = loadavg(), {}, None, ctx.s["cnn_batch_size"]
    for size, (warm, steps) in ctx.s["cnn_steps"].items():
        log(f"cnn Engine.step on cpu @{size}px ({steps} steps)")
        cpu[str(size)] = step_rate(torch.device("cpu"), size, warm, steps, batch)
    if torch.cuda.is_available():
        cuda = {}
        for size in ctx.s["cnn_steps"]:
            log(f"cnn Engine.step on cuda @{size}px")
            cuda[str(size)] = step_rate(torch.device("cuda"), size, *ctx.s["cuda_steps"], batch)
    return {"cnn_train_images_per_s": figure(
        "cnn_train_images_per_s", cpu["128"]["images_per_s"] if "128" in cpu else None,
        f"images/s (Engine.step, CPU, 128 px, batch {batch})", la0,
        cpu=cpu, cuda=cuda,
        cuda_note=None if cuda else "no CUDA device on this machine: the CUDA path (bf16 "
                                    "autocast + channels_last) was not run",
        note="homework CNN (3 conv blocks 64/128/256, AdamW, cosine schedule): "
             "tune_pets.engine.Engine.step on pre-drawn augmented batches of random pixels: "
             "model throughput only, no data pipeline")}
