"""The training engine: ``FitData`` (what a run trains on), its batches, and ``Engine``, which
builds model, optimizer, LR schedule and loss once and runs ``step()`` / ``run_epoch()``.
``train.fit``, the overfit check, profiling and the benchmark all drive the same ``Engine``, so
what is profiled or benchmarked is exactly the step a search trial runs.

    from tune_pets.sample import sample_dir  # the photos shipped with the package

    data = load_fit_data(config, sample_dir(), split_file="val_split.json")
    engine = Engine(config, data)
    metrics = {**engine.run_epoch(1), **engine.validate()}
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tune_pets.config import DEFAULT_VAL_FRACTION, RunConfig
from tune_pets.data import default_cache_dir, eval_transform
from tune_pets.data import iterate_indices, load_or_make_val_split, load_split, progress_bar
from tune_pets.data import to_device_uint8, train_augment
from tune_pets.metrics import classification_metrics
from tune_pets.models import ModelSpec, get_spec, pool_features
from tune_pets.utils import UserError, seed_everything


class NonFiniteLossError(UserError):
    """The training loss became NaN or inf (diverged); the run cannot continue. A UserError:
    the cure is a setting (a lower learning rate), so the commands say it in one line."""


@dataclass
class FitData:
    """``kind="images"``: ``train_x`` and ``val_x`` uint8 ``[N, R, R, 3]``. ``kind="features"``:
    frozen-backbone features, float32: ``train_x`` ``[V, N, 2, D]`` (V views: the clean one, or
    ``feature_views`` augmented ones), ``val_x`` ``[N, 2, D]`` (the clean view)."""

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

    @property
    def feature_dim(self) -> int:
        return int(self.train_x.shape[-1]) if self.kind == "features" else 0

    @property
    def has_val(self) -> bool:
        return self.val_y is not None and len(self.val_y) > 0


def load_fit_data(
    config: RunConfig,
    data_dir: str | Path,
    *,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    split_file: str | Path | None = None,
    full_train: bool = False,
    reuse_split: bool = False,
    cache_dir: str | Path | None = None,
    skip_bad: bool = False,
    device: torch.device | None = None,
    img_sizes: Sequence[int] = (),
    progress: bool = True,
    spec: ModelSpec | None = None,
) -> FitData:
    """Decode (or read from cache) the train split, carve the val split (unless ``full_train``)
    and, for a features model, turn both into cached features. ``img_sizes``: every img_size a
    search may ask for (the cache is built for the largest). ``reuse_split``: the saved split
    must fit the data (a resumed search), see ``load_or_make_val_split``."""
    spec = spec or get_spec(config.model)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    dc = spec.data_config(config)
    res = spec.cache_res(config, img_sizes)
    kw = {"cache_dir": cache_dir, "skip_bad": skip_bad, "progress": progress}
    train_all = load_split(data_dir, "train", res, interpolation=dc["interpolation"], **kw)
    if len(train_all.classes) < 2:  # it scored 1.0 on everything, and meant nothing
        where = Path(data_dir) / "train"
        raise UserError(f"{where} has 1 class folder; a classifier needs at least 2")
    info = {
        "data_dir": str(data_dir),
        "train_fingerprint": train_all.fingerprint,
        "cache_res": int(train_all.images.shape[1]),
        "skipped": train_all.skipped,
    }
    train, val = train_all, None
    if not full_train:
        if split_file is None:
            raise ValueError("split_file is required unless full_train=True")
        seed = config.val_split_seed
        train, val = load_or_make_val_split(
            train_all, split_file, val_fraction, seed, reuse_only=reuse_split
        )
        info.update(
            split_file=str(split_file), val_fraction=val_fraction, split_seed=seed, n_val=len(val)
        )
    info["n_train"] = len(train)
    train_x, val_x = train.images, None if val is None else val.images
    if spec.kind == "features":
        from tune_pets.features import cached_features

        # Features are computed for all of train once (then indexed), so any val split reuses
        # them; the backbone is built at most once, and only on a cache miss.
        get_backbone = functools.cache(functools.partial(spec.build_backbone, config))
        args = (config, get_backbone, dc, train_all, cache_dir, device or torch.device("cpu"))
        features = functools.partial(cached_features, *args, progress=progress)
        # The clean view is the val features, and the train ones without augmented views.
        clean = features(0) if val is not None or not config.feature_views else None
        views = features(config.feature_views) if config.feature_views else clean
        pos = {p: i for i, p in enumerate(train_all.paths)}
        train_x = views[:, np.asarray([pos[p] for p in train.paths], dtype=np.int64)]
        if val is not None:
            val_x = clean[0][np.asarray([pos[p] for p in val.paths], dtype=np.int64)]
    val_y = None if val is None else val.labels
    return FitData(spec.kind, train_all.classes, train_x, train.labels, val_x, val_y, dc, info)


def steps_per_epoch(config: RunConfig, n: int) -> int:
    steps = max(1, n // config.batch_size)
    return min(steps, config.max_steps_per_epoch) if config.max_steps_per_epoch else steps


class Batches:
    """Device batches for training (augmented) and evaluation, from images or features."""

    def __init__(self, config: RunConfig, data: FitData, device: torch.device):
        self.config, self.data, self.device = config, data, device
        self.gen = torch.Generator().manual_seed(config.seed)
        # channels_last speeds up convolutions on CUDA; on CPU it is slower for this CNN.
        self.channels_last = device.type == "cuda" and data.kind == "images"

    def _batch(self, x_all: np.ndarray, y_all: np.ndarray, idx: torch.Tensor, augment: bool):
        cfg, pre, i = self.config, self.data.preprocess, idx.numpy()
        y = torch.from_numpy(y_all[i]).to(self.device, non_blocking=True)
        if self.data.kind == "features":
            return pool_features(torch.from_numpy(x_all[i]), cfg.pooling).to(self.device), y
        x, mean, std = to_device_uint8(x_all, i, self.device), pre["mean"], pre["std"]
        if augment:
            x = train_augment(x, cfg.img_size, mean, std, cfg.aug_scale_min, cfg.hflip, self.gen)
        else:
            x = eval_transform(x, cfg.img_size, pre["crop_pct"], mean, std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def train(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        d, bs = self.data, self.config.batch_size
        n = len(d.train_y)
        # a features model trains on one augmented view per epoch
        x_all = d.train_x if d.kind == "images" else d.train_x[(epoch - 1) % d.train_x.shape[0]]
        # full batches; tiny data keeps its one batch
        batches = iterate_indices(n, bs, True, self.gen, drop_last=n >= bs)
        for idx in itertools.islice(batches, steps_per_epoch(self.config, n)):
            yield self._batch(x_all, d.train_y, idx, augment=True)

    def forever(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Train batches of epoch 1, 2, ...: profiling may need more steps than an epoch has."""
        if len(self.data.train_y) == 0:
            raise UserError("no training batches: the train split is empty")
        for epoch in itertools.count(1):
            yield from self.train(epoch)

    def eval(self, x_all: np.ndarray, y_all: np.ndarray, batch_size: int = 256):
        for idx in iterate_indices(len(y_all), batch_size, shuffle=False):
            yield self._batch(x_all, y_all, idx, augment=False)


