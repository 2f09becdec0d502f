"""``RunConfig``: everything one training run needs (search trials, ``train`` and ``reproduce``
each write theirs as ``config.json``), and ``validate_config``, its type and range checks."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any

from tune_pets.utils import UserError

# Model names of earlier versions, still read from old checkpoints and best_config.json files.
LEGACY_MODEL_NAMES = {"vit_probe": "vit"}
METRICS = ("val_acc", "val_macro_f1", "val_loss", "train_loss", "train_acc")
LOWER_IS_BETTER = ("val_loss", "train_loss")
DEFAULT_VAL_FRACTION = 0.2  # share of train held out as the search's validation split


@dataclass(frozen=True)
class RunConfig:
    """Everything one training run needs. Defaults are the homework's CNN settings but for
    ``img_size`` (128; the homework trained at 224, which the ``cnn`` spec's defaults use)."""

    model: str = "cnn"  # a name in the model registry (tune_pets.models): cnn, vit, ...
    epochs: int = 50  # the homework trained the CNN for 50 epochs
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adamw"  # adamw | adam | sgd
    weight_decay: float = 0.01  # AdamW's default; the homework did not set it
    momentum: float = 0.9  # SGD only
    scheduler: str = "cosine"  # cosine | none
    warmup_epochs: int = 0  # linear warmup before the cosine decay
    label_smoothing: float = 0.0
    img_size: int = 128  # side of the square network input
    # CNN shape: `depth` conv blocks, channels width * 2**i (capped at 512).
    depth: int = 3
    width: int = 64
    dropout: float = 0.2
    # Augmentation: RandomResizedCrop scale lower bound (0.08 is torchvision's default), flip prob.
    aug_scale_min: float = 0.08
    hflip: float = 0.5
    # ViT probe only.
    backbone: str = "vit_tiny_patch16_224"
    pooling: str = "cls"  # cls | mean | both (features of the frozen backbone)
    feature_views: int = 0  # 0: clean eval-transform features; k>0: k augmented train views
    pretrained: bool = True
    weights: str | None = None  # local weights file for the backbone (offline use)
    metric: str = "val_acc"  # which val metric picks the best epoch
    seed: int = 0  # weight init, batch order, augmentation
    split_seed: int | None = None  # None: ``seed``; pin it to vary ``seed`` on the same val split
    deterministic: bool = False  # reproduce sets True
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    max_steps_per_epoch: int = 0  # 0 = full epoch; small values make smoke runs fast

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> RunConfig:
        if not isinstance(d, dict):
            raise UserError(f"{source}: the config is a {type(d).__name__}, not a JSON object")
        unknown = sorted(set(d) - set(CONFIG_FIELDS))
        if unknown:
            raise UserError(
                f"{source}: unknown config key(s) {', '.join(unknown)}; "
                f"valid keys: {', '.join(sorted(CONFIG_FIELDS))}"
            )
        if d.get("model") in LEGACY_MODEL_NAMES:
            d = {**d, "model": LEGACY_MODEL_NAMES[d["model"]]}
        return validate_config(cls(**d), source)

    @property
    def val_split_seed(self) -> int:
        return self.seed if self.split_seed is None else self.split_seed


CONFIG_FIELDS = {f.name: f for f in fields(RunConfig)}
CHOICES = {
    "optimizer": ("adamw", "adam", "sgd"),
    "scheduler": ("cosine", "none"),
    "pooling": ("cls", "mean", "both"),
    "metric": METRICS,
}
_RANGES = {  # name: (low, high, inclusive-low)
    "epochs": (1, 10_000, True),
    "batch_size": (1, 65_536, True),
    "lr": (0.0, 10.0, False),
    "weight_decay": (0.0, 10.0, True),
    "momentum": (0.0, 1.0, True),
    "warmup_epochs": (0, 10_000, True),
    "label_smoothing": (0.0, 0.999, True),
    "img_size": (16, 1024, True),
    "depth": (1, 8, True),
    "width": (4, 512, True),
    "dropout": (0.0, 0.999, True),
    "aug_scale_min": (0.01, 1.0, True),
    "hflip": (0.0, 1.0, True),
    "feature_views": (0, 64, True),
    "max_steps_per_epoch": (0, 10**9, True),
    "seed": (0, 2**32 - 1, True),  # numpy seeds must fit in 32 bits
    "split_seed": (0, 2**32 - 1, True),
}


def validate_config(cfg: RunConfig, source: str = "config") -> RunConfig:
    """Type- and range-check every field, normalising numbers; errors name the source and the
    key (the flag, for ``source="command line"``)."""
    values = {}
    for key, f in CONFIG_FIELDS.items():
        v = getattr(cfg, key)
        name = f"--{key.replace('_', '-')}" if source == "command line" else key
        typ = f.type.removesuffix(" | None")  # a string: annotations are not evaluated
        if v is None and typ != f.type:
            values[key] = v
            continue
        if typ == "int":
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            if isinstance(v, bool) or not isinstance(v, int):
                raise UserError(f"{source}: {name} must be an integer, got {v!r}")
        elif typ == "float":
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise UserError(f"{source}: {name} must be a finite number, got {v!r}")
            v = float(v)
        elif typ == "bool" and not isinstance(v, bool):
            raise UserError(f"{source}: {name} must be true or false, got {v!r}")
        elif typ == "str" and not isinstance(v, str):
            raise UserError(f"{source}: {name} must be a string, got {v!r}")
        if key == "model" and not v:
            raise UserError(f"{source}: {name} must name a registered model")
        if key in CHOICES and v not in CHOICES[key]:
            raise UserError(f"{source}: {name} must be one of {', '.join(CHOICES[key])}, got {v!r}")
        if key in _RANGES:
            lo, hi, inclusive = _RANGES[key]
            if not ((v >= lo if inclusive else v > lo) and v <= hi):
                bracket = "[" if inclusive else "("
                raise UserError(f"{source}: {name}={v} is out of range {bracket}{lo}, {hi}]")
        values[key] = v
    warmup, epochs = values["warmup_epochs"], values["epochs"]
    if warmup >= epochs:  # epochs >= 1 (checked above), so a warmup of 0 always passes
        raise UserError(f"{source}: warmup_epochs ({warmup}) must be < epochs ({epochs})")
    return RunConfig(**values)
