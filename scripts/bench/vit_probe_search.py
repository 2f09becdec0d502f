"""vit_probe_search_speedup: wall time of a ViT linear-probe search done the homework's way
(every step: PIL RandomResizedCrop/flip/normalize in a DataLoader, frozen-backbone forward, head
step) over the project's way (``load_fit_data`` decodes and extracts features once, included;
``train.fit`` trains only the head per trial). Same images, trial configs, epochs and Optuna
driver. Random-init backbone (offline): accuracies mean nothing, throughput is the same."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from bench.harness import Context, figure, loadavg, log, now, timed, timed_attrs

PROJ_EPOCHS = 10  # the homework's probe trained 10 epochs
NOTE = ("The ratio is about trials x epochs: the naive way runs the backbone trials x epochs x "
        "(n_train + n_val) times, the cached way n_train + n_val, less the cached way's fixed "
        "costs; it can exceed trials x epochs since the naive way's DataLoader workers decode "
        "full-size JPEGs on the backbone's cores. The cached way trains on clean features "
        "(feature_views=0), the naive way on a fresh augmented view every epoch, as the homework.")


def subset_image_folder(src: Path, dst: Path, n_images: int) -> Path:
    """Copy ``n_images`` of ``src/train`` (round-robin over classes) and one held-out image per
    class (the layout needs that split; it is never read) to ``dst``."""
    from tune_pets.data import heldout_split_name, scan_split

    train = scan_split(src, "train")
    held = scan_split(src, heldout_split_name(src), train.classes)
    per_class = [[p for p, y in zip(train.paths, train.labels, strict=True) if y == c]
                 for c in range(len(train.classes))]
    order = [v[k] for k in range(max(map(len, per_class))) for v in per_class if k < len(v)]
    first = {y: p for p, y in reversed(list(zip(held.paths, held.labels, strict=True)))}  # 1st
    for rel in [*order[:n_images], *first.values()]:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, dst / rel)  # also warms the page cache for both ways
    return dst


def run_study(objective: Callable[[dict], float], n: int) -> tuple[float, list, list]:
    """Both ways' driver: an Optuna study of ``n`` enqueued seeded configs -> (wall s, values,
    configs)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rng = np.random.default_rng(0)
    configs = [{"lr": float(10 ** rng.uniform(-4, -1)), "pooling": ("cls", "mean", "both")[i % 3],
                "weight_decay": float(10 ** rng.uniform(-6, -2))} for i in range(n)]
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    for c in configs:
        study.enqueue_trial(c)

    def wrapped(trial) -> float:
        return objective({"lr": trial.suggest_float("lr", 1e-4, 1e-1, log=True),
                          "weight_decay": trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True),
                          "pooling": trial.suggest_categorical("pooling", ["cls", "mean", "both"])})

    t0 = now()
    study.optimize(wrapped, n_trials=n)
    return now() - t0, [t.value for t in study.trials], configs


def naive_objective(data_dir: Path, split_file: Path, epochs: int, cfg0, timing: dict):
    """The homework's probe: ImageFolder + PIL transforms (timm's data config) in DataLoaders,
    the frozen backbone every step, val every epoch. One backbone for all trials (one per trial
    would only slow the naive way)."""
    import timm
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms as T

    from tune_pets.backbone import build_backbone
    from tune_pets.engine import make_optimizer
    from tune_pets.models import ViTProbe

    t0 = now()
    backbone = build_backbone(cfg0)
    dc = timm.data.resolve_model_data_config(backbone)
    interp, size = T.InterpolationMode(dc["interpolation"]), int(dc["input_size"][-1])
    norm = [T.ToTensor(), T.Normalize(dc["mean"], dc["std"])]
    train_tf = T.Compose([T.RandomResizedCrop(size, interpolation=interp),
                          T.RandomHorizontalFlip(), *norm])
    eval_tf = T.Compose([T.Resize(int(math.floor(size / dc["crop_pct"])), interpolation=interp),
                         T.CenterCrop(size), *norm])
    train_ds, eval_ds = (datasets.ImageFolder(str(data_dir / "train"), transform=tf)
                         for tf in (train_tf, eval_tf))
    split = json.loads(split_file.read_text())
    pos = {Path(p).relative_to(data_dir).as_posix(): i for i, (p, _) in enumerate(train_ds.samples)}
    tr, va = [pos[p] for p in split["train"]], [pos[p] for p in split["val"]]
    workers = os.cpu_count() or 1
    train_loader = DataLoader(Subset(train_ds, tr), batch_size=cfg0.batch_size, shuffle=True,
                              num_workers=workers, drop_last=len(tr) >= cfg0.batch_size)
    val_loader = DataLoader(Subset(eval_ds, va), batch_size=64, num_workers=workers)
    timing.update(setup_s=now() - t0, n_train=len(tr), n_val=len(va), num_workers=workers,
                  train_transform=repr(train_tf).replace("\n", ""),
                  eval_transform=repr(eval_tf).replace("\n", ""))

    def objective(params: dict) -> float:
        torch.manual_seed(cfg0.seed)
        config = cfg0.replace(**params)
        model = ViTProbe(backbone, len(train_ds.classes), config.pooling)
        optimizer, best = make_optimizer(config, model.parameters()), 0.0
        for _ in range(epochs):
            model.train()
            for x, y in train_loader:
                loss = torch.nn.functional.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            model.eval()
            with torch.no_grad():
                hits = torch.cat([model(x).argmax(1) == y for x, y in val_loader])
            best = max(best, hits.float().mean().item())
        return best

    return objective