def make_optimizer(config: RunConfig, params) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    kw = {"lr": config.lr, "weight_decay": config.weight_decay}
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, momentum=config.momentum, nesterov=config.momentum > 0, **kw)
    return {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[config.optimizer](params, **kw)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Linear warmup, then cosine decay to 0 (or constant)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "none":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def precision(config: RunConfig, device: torch.device) -> str:
    """``bf16`` only on GPUs with native bf16 (compute capability 8.0+); older GPUs emulate it
    and run slower than fp32, and CPUs use fp32."""
    if not config.amp or device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp32"


def autocast(prec: str, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=prec == "bf16")


@torch.no_grad()
def predict(model: nn.Module, batches, prec: str = "fp32", loss_fn: nn.Module | None = None):
    """Argmax predictions, labels and mean loss over ``batches`` (model in eval mode)."""
    model.eval()
    preds, labels, total, n = [], [], torch.zeros(()), 0
    for x, y in batches:
        with autocast(prec, x.device):
            logits = model(x).float()
        if loss_fn is not None:
            total = total + loss_fn(logits, y).cpu() * len(y)
        n += len(y)
        preds.append(logits.argmax(1).cpu())
        labels.append(y.cpu())
    return torch.cat(preds).numpy(), torch.cat(labels).numpy(), float(total) / max(n, 1)


class Engine:
    """Model, optimizer, LR schedule, loss and batches of one run, built once."""

    def __init__(
        self,
        config: RunConfig,
        data: FitData,
        device: torch.device | None = None,
        spec: ModelSpec | None = None,
    ):
        self.config, self.data = config, data
        self.device = device or torch.device("cpu")
        self.spec = spec or get_spec(config.model)
        self.determinism = seed_everything(config.seed, config.deterministic)
        self.batches = Batches(config, data, self.device)
        self.model = self.spec.trainable(config, data.num_classes, data.feature_dim).to(self.device)
        if self.batches.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = make_optimizer(config, self.model.parameters())
        self.steps_per_epoch = steps_per_epoch(config, len(data.train_y))
        total = self.steps_per_epoch * config.epochs
        warmup = self.steps_per_epoch * config.warmup_epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total, warmup, config.scheduler)
        )
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        # val_loss is the plain cross-entropy: a smoothed one has a floor that grows with the
        # smoothing (0.67 at 0.1 for 37 classes), so a search on val_loss would rank by it.
        self.val_loss_fn = nn.CrossEntropyLoss()
        self.precision = precision(config, self.device)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimization and LR-schedule step; returns (loss, logits) detached, on the device
        (no host sync)."""
        self.model.train()
        with autocast(self.precision, x.device):
            logits = self.model(x)
            loss = self.loss_fn(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return loss.detach(), logits.detach()

    def run_epoch(self, epoch: int, progress: bool = False) -> dict:
        """Train one epoch; ``train_loss``, ``train_acc`` and ``lr``, the mean rate of its steps
        (the schedule steps per batch: the rate at its end, logged before, showed no warmup and
        0 for the last epoch). Raises ``NonFiniteLossError`` when the loss diverged."""
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen, lr_sum, steps = 0, 0.0, 0
        desc = f"epoch {epoch}/{self.config.epochs}"
        batches = self.batches.train(epoch)
        bar = progress_bar(batches, self.steps_per_epoch, desc, progress, leave=False, unit="it")
        for x, y in bar:
            lr_sum, steps = lr_sum + self.lr, steps + 1
            loss, logits = self.step(x, y)
            loss_sum += loss * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
        train_loss = loss_sum.item() / seen  # the epoch's one host sync
        if not math.isfinite(train_loss):
            msg = f"loss became {train_loss} in epoch {epoch} (lr={self.config.lr:g})"
            raise NonFiniteLossError(msg + "; lower the learning rate")
        return {"train_loss": train_loss, "train_acc": correct.item() / seen, "lr": lr_sum / steps}

    def validate(self) -> dict:
        d = self.data
        batches = self.batches.eval(d.val_x, d.val_y)
        preds, labels, loss = predict(self.model, batches, self.precision, self.val_loss_fn)
        m = classification_metrics(labels, preds)
        return {"val_loss": loss, "val_acc": m["accuracy"], "val_macro_f1": m["macro_f1"]}

    def state_dict(self) -> dict:
        """A CPU copy of the trained module's weights (for a checkpoint)."""
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def train_state(self) -> dict:
        """Everything the next epochs depend on (weights, optimizer, schedule, both RNGs):
        ``load_train_state`` of it continues the run exactly. Loads with weights_only=True."""
        state = {
            "model": self.state_dict(),
            # deep copies: the live optimizer state changes in place at the next step
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "scheduler": copy.deepcopy(self.scheduler.state_dict()),
            "batch_rng": self.batches.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_train_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        # a copy: the optimizer would adopt (and then update in place) the caller's tensors
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.scheduler.load_state_dict(state["scheduler"])
        self.batches.gen.set_state(state["batch_rng"])
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
