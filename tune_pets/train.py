"""Training: ``fit(config, data, on_epoch_end)`` (plain PyTorch, no Ray) and the single-run CLI.

    python -m tune_pets.train cnn --data-dir data/oxford_pets --epochs 5 --img-size 128
    python -m tune_pets.train vit --data-dir data/oxford_pets --no-pretrained
    python -m tune_pets.train cnn --data-dir data/oxford_pets --overfit-batches 1

One run trains on the train split minus a seeded, stratified val split (saved as a file list),
validates every epoch and keeps the best checkpoint by ``config.metric``. CNN batches come from
the decode-once uint8 cache with batched tensor augmentation; the ViT probe trains its head on
cached frozen-backbone features.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tune_pets.config import RunConfig, canonical_model, cli_name, homework_defaults
from tune_pets.data import (
    cache_res,
    default_cache_dir,
    eval_transform,
    iterate_indices,
    load_or_make_val_split,
    load_split,
    to_device_uint8,
    train_augment,
)
from tune_pets.evaluate import classification_metrics
from tune_pets.models import build_model, data_config, make_probe_head, pool_features
from tune_pets.utils import (
    ArgumentParser,
    UserError,
    atomic_torch_save,
    atomic_write_json,
    cli_main,
    env_info,
    fraction,
    nonneg_int,
    positive_float,
    positive_int,
    resolve_device,
    seed_everything,
)

CHECKPOINT_FORMAT = "tune_pets/1"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf (diverged); the run cannot continue."""


# ---------------------------------------------------------------- what fit() trains on
@dataclass
class FitData:
    """Arrays one fit needs. ``kind="images"``: uint8 ``[N, R, R, 3]``; ``kind="features"``:
    float32 ``[V, N, 2, D]`` frozen-backbone features (V views of train, 1 of val)."""

    kind: str
    classes: list[str]
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray | None = None
    val_y: np.ndarray | None = None
    preprocess: dict = field(default_factory=dict)  # img_size, crop_pct, interpolation, mean, std
    info: dict = field(default_factory=dict)  # data dir, fingerprints, split file, counts

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def load_fit_data(
    config: RunConfig,
    data_dir: str | Path,
    *,
    val_fraction: float = 0.2,
    split_file: str | Path | None = None,
    full_train: bool = False,
    cache_dir: str | Path | None = None,
    skip_bad: bool = False,
    device: torch.device | None = None,
    img_sizes: Sequence[int] = (),
    progress: bool = True,
) -> FitData:
    """Decode (or read from cache) the train split, carve the val split (unless
    ``full_train``), and for the ViT probe turn both into cached features.

    ``img_sizes``: every img_size a search may ask for (the cache is built for the largest).
    """
    model = canonical_model(config.model)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    device = device or torch.device("cpu")
    dc = data_config(config)
    size = max([dc["img_size"], *img_sizes]) if model == "cnn" else dc["img_size"]
    res = cache_res(size, dc["crop_pct"])
    train_all = load_split(
        data_dir,
        "train",
        res,
        interpolation=dc["interpolation"],
        cache_dir=cache_dir,
        skip_bad=skip_bad,
        progress=progress,
    )
    info = {
        "data_dir": str(data_dir),
        "train_fingerprint": train_all.fingerprint,
        "cache_res": res,
        "skipped": train_all.skipped,
    }
    if full_train:
        train, val = train_all, None
    else:
        if split_file is None:
            raise ValueError("split_file is required unless full_train=True")
        train, val = load_or_make_val_split(train_all, split_file, val_fraction, config.seed)
        info.update(split_file=str(split_file), val_fraction=val_fraction, n_val=len(val))
    info["n_train"] = len(train)
    if model == "cnn":
        return FitData(
            "images",
            train_all.classes,
            train.images,
            train.labels,
            None if val is None else val.images,
            None if val is None else val.labels,
            dc,
            info,
        )
    from tune_pets.features import cached_features
    from tune_pets.models import build_backbone

    # Features are computed for all of train once (then indexed), so any val split reuses them;
    # the backbone is built at most once, and only on a cache miss.
    get_backbone = functools.cache(functools.partial(build_backbone, config))
    clean = cached_features(config, get_backbone, dc, train_all, cache_dir, device, 0, progress)
    views = (
        clean
        if config.feature_views == 0
        else cached_features(
            config, get_backbone, dc, train_all, cache_dir, device, config.feature_views, progress
        )
    )
    pos = {p: i for i, p in enumerate(train_all.paths)}
    tr_idx = np.asarray([pos[p] for p in train.paths], dtype=np.int64)
    va = None
    if val is not None:
        va = clean[0][np.asarray([pos[p] for p in val.paths], dtype=np.int64)]
    return FitData(
        "features",
        train_all.classes,
        views[:, tr_idx],
        train.labels,
        va,
        None if val is None else val.labels,
        dc,
        info,
    )