def process_warmup(cfg0) -> float:
    """Once-per-process costs (first timm build and ViT forward, the metrics import), paid
    before either way is timed."""
    from tune_pets.backbone import build_backbone, token_features
    from tune_pets.metrics import classification_metrics

    t0 = now()
    with torch.no_grad():
        token_features(build_backbone(cfg0).eval(), torch.randn(2, 3, 224, 224))
    classification_metrics(np.array([0, 1]), np.array([0, 1]))
    return now() - t0


def cached_way(cfg0, sub: Path, ctx: Context) -> dict:
    """Decode + extract once (timed, with a breakdown), then ``fit`` per trial."""
    import tune_pets.engine
    import tune_pets.features
    from tune_pets.engine import load_fit_data
    from tune_pets.models import get_spec
    from tune_pets.train import fit

    calls: dict = {}
    vit = get_spec("vit")
    spec = dataclasses.replace(vit, data_config=timed(vit.data_config, "data_config", calls),
                               build_backbone=timed(vit.build_backbone, "build_backbone", calls))
    t0 = now()
    with timed_attrs([(tune_pets.engine, "load_split"), (tune_pets.features, "extract")], calls):
        data = load_fit_data(cfg0, sub, split_file=ctx.tmp / "vit_split.json", progress=False,
                             cache_dir=ctx.tmp / "vit_cache", spec=spec)
    extract_s, fit_s = now() - t0, []

    def objective(params: dict) -> float:
        t = now()
        history = fit(cfg0.replace(**params), data, spec=spec).history
        fit_s.append(now() - t)
        return max(h["val_acc"] for h in history)

    study_s, values, configs = run_study(objective, ctx.s["vit_trials"])
    breakdown = {k: {"calls": c, "s": t} for k, (c, t) in calls.items()}
    breakdown["notes"] = {"extract": "backbone forward over train + val (clean view)",
                          "build_backbone": "timm model construction (random init), once",
                          "data_config": "reads timm's pretrained config (no model built)"}
    return {"name": "cached: load_fit_data (decode + extract features once) + fit() per trial",
            "wall_s": extract_s + study_s, "decode_and_extract_s": extract_s,
            "decode_and_extract_breakdown": breakdown, "study_s": study_s,
            "fit_s_per_trial": fit_s, "backbone_forwards": len(data.train_y) + len(data.val_y),
            "feature_views": cfg0.feature_views, "val_acc_per_trial": values, "configs": configs}


def run(ctx: Context) -> dict:
    from tune_pets.models import get_spec

    n_img, trials, epochs = ctx.s["vit_images"], ctx.s["vit_trials"], ctx.s["vit_epochs"]
    sub = subset_image_folder(ctx.data_dir, ctx.tmp / "vit_subset", n_img)
    cfg0 = get_spec("vit").defaults.replace(pretrained=False, epochs=epochs)
    warmup_s, la0 = process_warmup(cfg0), loadavg()
    log(f"vit: cached way ({n_img} images, {trials} trials x {epochs} epochs)")
    b = cached_way(cfg0, sub, ctx)
    configs, images = b.pop("configs"), b["backbone_forwards"]
    log(f"vit: naive way ({trials} trials x {epochs} epochs x {images} images; minutes)")
    a: dict = {"name": "naive: PIL transforms + DataLoader + backbone forward every step"}
    t0 = now()
    objective = naive_objective(sub, ctx.tmp / "vit_split.json", epochs, cfg0, a)
    study_s, values, _ = run_study(objective, trials)
    forwards = trials * epochs * images
    a.update(wall_s=now() - t0, study_s=study_s, backbone_forwards=forwards,
             val_acc_per_trial=values)
    # The homework's 10-epoch probe, projected from the measured per-trial-epoch costs.
    scale = PROJ_EPOCHS / epochs
    projected = (a["setup_s"] + study_s * scale) / (b["decode_and_extract_s"] +
                                                      b["study_s"] * scale)
    extract_s = b["decode_and_extract_breakdown"].get("extract", {}).get("s", math.nan)
    return {"vit_probe_search_speedup": figure(
        "vit_probe_search_speedup", a["wall_s"] / b["wall_s"], "x (naive wall / cached wall)",
        la0, way_a=a, way_b=b, ratio_trials_only=study_s / b["study_s"],
        process_warmup_s_not_counted=warmup_s, **{
            f"projected_ratio_at_{PROJ_EPOCHS}_epochs": projected},
        projection_note=f"not measured: per-trial-epoch costs scaled to {PROJ_EPOCHS} epochs, "
                        "extraction paid once",
        params={"images": n_img, "n_train": a["n_train"], "n_val": a["n_val"], "trials": trials,
                "epochs": epochs, "batch_size": cfg0.batch_size, "backbone": cfg0.backbone,
                "pretrained": False, "img_size": 224, "trial_configs": configs},
        driver=f"one in-process Optuna study per way, TPESampler(seed=0), the same {trials} "
               "enqueued configs: only the data path differs",
        naive_s_per_image_step=study_s / forwards, extract_s_per_image=extract_s / images,
        note=NOTE)}
