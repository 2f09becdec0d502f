"""Run configuration (a frozen dataclass) and search-space YAML loading with validation.

A ``RunConfig`` fully describes one training run; search trials, ``train`` and
``reproduce`` all build one and write it next to what it produced (``config.json``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tune_pets.utils import UserError

MODEL_ALIASES = {"cnn": "cnn", "vit": "vit_probe", "vit_probe": "vit_probe"}
CLI_MODELS = ("cnn", "vit")
METRICS = ("val_acc", "val_macro_f1", "val_loss", "train_loss", "train_acc")


def canonical_model(name: str) -> str:
    """Map a CLI model name (``cnn``/``vit``) to its registry name; unknown names list the
    valid ones."""
    try:
        return MODEL_ALIASES[name]
    except KeyError:
        raise UserError(f"unknown model {name!r}; valid models: {', '.join(CLI_MODELS)}") from None


def cli_name(model: str) -> str:
    return "vit" if canonical_model(model) == "vit_probe" else "cnn"


@dataclass(frozen=True)
class RunConfig:
    """Everything one training run needs. Defaults are the homework's CNN settings."""

    model: str = "cnn"  # registry name: "cnn" or "vit_probe"
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
    # Bookkeeping.
    metric: str = "val_acc"  # which val metric picks the best epoch
    seed: int = 0
    deterministic: bool = False  # reproduce sets True
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    max_steps_per_epoch: int = 0  # 0 = full epoch; small values make smoke runs fast

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> RunConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(
                f"{source}: unknown config key(s) {', '.join(unknown)}; "
                f"valid keys: {', '.join(sorted(known))}"
            )
        return validate_config(cls(**d), source)


def homework_defaults(model: str) -> RunConfig:
    """The homework's hand-picked settings: the baseline and the search's first point."""
    model = canonical_model(model)
    if model == "cnn":
        return RunConfig(
            model="cnn",
            epochs=50,
            batch_size=32,
            lr=1e-3,
            optimizer="adamw",
            scheduler="cosine",
            img_size=224,
            depth=3,
            width=64,
            dropout=0.2,
        )
    return RunConfig(
        model="vit_probe",
        epochs=10,
        batch_size=32,
        lr=1e-3,
        optimizer="adam",
        weight_decay=0.0,
        scheduler="none",
        img_size=224,
        dropout=0.0,
        pooling="cls",
    )


CONFIG_FIELDS = {f.name: f for f in fields(RunConfig)}
_CHOICES = {
    "optimizer": ("adamw", "adam", "sgd"),
    "scheduler": ("cosine", "none"),
    "pooling": ("cls", "mean", "both"),
    "metric": METRICS,
    "model": ("cnn", "vit_probe"),
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
}


def validate_config(cfg: RunConfig, source: str = "config") -> RunConfig:
    """Type- and range-check every field; errors name the source and the key (the flag, for
    ``source="command line"``)."""
    values = {}
    for key, f in CONFIG_FIELDS.items():
        v = getattr(cfg, key)
        name = f"--{key.replace('_', '-')}" if source == "command line" else key
        typ = f.type if isinstance(f.type, str) else f.type.__name__
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
        if key in _CHOICES and v not in _CHOICES[key]:
            raise UserError(
                f"{source}: {name} must be one of {', '.join(_CHOICES[key])}, got {v!r}"
            )
        if key in _RANGES:
            lo, hi, inclusive = _RANGES[key]
            if not ((v >= lo if inclusive else v > lo) and v <= hi):
                bracket = "[" if inclusive else "("
                raise UserError(f"{source}: {name}={v} is out of range {bracket}{lo}, {hi}]")
        values[key] = v
    if values["warmup_epochs"] >= values["epochs"] and values["warmup_epochs"] > 0:
        raise UserError(
            f"{source}: warmup_epochs ({values['warmup_epochs']}) must be < epochs "
            f"({values['epochs']})"
        )
    return RunConfig(**values)


