"""Search spaces: the YAML files in ``search_spaces/`` (shipped inside the package) parsed and
validated into a ``SearchSpec``. Every error names the file and the key.

    spec = load_search_spec(default_space("cnn"))   # spec.space: {"lr": ("loguniform", [..])}
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tune_pets.config import CONFIG_FIELDS, LOWER_IS_BETTER, METRICS, validate_config
from tune_pets.models import FEATURE_KEYS, get_spec
from tune_pets.utils import UserError


def spaces_dir() -> Path:
    """``tune_pets/search_spaces/`` in an installed wheel (setup.cfg maps the top-level
    ``search_spaces/`` folder there), the source folder in a checkout."""
    here = Path(__file__).resolve()
    installed = here.parent / "search_spaces"
    return installed if installed.is_dir() else here.parents[1] / "search_spaces"


def default_space(model: str, smoke: bool = False) -> Path:
    return spaces_dir() / ("smoke" if smoke else "") / f"{model}.yaml"


UNSEARCHABLE = ("model", "seed", "split_seed", "metric")
# What a YAML may fix or search (epochs: a trial runs max_epochs, set at the top level).
SETTABLE = tuple(k for k in CONFIG_FIELDS if k not in (*UNSEARCHABLE, "epochs"))
SAMPLERS = ("uniform", "loguniform", "choice", "randint", "quniform")
# How the search chooses the trial it hands to reproduce (search_results.pick_best).
PICK_RULES = ("best_epoch", "final_mean")
# The integer keys and their least value.
_INT_KEYS = {"num_samples": 1, "max_epochs": 1, "grace_period": 1, "reduction_factor": 2,
             "max_concurrent": 1, "seed": 0, "split_seed": 0}  # fmt: skip


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
    seed: int = 0  # sampler seed and trial seed
    split_seed: int | None = None  # train/val split seed; None: the same as seed
    # Per trial: "auto" (a GPU share per model when the cluster has GPUs, else 1 CPU; see
    # search_plan.choose_resources) or an explicit {cpu: C, gpu: G} (gpu may be fractional).
    resources: str | dict = "auto"
    fixed: dict = field(default_factory=dict)
    space: dict = field(default_factory=dict)
    time_budget_s: float | None = None
    pick: str = "best_epoch"  # PICK_RULES: the trial handed to reproduce
    source: str = "<spec>"  # the file it was read from

    def replace(self, **changes: Any) -> SearchSpec:
        return dataclasses.replace(self, **changes)


SPEC_KEYS = {f.name for f in dataclasses.fields(SearchSpec)} - {"source"}


def _as_number(v: Any, where: str) -> float:
    """YAML 1.1 reads ``1e-4`` as a string: accept it, reject anything non-numeric."""
    if isinstance(v, str):
        with contextlib.suppress(ValueError):
            return float(v)
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
        return v
    raise UserError(f"{where}: expected a number, got {v!r}")


def _coerce_value(name: str, v: Any, where: str) -> Any:
    return _as_number(v, where) if CONFIG_FIELDS[name].type == "float" and isinstance(v, str) else v


def _check_choice(path: Path, raw: dict, key: str, choices: tuple[str, ...]) -> None:
    if key in raw and raw[key] not in choices:
        raise UserError(f"{path}: {key} must be one of {', '.join(choices)}, got {raw[key]!r}")


def _parse_param(name: str, spec: Any, where: str) -> tuple[str, list]:
    if name not in CONFIG_FIELDS or name in UNSEARCHABLE:
        raise UserError(
            f"{where}: {name!r} is not a searchable field of the run config; valid: "
            f"{', '.join(SETTABLE)}"
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
    if sampler == "quniform" and nums[2] <= 0:
        raise UserError(f"{where}: quniform step must be > 0, got {nums[2]}")
    if sampler == "quniform" and abs((hi - lo) / nums[2] - round((hi - lo) / nums[2])) > 1e-6:
        # Optuna would lower high to the last step, with a warning per trial.
        raise UserError(f"{where}: the step {nums[2]} must divide high - low ({hi - lo:g})")
    is_int = CONFIG_FIELDS[name].type == "int"
    if is_int and sampler in ("uniform", "loguniform"):
        # TPE would sample 4.1 for an integer field: every such trial would fail at its start.
        raise UserError(
            f"{where}: {name} is an integer; use randint or quniform with an integer step"
        )
    if sampler == "randint" or is_int:
        if not all(float(n).is_integer() for n in nums):
            raise UserError(f"{where}: {sampler} bounds and step must be integers, got {args}")
        nums = [int(n) for n in nums]
    return sampler, nums


@functools.cache
def _strict_loader():
    """PyYAML's safe loader, refusing a key given twice in one mapping (it keeps the last)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if not isinstance(key, Hashable):
                    continue  # the safe loader's own error follows
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        problem=f"duplicate key {key!r}", problem_mark=key_node.start_mark
                    )
                seen.add(key)
            return super().construct_mapping(node, deep)

    return StrictLoader


