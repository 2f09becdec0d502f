"""The records that pass between commands, as dataclasses, so a file's keys are spelled once:
``SearchSummary`` (search/<name>/best_config.json), ``RunInfo`` (<tag>/config.json: what
produced a result) and ``ReproduceResult`` (<tag>/metrics.json: a retrain's test scores).

    ReproduceResult(...).write(path);  ReproduceResult.read(path, "metrics file")
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tune_pets.utils import UserError, atomic_write_json, read_json, upsert_csv_row

R = TypeVar("R", bound="Record")


_JSON_NAMES = {dict: "a JSON object", list: "a JSON array", str: "a string", float: "a number",
               int: "an integer", bool: "true or false", type(None): "null"}  # fmt: skip


class Record:
    """``to_dict``/``from_dict``/``write``/``read`` for the dataclasses below. Unknown keys are
    ignored and missing ones take their defaults, so older files still read."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[R], d: dict) -> R:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def write(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def upgrade(cls, d: dict) -> dict:  # an earlier version's file in this version's keys
        return d

    @classmethod
    def read(cls: type[R], path: str | Path, what: str) -> R:
        d = read_json(path, what)
        d = cls.upgrade(d) if isinstance(d, dict) else d
        required = [n for n, p in inspect.signature(cls).parameters.items() if p.default is p.empty]
        if not isinstance(d, dict) or any(k not in d for k in required):
            raise UserError(f"{what} {path}: not a {cls.__name__} file written by tune_pets")
        hints = typing.get_type_hints(cls)
        for name in d.keys() & hints.keys():  # a hand-edited "test_acc": "high" is damage too
            hint = hints[name]  # float, list[int], int | None, ...
            union = typing.get_origin(hint) in (typing.Union, types.UnionType)
            allowed = tuple(
                typing.get_origin(t) or t for t in (typing.get_args(hint) if union else (hint,))
            )
            allowed += (int,) if float in allowed else ()
            v = d[name]
            if not isinstance(v, allowed) or (isinstance(v, bool) and bool not in allowed):
                want = " or ".join(dict.fromkeys(_JSON_NAMES[t] for t in allowed))
                raise UserError(
                    f"{what} {path}: {name} is a {type(v).__name__} ({v!r:.40}), not {want}"
                )
            item = typing.get_args(hint)[0] if typing.get_origin(hint) is list else None
            if item and not all(isinstance(x, item) for x in v):  # "per_seed": [1]
                raise UserError(
                    f"{what} {path}: {name} holds an item that is not {_JSON_NAMES[item]}"
                )
        return cls.from_dict(d)

    @classmethod
    def read_or_none(cls: type[R], path: str | Path) -> R | None:  # the report shows it missing
        try:
            return cls.read(path, "file")
        except UserError:
            return None


@dataclass
class SearchSummary(Record):
    """The outcome of a search: the best trial's resolved config and how it was found."""

    model: str
    config: dict  # the full RunConfig of the best trial
    metric: str
    mode: str
    best_value: float  # the best trial's best ``metric`` over its epochs (whatever the pick)
    trial_id: str
    epoch: int | None = None  # the epoch of best_value
    val_acc: float | None = None
    val_macro_f1: float | None = None
    checkpoint: str | None = None
    search: dict = field(default_factory=dict)  # name, trial counts, budget, space, wall time
    data: dict = field(default_factory=dict)
    val_split_file: str | None = None
    env: dict = field(default_factory=dict)

    @property
    def smoke(self) -> bool:
        """A search of a shipped smoke space: its choice says nothing about the method."""
        return "/smoke/" in str(self.search.get("spec_file", "")).replace("\\", "/")

    @classmethod
    def upgrade(cls, d: dict) -> dict:
        # tune_pets 0.1 wrote the best value as best_<metric>.
        legacy = f"best_{d.get('metric', 'val_acc')}"
        if "best_value" not in d and legacy in d:
            return {**d, "best_value": d[legacy]}
        return d


@dataclass
class RunInfo(Record):
    """What produced a result: config, seeds, device, precision, data, library versions."""

    name: str  # the result tag (reproduce) or run name (train)
    config: dict
    seeds: list[int] = field(default_factory=list)
    deterministic: bool = False
    determinism: str = ""  # what determinism means here (device-specific)
    precision: str = "fp32"  # fp32 | bf16 (autocast on GPUs with native bf16)
    origin: dict = field(default_factory=dict)  # where the config came from (search trial, ...)
    data: dict = field(default_factory=dict)
    preprocess: dict = field(default_factory=dict)
    device: str = "cpu"
    smoke: bool = False  # a tiny smoke-size run: its numbers say nothing about the method
    env: dict = field(default_factory=dict)


@dataclass
class ReproduceResult(Record):
    """Test-split scores of a deterministic retrain (mean and std over seeds)."""

    tag: str
    split: str
    test_acc: float
    test_macro_f1: float
    test_acc_std: float = 0.0  # the sample standard deviation over seeds (n - 1)
    test_macro_f1_std: float = 0.0
    n_seeds: int = 1
    per_seed: list[dict] = field(default_factory=list)
    most_confused: list = field(default_factory=list)  # of the first seed, as the figures are
    prediction_spread: dict = field(default_factory=dict)  # see metrics.prediction_spread
    epochs: int | None = None
    max_steps_per_epoch: int = 0  # 0: full epochs
    img_size: int | None = None
    backbone: str | None = None  # features models: pretrained | random | file
    smoke: bool = False
    trial_id: str | None = None  # the search trial the config came from (tuned runs)
    train_images_per_s: float | None = None
    profile_steps: int = 0


def write_metrics_row(path: Path, tag: str, split: str, scores: dict[str, Any]) -> None:
    """The one writer of ``metrics.csv``: one row per (tag, split), fixed columns, scores to 6
    decimals whoever writes them."""
    values = {k: scores.get(k, "") for k in METRICS_CSV_COLUMNS[2:]}
    values = {k: round(v, 6) if isinstance(v, float) else v for k, v in values.items()}
    row = {"model": tag, "split": split, **values}
    upsert_csv_row(path, row, key=("model", "split"), fieldnames=METRICS_CSV_COLUMNS)


def drop_metrics_rows(path: Path, tag: str) -> None:
    """Remove ``tag``'s rows of ``metrics.csv``, every split's: a result being replaced."""
    if path.is_file():
        upsert_csv_row(path, {"model": tag}, ("model",), METRICS_CSV_COLUMNS, insert=False)


METRICS_CSV_COLUMNS = ("model", "split", "accuracy", "macro_f1", "accuracy_std", "macro_f1_std",
                       "n_seeds", "n_images")  # fmt: skip