# ---------------------------------------------------------------- search-space YAML
SAMPLERS = ("uniform", "loguniform", "choice", "randint", "quniform")
SPEC_KEYS = {
    "model",
    "metric",
    "mode",
    "num_samples",
    "max_epochs",
    "grace_period",
    "reduction_factor",
    "max_concurrent",
    "seed",
    "resources",
    "fixed",
    "space",
    "time_budget_s",
}


@dataclass(frozen=True)
class SearchSpec:
    """A parsed search-space file. ``space`` maps config keys to (sampler, args)."""

    model: str
    metric: str = "val_acc"
    mode: str = "max"
    num_samples: int = 20
    max_epochs: int = 30
    grace_period: int = 3
    reduction_factor: int = 3
    max_concurrent: int = 2
    seed: int = 0
    resources: dict = field(default_factory=lambda: {"cpu": 1, "gpu": 0})
    fixed: dict = field(default_factory=dict)
    space: dict = field(default_factory=dict)
    time_budget_s: float | None = None
    source: str = "<spec>"

    def replace(self, **changes: Any) -> SearchSpec:
        return dataclasses.replace(self, **changes)


def _as_number(v: Any, where: str) -> float:
    """YAML 1.1 reads ``1e-4`` as a string: accept it, reject anything non-numeric."""
    if isinstance(v, bool):
        raise UserError(f"{where}: expected a number, got {v!r}")
    if isinstance(v, (int, float)):
        return v
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            pass
    raise UserError(f"{where}: expected a number, got {v!r}")


def _parse_param(name: str, spec: Any, where: str) -> tuple[str, list]:
    if name not in CONFIG_FIELDS or name in ("model", "seed", "metric"):
        raise UserError(
            f"{where}: {name!r} is not a searchable field of the run config; valid: "
            f"{', '.join(k for k in CONFIG_FIELDS if k not in ('model', 'seed', 'metric'))}"
        )
    if not isinstance(spec, dict) or len(spec) != 1:
        raise UserError(
            f"{where}: write it as {{sampler: args}}, e.g. {{loguniform: [1.0e-4, 1.0e-2]}}"
        )
    ((sampler, args),) = spec.items()
    if sampler not in SAMPLERS:
        raise UserError(
            f"{where}: unknown sampler {sampler!r}; valid samplers: {', '.join(SAMPLERS)}"
        )
    if not isinstance(args, list) or not args:
        raise UserError(f"{where}: {sampler} takes a non-empty list")
    if sampler == "choice":
        return sampler, [_coerce_value(name, a, f"{where}.choice") for a in args]
    need = 3 if sampler == "quniform" else 2
    if len(args) != need:
        raise UserError(f"{where}: {sampler} takes {need} numbers, got {len(args)}")
    nums = [_as_number(a, f"{where}.{sampler}") for a in args]
    lo, hi = nums[0], nums[1]
    if lo >= hi:
        raise UserError(f"{where}: low ({lo}) must be < high ({hi})")
    if sampler == "loguniform" and lo <= 0:
        raise UserError(f"{where}: loguniform bounds must be > 0, got {lo}")
    if sampler == "randint":
        if not all(float(n).is_integer() for n in nums):
            raise UserError(f"{where}: randint bounds must be integers, got {args}")
        nums = [int(n) for n in nums]
    if sampler == "quniform" and nums[2] <= 0:
        raise UserError(f"{where}: quniform step must be > 0, got {nums[2]}")
    return sampler, nums