def load_search_spec(path: str | Path) -> SearchSpec:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"search space file not found: {path}")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_strict_loader())
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path}: YAML syntax error{at}: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of keys (model, metric, space, ...)")
    if unknown := sorted(set(raw) - SPEC_KEYS):
        raise UserError(
            f"{path}: unknown top-level key(s) {', '.join(map(str, unknown))}; "
            f"valid keys: {', '.join(sorted(SPEC_KEYS))}"
        )
    if "model" not in raw:
        raise UserError(f"{path}: missing key 'model' (a registered model, e.g. cnn or vit)")
    try:
        model_spec = get_spec(str(raw["model"]))
    except UserError as e:
        raise UserError(f"{path}: model: {e}") from None
    kw: dict[str, Any] = {"model": model_spec.name, "source": str(path)}
    _check_choice(path, raw, "metric", METRICS)
    if raw.get("mode", "max") not in ("min", "max"):
        raise UserError(f"{path}: mode must be min or max, got {raw['mode']!r}")
    better = "min" if raw.get("metric") in LOWER_IS_BETTER else "max"  # the metric's own mode
    if raw.get("mode", better) != better:
        raise UserError(
            f"{path}: mode {raw['mode']} with metric {raw.get('metric', 'val_acc')} would pick "
            f"the worst trials; use mode: {better}"
        )
    kw.update({k: raw[k] for k in ("metric", "pick") if k in raw}, mode=better)
    for key, lo in _INT_KEYS.items():
        v = raw.get(key)
        if key not in raw or (key == "split_seed" and v is None):
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise UserError(f"{path}: {key} must be an integer >= {lo}, got {v!r}")
        kw[key] = v
    if raw.get("time_budget_s") is not None:
        kw["time_budget_s"] = _as_number(raw["time_budget_s"], f"{path}: time_budget_s")
        if not 0 < kw["time_budget_s"] < float("inf"):
            raise UserError(f"{path}: time_budget_s must be a positive number of seconds")
    _check_choice(path, raw, "pick", PICK_RULES)
    if raw.get("resources", "auto") != "auto":
        res = raw["resources"]
        if not isinstance(res, dict) or set(res) - {"cpu", "gpu"}:
            raise UserError(f"{path}: resources must be auto or a mapping with keys cpu and gpu")
        res = {k: _as_number(v, f"{path}: resources.{k}") for k, v in res.items()}
        if not (res.get("cpu", 1) > 0 and res.get("gpu", 0) >= 0):  # NaN fails both
            raise UserError(f"{path}: resources.cpu must be > 0 and resources.gpu >= 0")
        kw["resources"] = {"cpu": res.get("cpu", 1), "gpu": res.get("gpu", 0)}
    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise UserError(f"{path}: fixed must be a mapping of run-config keys to values")
    for k in fixed:
        if k in UNSEARCHABLE:  # the search sets them from the top-level keys
            raise UserError(f"{path}: fixed.{k}: set {k} at the top level of the file")
        if k not in CONFIG_FIELDS:
            raise UserError(
                f"{path}: fixed.{k} is not a field of the run config; valid: {', '.join(SETTABLE)}"
            )
    kw["fixed"] = {k: _coerce_value(k, v, f"{path}: fixed.{k}") for k, v in fixed.items()}
    space = raw.get("space") or {}
    if not isinstance(space, dict):
        raise UserError(f"{path}: space must be a mapping of run-config keys to samplers")
    kw["space"] = {k: _parse_param(k, v, f"{path}: space.{k}") for k, v in space.items()}
    for k in sorted({*kw["space"], *kw["fixed"]} & {"epochs", "img_size"}):  # one error each run
        where = f"{path}: {'space' if k in kw['space'] else 'fixed'}.{k}"
        if k == "epochs":  # a trial runs max_epochs epochs (ASHA's max_t and the lr schedule)
            raise UserError(f"{where}: a trial's epochs are max_epochs; set max_epochs instead")
        if model_spec.fixed_input_size:
            raise UserError(f"{where}: {model_spec.name} has its own input size; remove {k}")
    if model_spec.kind == "features" and (shared := sorted(set(kw["space"]) & set(FEATURE_KEYS))):
        raise UserError(
            f"{path}: space.{shared[0]}: {model_spec.name}'s features are computed once, before "
            f"the trials, so every trial would see the same ones; move {shared[0]} to fixed"
        )
    if both := sorted(set(kw["space"]) & set(kw["fixed"])):
        raise UserError(f"{path}: {', '.join(both)} is both fixed and searched; keep one")
    spec = SearchSpec(**kw)
    # Known fields (checked above): no TypeError. A trial runs max_epochs epochs (base_config).
    base = model_spec.defaults.replace(**spec.fixed, epochs=spec.max_epochs)
    validate_config(base, f"{path}: fixed")
    # Every value the space can produce must make a valid config: check the bounds.
    for name, (sampler, args) in spec.space.items():
        for v in args if sampler == "choice" else args[:2]:
            validate_config(base.replace(**{name: v}), f"{path}: space.{name}")
    if not spec.space:  # Optuna fails inside the search, after Ray's state was written
        raise UserError(
            f"{path}: space is empty; search at least one key, e.g. space: {{lr: {{loguniform: "
            f"[1.0e-4, 1.0e-2]}}}}"
        )
    return spec