# ---------------------------------------------------------------- building blocks
def build_trainable(config: RunConfig, data: FitData) -> nn.Module:
    """The module ``fit`` optimizes: the whole CNN, or only the probe head on features."""
    if data.kind == "images":
        return build_model(config.model, data.num_classes, config)
    return make_probe_head(data.train_x.shape[-1], data.num_classes, config.pooling)


def make_optimizer(config: RunConfig, params) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        params,
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=config.momentum > 0,
    )


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Linear warmup, then cosine decay to 0 (or constant)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "none":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def steps_per_epoch(config: RunConfig, n: int) -> int:
    steps = max(1, n // config.batch_size) if n >= config.batch_size else 1
    return min(steps, config.max_steps_per_epoch) if config.max_steps_per_epoch else steps


class Batches:
    """Device batches for training (augmented) and evaluation, from images or features."""

    def __init__(self, config: RunConfig, data: FitData, device: torch.device):
        self.config, self.data, self.device = config, data, device
        self.gen = torch.Generator().manual_seed(config.seed)
        self.channels_last = device.type == "cuda" and data.kind == "images"

    def train(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        cfg, d = self.config, self.data
        n = len(d.train_y)
        drop_last = n >= cfg.batch_size  # homework: full batches; tiny data keeps its one batch
        limit = steps_per_epoch(cfg, n)
        for step, idx in enumerate(iterate_indices(n, cfg.batch_size, True, self.gen, drop_last)):
            if step >= limit:
                break
            y = torch.from_numpy(d.train_y[idx.numpy()]).to(self.device, non_blocking=True)
            if d.kind == "images":
                x = to_device_uint8(d.train_x, idx.numpy(), self.device)
                x = train_augment(
                    x,
                    cfg.img_size,
                    d.preprocess["mean"],
                    d.preprocess["std"],
                    cfg.aug_scale_min,
                    cfg.hflip,
                    generator=self.gen,
                )
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
            else:
                view = d.train_x[(epoch - 1) % d.train_x.shape[0]]
                x = pool_features(torch.from_numpy(view[idx.numpy()]), cfg.pooling).to(self.device)
            yield x, y

    def eval(self, x_all: np.ndarray, y_all: np.ndarray, batch_size: int = 256):
        cfg, d = self.config, self.data
        for idx in iterate_indices(len(y_all), batch_size, shuffle=False):
            i = idx.numpy()
            y = torch.from_numpy(y_all[i]).to(self.device)
            if d.kind == "images":
                x = to_device_uint8(x_all, i, self.device)
                x = eval_transform(
                    x,
                    cfg.img_size,
                    d.preprocess["crop_pct"],
                    d.preprocess["mean"],
                    d.preprocess["std"],
                )
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
            else:
                x = pool_features(torch.from_numpy(x_all[i]), cfg.pooling).to(self.device)
            yield x, y


def autocast(config: RunConfig, device: torch.device):
    """bf16 autocast on CUDA (no GradScaler needed for bf16); a no-op on CPU."""
    return torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=config.amp and device.type == "cuda"
    )


def train_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    config: RunConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimization step (also what ``tune_pets.profiling`` profiles). Returns loss, logits."""
    with autocast(config, x.device):
        logits = model(x)
        loss = loss_fn(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), logits.detach()


@torch.no_grad()
def predict(model: nn.Module, batches, config: RunConfig, loss_fn: nn.Module | None = None):
    """Logits-argmax predictions, labels and mean loss over ``batches``."""
    model.eval()
    preds, labels, total, n = [], [], 0.0, 0
    for x, y in batches:
        with autocast(config, x.device):
            logits = model(x).float()
        if loss_fn is not None:
            total += loss_fn(logits, y).item() * len(y)
        n += len(y)
        preds.append(logits.argmax(1).cpu())
        labels.append(y.cpu())
    return torch.cat(preds).numpy(), torch.cat(labels).numpy(), total / max(n, 1)


# ---------------------------------------------------------------- fit
@dataclass
class FitResult:
    history: list[dict]
    best_epoch: int
    best_metrics: dict
    checkpoint: dict  # the best epoch's checkpoint (see make_checkpoint)


def make_checkpoint(
    config: RunConfig, data: FitData, model: nn.Module, epoch: int, metrics: dict
) -> dict:
    """A self-describing checkpoint that loads with ``torch.load(weights_only=True)``.

    For the ViT probe ``state_dict`` holds the head only (``scope="head"``); the frozen backbone
    is rebuilt from ``config`` (pretrained, ``weights`` file, or seeded random init).
    """
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {
        "format": CHECKPOINT_FORMAT,
        "model": canonical_model(config.model),
        "scope": "model" if data.kind == "images" else "head",
        "config": config.to_dict(),
        "classes": list(data.classes),
        "preprocess": dict(data.preprocess),
        "epoch": epoch,
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        "state_dict": state,
    }


def fit(
    config: RunConfig,
    data: FitData,
    on_epoch_end: Callable[[dict, dict | None], None] | None = None,
    *,
    device: torch.device | None = None,
    tb_dir: str | Path | None = None,
    progress: bool = False,
) -> FitResult:
    """Train ``config`` on ``data``; validate each epoch; keep the best by ``config.metric``.

    ``on_epoch_end(metrics, checkpoint)`` is called after every epoch; ``checkpoint`` is the
    checkpoint dict when this epoch is the best so far, else None. Without a val split the last
    epoch is the best. Raises ``NonFiniteLossError`` if the loss diverges.
    """
    from tqdm.auto import tqdm

    device = device or torch.device("cpu")
    seed_everything(config.seed, config.deterministic)
    model = build_trainable(config, data).to(device)
    if device.type == "cuda" and data.kind == "images":
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(config, model.parameters())
    spe = steps_per_epoch(config, len(data.train_y))
    total, warmup = spe * config.epochs, spe * config.warmup_epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, warmup, config.scheduler)
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    batches = Batches(config, data, device)
    writer = None
    if tb_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(tb_dir))
    higher = config.metric != "val_loss" and config.metric != "train_loss"
    has_val = data.val_y is not None and len(data.val_y) > 0
    history: list[dict] = []
    best, best_epoch, best_ckpt = None, 0, None
    try:
        for epoch in range(1, config.epochs + 1):
            t0 = time.perf_counter()
            model.train()
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            seen = 0
            bar = tqdm(
                batches.train(epoch),
                total=spe,
                desc=f"epoch {epoch}/{config.epochs}",
                disable=not progress or None,
                leave=False,
                file=sys.stderr,
            )
            for x, y in bar:
                loss, logits = train_step(model, x, y, optimizer, loss_fn, config)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"loss became {loss.item()} at epoch {epoch} (lr={config.lr:g}); lower the "
                        f"learning rate"
                    )
                scheduler.step()
                loss_sum += loss * len(y)
                correct += (logits.argmax(1) == y).sum()
                seen += len(y)
            metrics = {
                "epoch": epoch,
                "train_loss": loss_sum.item() / seen,
                "train_acc": correct.item() / seen,
                "lr": optimizer.param_groups[0]["lr"],
            }
            if has_val:
                preds, labels, val_loss = predict(
                    model, batches.eval(data.val_x, data.val_y), config, loss_fn
                )
                m = classification_metrics(labels, preds, data.num_classes)
                metrics.update(val_loss=val_loss, val_acc=m["accuracy"], val_macro_f1=m["macro_f1"])
            metrics["epoch_time_s"] = time.perf_counter() - t0
            score = metrics.get(config.metric, metrics["train_loss"] if not has_val else None)
            if not has_val:
                is_best = True  # no val split (reproduce's full-train run): keep the last epoch
            else:
                is_best = best is None or (score > best if higher else score < best)
            ckpt = None
            if is_best:
                best, best_epoch = score, epoch
                ckpt = best_ckpt = make_checkpoint(config, data, model, epoch, metrics)
            history.append(metrics)
            if writer is not None:
                for k, v in metrics.items():
                    if k != "epoch":
                        writer.add_scalar(k, v, epoch)
                writer.flush()
            if on_epoch_end is not None:
                on_epoch_end(dict(metrics), ckpt)
    finally:
        if writer is not None:
            writer.close()
    return FitResult(history, best_epoch, history[best_epoch - 1], best_ckpt)


def overfit_check(
    config: RunConfig,
    data: FitData,
    n_batches: int = 1,
    max_steps: int = 300,
    device: torch.device | None = None,
) -> tuple[bool, int, float]:
    """Can the model memorize ``n_batches`` fixed batches (no augmentation, no dropout effect on
    the check)? Returns (passed, steps used, final accuracy on those batches)."""
    device = device or torch.device("cpu")
    seed_everything(config.seed, True)
    model = build_trainable(config, data).to(device)
    optimizer = make_optimizer(config.replace(weight_decay=0.0), model.parameters())
    loss_fn = nn.CrossEntropyLoss()
    n = min(len(data.train_y), n_batches * config.batch_size)
    x_all = data.train_x[:n] if data.kind == "images" else data.train_x[0][:n]
    fixed = list(Batches(config, data, device).eval(x_all, data.train_y[:n], config.batch_size))
    acc = 0.0
    for step in range(1, max_steps + 1):
        for x, y in fixed:
            model.train()
            train_step(model, x, y, optimizer, loss_fn, config)
        if step % 5 == 0 or step == max_steps:
            preds, labels, _ = predict(model, fixed, config)
            acc = float((preds == labels).mean())
            if acc == 1.0:
                return True, step, acc
    return False, max_steps, acc


# ---------------------------------------------------------------- CLI
def add_data_args(p: ArgumentParser) -> None:
    p.add_argument(
        "--data-dir", default="data/oxford_pets", help="ImageFolder root (train/, test/)"
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="decode/feature cache (default $TUNE_PETS_CACHE or ~/.cache/tune_pets)",
    )
    p.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="skip unreadable images (listed on stderr) instead of failing",
    )
    p.add_argument(
        "--no-pretrained",
        action="store_true",
        help="ViT: random backbone weights (offline tests); results are meaningless",
    )
    p.add_argument("--weights", default=None, help="ViT: local backbone weights file (offline use)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_from_args(args, base: RunConfig) -> RunConfig:
    """Apply the CLI's explicit flags on top of ``base`` and validate."""
    changes = {
        k: getattr(args, k)
        for k in (
            "epochs",
            "lr",
            "batch_size",
            "img_size",
            "seed",
            "optimizer",
            "weight_decay",
            "label_smoothing",
            "max_steps_per_epoch",
        )
        if getattr(args, k, None) is not None
    }
    if getattr(args, "no_pretrained", False):
        changes["pretrained"] = False
    if getattr(args, "weights", None):
        changes["weights"] = args.weights
    from tune_pets.config import validate_config

    return validate_config(base.replace(**changes), "command line")


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m tune_pets.train", description=__doc__.split("\n\n")[0])
    p.add_argument("model", choices=["cnn", "vit"], help="which model to train")
    add_data_args(p)
    p.add_argument("--epochs", type=positive_int)
    p.add_argument("--lr", type=positive_float)
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--img-size", type=positive_int, help="CNN input size (ViT uses its own: 224)")
    p.add_argument("--optimizer", choices=["adamw", "adam", "sgd"])
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--label-smoothing", type=float)
    p.add_argument(
        "--max-steps-per-epoch", type=nonneg_int, help="cap steps per epoch (smoke runs)"
    )
    p.add_argument("--seed", type=nonneg_int)
    p.add_argument("--val-fraction", type=fraction, default=0.2)
    p.add_argument("--run-name", default=None, help="TensorBoard run name (default: <model>)")
    p.add_argument("--artifacts-dir", default="artifacts")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument(
        "--overfit-batches",
        type=positive_int,
        default=None,
        help="overfit check: memorize N batches, print pass/fail, exit 1 on fail",
    )
    args = p.parse_args(argv)

    config = config_from_args(args, homework_defaults(args.model))
    if config.model == "vit_probe" and args.img_size and args.img_size != 224:
        raise UserError("--img-size: the ViT probe uses the backbone's own input size (224)")
    device = resolve_device(args.device)
    out = Path(args.artifacts_dir) / cli_name(config.model)
    data = load_fit_data(
        config,
        args.data_dir,
        val_fraction=args.val_fraction,
        split_file=out / "val_split.json",
        cache_dir=args.cache_dir,
        skip_bad=args.skip_bad_images,
        device=device,
        progress=not args.no_progress,
    )
    print(
        f"{cli_name(config.model)}: {data.info['n_train']} train / {data.info['n_val']} val "
        f"images, {data.num_classes} classes, device {device}"
    )

    if args.overfit_batches:
        ok, steps, acc = overfit_check(config, data, args.overfit_batches, device=device)
        print(
            f"overfit check ({args.overfit_batches} batch(es)): {'PASS' if ok else 'FAIL'} "
            f"- accuracy {acc:.3f} after {steps} steps"
        )
        return 0 if ok else 1

    run_name = args.run_name or cli_name(config.model)
    tb_dir = Path(args.runs_dir) / run_name

    def log(metrics: dict, ckpt: dict | None) -> None:
        if ckpt is not None:
            atomic_torch_save(ckpt, out / "checkpoint_best.pt")
        val = (
            f" val_loss {metrics['val_loss']:.4f} val_acc {metrics['val_acc']:.4f} "
            f"val_macro_f1 {metrics['val_macro_f1']:.4f}"
            if "val_acc" in metrics
            else ""
        )
        print(
            f"epoch {metrics['epoch']:3d} train_loss {metrics['train_loss']:.4f} "
            f"train_acc {metrics['train_acc']:.4f}{val} ({metrics['epoch_time_s']:.1f}s)"
            f"{' *' if ckpt else ''}",
            flush=True,
        )

    try:
        result = fit(config, data, log, device=device, tb_dir=tb_dir, progress=not args.no_progress)
    except KeyboardInterrupt:
        best = out / "checkpoint_best.pt"
        raise KeyboardInterrupt(
            (f"the best checkpoint so far is {best}; " if best.is_file() else "")
            + "config.json and metrics.json were not written; run the same command again to "
            "train from the start"
        ) from None
    atomic_write_json(
        out / "config.json",
        {
            "config": config.to_dict(),
            "data": data.info,
            "preprocess": data.preprocess,
            "device": str(device),
            "env": env_info(),
        },
    )
    atomic_write_json(
        out / "metrics.json",
        {"best_epoch": result.best_epoch, "best": result.best_metrics, "history": result.history},
    )
    print(
        f"best epoch {result.best_epoch}: {config.metric} "
        f"{result.best_metrics.get(config.metric, float('nan')):.4f}; wrote {out}/ and {tb_dir}/"
    )
    return 0


if __name__ == "__main__":
    cli_main(main, prog="python -m tune_pets.train")