def load_search_spec(path: str | Path) -> SearchSpec:
    """Load and validate a search-space YAML. Every error names the file and the key."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"search space file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path}: YAML syntax error{at}: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of keys (model, metric, space, ...)")
    unknown = sorted(set(raw) - SPEC_KEYS)
    if unknown:
        raise UserError(
            f"{path}: unknown top-level key(s) {', '.join(map(str, unknown))}; "
            f"valid keys: {', '.join(sorted(SPEC_KEYS))}"
        )
    if "model" not in raw:
        raise UserError(f"{path}: missing key 'model' (cnn or vit)")
    try:
        model = canonical_model(str(raw["model"]))
    except UserError as e:
        raise UserError(f"{path}: model: {e}") from None
    kw: dict[str, Any] = {"model": model, "source": str(path)}
    if "metric" in raw:
        if raw["metric"] not in METRICS:
            raise UserError(
                f"{path}: metric must be one of {', '.join(METRICS)}, got {raw['metric']!r}"
            )
        kw["metric"] = raw["metric"]
    if "mode" in raw:
        if raw["mode"] not in ("min", "max"):
            raise UserError(f"{path}: mode must be min or max, got {raw['mode']!r}")
        kw["mode"] = raw["mode"]
    for key, lo in (
        ("num_samples", 1),
        ("max_epochs", 1),
        ("grace_period", 1),
        ("reduction_factor", 2),
        ("max_concurrent", 1),
        ("seed", 0),
    ):
        if key in raw:
            v = raw[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise UserError(f"{path}: {key} must be an integer >= {lo}, got {v!r}")
            kw[key] = v
    if "time_budget_s" in raw and raw["time_budget_s"] is not None:
        kw["time_budget_s"] = _as_number(raw["time_budget_s"], f"{path}: time_budget_s")
    if "resources" in raw:
        res = raw["resources"]
        if not isinstance(res, dict) or set(res) - {"cpu", "gpu"}:
            raise UserError(f"{path}: resources must be a mapping with keys cpu and gpu")
        res = {k: _as_number(v, f"{path}: resources.{k}") for k, v in res.items()}
        if res.get("cpu", 1) <= 0 or res.get("gpu", 0) < 0:
            raise UserError(f"{path}: resources.cpu must be > 0 and resources.gpu >= 0")
        kw["resources"] = {"cpu": res.get("cpu", 1), "gpu": res.get("gpu", 0)}
    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise UserError(f"{path}: fixed must be a mapping of run-config keys to values")
    for k in fixed:
        if k not in CONFIG_FIELDS:
            raise UserError(
                f"{path}: fixed.{k} is not a field of the run config; valid: "
                f"{', '.join(CONFIG_FIELDS)}"
            )
    kw["fixed"] = {k: _coerce_value(k, v, f"{path}: fixed.{k}") for k, v in fixed.items()}
    space = raw.get("space") or {}
    if not isinstance(space, dict):
        raise UserError(f"{path}: space must be a mapping of run-config keys to samplers")
    kw["space"] = {k: _parse_param(k, v, f"{path}: space.{k}") for k, v in space.items()}
    both = sorted(set(kw["space"]) & set(kw["fixed"]))
    if both:
        raise UserError(f"{path}: {', '.join(both)} is both fixed and searched; keep one")
    spec = SearchSpec(**kw)
    try:
        base = homework_defaults(model).replace(**spec.fixed)
    except TypeError as e:
        raise UserError(f"{path}: fixed: {e}") from None
    validate_config(base, f"{path}: fixed")
    # Every value the space can produce must make a valid config: check the bounds.
    for name, (sampler, args) in spec.space.items():
        values = args if sampler == "choice" else args[:2]
        for v in values:
            base = homework_defaults(model).replace(**{k: v for k, v in spec.fixed.items()})
            try:
                validate_config(
                    base.replace(**{name: _coerce_value(name, v, "")}), f"{path}: space.{name}"
                )
            except TypeError:
                raise UserError(f"{path}: space.{name}: bad value {v!r}") from None
    return spec


def _coerce_value(name: str, v: Any, where: str) -> Any:
    typ = CONFIG_FIELDS[name].type
    typ = typ if isinstance(typ, str) else typ.__name__
    if typ in ("float",) and isinstance(v, str):
        return _as_number(v, where)
    return v
