"""What a search leaves behind, built from plain data: one ``TrialRecord`` per trial, then

    trials.csv          one row per trial                         (write_trials_csv)
    best_config.json    the trial the spec's pick rule chooses    (pick_best, make_summary)
    optuna.db           the search as an Optuna study             (export_study)
    *.png               learning curves, optimization history, parameter importances

Nothing here knows Ray: ``search_ray`` turns Ray's results (and each finished trial while the
search runs) into records, so the files are the same from a running search or its results.
"""

from __future__ import annotations

import functools
import math
import sqlite3
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tune_pets.config import CONFIG_FIELDS, RunConfig
from tune_pets.figures import figure_style, save
from tune_pets.layout import Layout
from tune_pets.records import Record, SearchSummary
from tune_pets.spaces import PICK_RULES, SearchSpec
from tune_pets.utils import atomic_path, atomic_write_csv

STATUS_COMPLETED, STATUS_STOPPED, STATUS_FAILED = "completed", "stopped early", "failed"
STATUSES = (STATUS_COMPLETED, STATUS_STOPPED, STATUS_FAILED)
# What a trial reports besides fit's train_*/val_* metrics: its clock and where it ran. A
# finished trial's state keeps these (search_ray._keep_reports_only); without "started" one
# re-reported on --resume sorted last in trials.csv (and lost ties in the pick).
HISTORY_KEYS = ("epoch", "lr", "epoch_time_s", "time_s", "started", "trial_id", "node", "host",
                "device")  # fmt: skip
# Importances from a handful of trials are noise presented as a ranking.
MIN_TRIALS_FOR_IMPORTANCES = 8
PLOTS = ("learning_curves", "optimization_history", "param_importances")
FINAL_MEAN_EPOCHS = 3  # pick_best's final_mean averages this many last epochs
# trials.csv columns after the scores, named as the TrialRecord fields they come from.
_CSV_FIELDS = ("node", "host", "device", "error", "restarts", "restart_reason")
# The SearchSpec fields best_config.json's "search" repeats, in its order.
_SPEC_FIELDS = (
    "num_samples", "max_epochs", "grace_period", "reduction_factor", "pick", "seed",
    "time_budget_s",
)  # fmt: skip


@dataclass(frozen=True)
class TrialRecord(Record):
    """One trial as the result files see it (``to_dict``/``from_dict``: search's saved state)."""

    trial_id: str
    status: str  # completed | stopped early | failed
    epochs: int  # epochs reported (of the trial's last run, if it was restarted)
    params: dict[str, Any]  # the searched hyperparameters (a value None: never known)
    best_value: float | None  # best finite value of the search metric over the epochs
    best_epoch: int | None
    val_macro_f1: float | None  # at best_epoch
    time_s: float | None  # seconds from the trial's start to its last report
    node: str = ""  # Ray node id
    host: str = ""
    device: str = ""  # cuda:N (the node's GPU index) or cpu
    error: str = ""  # last line of the error, for failed trials
    checkpoint: str | None = None  # the trial's kept checkpoint (its best epoch's)
    # Times the trial's process died (node lost, OOM, SIGKILL) and went on from its last
    # checkpoint, and why the last time.
    restarts: int = 0
    restart_reason: str = ""
    history: list[dict] = field(default_factory=list)  # one dict per epoch


def add_report(history: list[dict], metrics: dict) -> None:
    """Append one report's per-epoch numbers (Ray's bookkeeping keys dropped). An epoch not
    after the last one starts the history over: the trial was restarted from epoch 1."""
    row = {
        k: _plain(v)
        for k, v in metrics.items()
        if k in HISTORY_KEYS or k.startswith(("train_", "val_"))
    }
    if not _finite(row.get("epoch")):  # no epoch (NaN in a data frame): a trial's error report
        return
    row["epoch"] = int(row["epoch"])
    while history and history[-1]["epoch"] >= row["epoch"]:
        history.pop()
    history.append(row)


def make_record(
    trial_id: str,
    params: dict[str, Any],
    reports: Iterable[dict],
    spec: SearchSpec,
    *,
    error: str = "",
    checkpoint: str | None = None,
    restarts: int = 0,
    restart_reason: str = "",
) -> TrialRecord:
    """A record from a trial's reports (in order): failed if it raised, completed if it ran to
    ``max_epochs``, otherwise stopped early (by ASHA or the time budget)."""
    history: list[dict] = []
    for metrics in reports:
        add_report(history, metrics)
    epochs = history[-1]["epoch"] if history else 0
    ran_all = epochs >= spec.max_epochs
    status = STATUS_FAILED if error else STATUS_COMPLETED if ran_all else STATUS_STOPPED
    scored = [h for h in history if _finite(h.get(spec.metric))]
    better = max if spec.mode == "max" else min
    # the first of equals wins: the earliest epoch
    best = better(scored, key=lambda h: float(h[spec.metric])) if scored else {}
    last = history[-1] if history else {}
    return TrialRecord(
        trial_id=trial_id,
        status=status,
        epochs=epochs,
        params=params,
        best_value=_float_or_none(best.get(spec.metric)),
        best_epoch=best.get("epoch"),
        val_macro_f1=_float_or_none(best.get("val_macro_f1")),
        time_s=_float_or_none(last.get("time_s")),
        **{k: str(last.get(k) or "") for k in ("node", "host", "device")},
        error=error,
        checkpoint=checkpoint,
        restarts=restarts,
        restart_reason=restart_reason,
        history=history,
    )


def error_line(error: object) -> str:
    """The last line of an error (the exception and its message), at most 300 characters."""
    if error is None:
        return ""
    error = getattr(error, "orig", None) or error  # SQLAlchemy's last line: a link to its docs
    lines = str(error).strip().splitlines()
    return (lines[-1] if lines else type(error).__name__)[:300]


def trial_line(record: TrialRecord, spec: SearchSpec, done: int) -> str:
    """One line per finished trial, for the log."""
    r = record
    head = f"trial {r.trial_id} {r.status} after {r.epochs} epoch{'' if r.epochs == 1 else 's'}"
    if r.status == STATUS_FAILED:
        what = r.error or "error"
    elif r.best_value is None:
        what = f"no finite {spec.metric}"
    else:
        what = f"{spec.metric} {r.best_value:.4f} (best, epoch {r.best_epoch})"
    if r.restarts and r.status != STATUS_FAILED:
        what += f", restarted {r.restarts}x ({r.restart_reason})"  # from its last epoch, if any
    return f"{head}: {what} [{done}/{spec.num_samples} trials done]"


def write_trials_csv(records: Sequence[TrialRecord], spec: SearchSpec, path: Path) -> None:
    best = f"best_{spec.metric}"
    rows = [
        {
            "trial_id": r.trial_id,
            "status": r.status,
            "epochs": r.epochs,
            **{k: r.params.get(k) for k in spec.space},
            best: r.best_value,
            "best_epoch": r.best_epoch,
            "best_val_macro_f1": r.val_macro_f1,
            "time_s": None if r.time_s is None else round(r.time_s, 3),
            **{k: getattr(r, k) for k in _CSV_FIELDS},
        }
        for r in records
    ]
    head = ["trial_id", "status", "epochs", *spec.space, best, "best_epoch", "best_val_macro_f1"]
    atomic_write_csv(path, rows, list(dict.fromkeys([*head, "time_s", *_CSV_FIELDS])))


def pick_best(
    records: Sequence[TrialRecord], spec: SearchSpec, rule: str | None = None
) -> TrialRecord | None:
    """The trial whose config goes to ``reproduce``; failed trials never win (their good epochs
    came from a run that then broke), ties go to the earlier trial. ``rule`` (default the
    spec's pick) ``best_epoch``: the best metric over all epochs of all trials; ``final_mean``:
    among the trials that ran the most epochs, the best mean over their last
    ``FINAL_MEAN_EPOCHS``, sturdier since one epoch on a small validation split is partly luck
    and an early one was scored mid-schedule, while ``reproduce`` trains the whole schedule."""
    rule = rule or spec.pick
    if rule not in PICK_RULES:
        raise ValueError(f"pick rule must be one of {', '.join(PICK_RULES)}, got {rule!r}")
    ok = [r for r in records if r.status != STATUS_FAILED and r.best_value is not None]
    scores = {id(r): r.best_value for r in ok}
    if rule == "final_mean":
        scores = {id(r): final_mean(r, spec.metric) for r in ok}
        ok = [r for r in ok if scores[id(r)] is not None]
        most = max((r.epochs for r in ok), default=0)
        ok = [r for r in ok if r.epochs == most]
    better = max if spec.mode == "max" else min
    return better(ok, key=lambda r: scores[id(r)], default=None)


def final_mean(record: TrialRecord, metric: str, k: int | None = None) -> float | None:
    """The mean of ``metric`` over the last ``k`` (default ``FINAL_MEAN_EPOCHS``) epochs; None
    when one of them has no finite value: the end of the schedule, which the rule judges,
    diverged (skipping NaN epochs scored such a trial on its epochs before it broke, and ASHA
    never stops it: NaN compares below no cutoff)."""
    values = [h.get(metric) for h in record.history][-(k or FINAL_MEAN_EPOCHS) :]
    if not values or not all(_finite(v) for v in values):
        return None
    return sum(map(float, values)) / len(values)


def status_counts(records: Sequence[TrialRecord]) -> dict[str, int]:
    """``{"completed": n, "stopped_early": n, "failed": n}``."""
    return {s.replace(" ", "_"): sum(r.status == s for r in records) for s in STATUSES}


def make_summary(
    best: TrialRecord,
    records: Sequence[TrialRecord],
    spec: SearchSpec,
    base: RunConfig,
    *,
    run: dict,
    data: dict,
    val_split_file: Path,
    env: dict,
) -> SearchSummary:
    """best_config.json: the best trial's full run config (what ``reproduce`` retrains) and how
    it was found. ``run``: the caller's name, paths and timings of this search."""
    config = base.replace(**{k: best.params[k] for k in spec.space})
    at_best = next((h for h in best.history if h.get("epoch") == best.best_epoch), {})
    return SearchSummary(
        model=config.model,
        config=config.to_dict(),
        metric=spec.metric,
        mode=spec.mode,
        best_value=best.best_value,
        trial_id=best.trial_id,
        epoch=best.best_epoch,
        val_acc=None if at_best.get("val_acc") is None else float(at_best["val_acc"]),
        val_macro_f1=best.val_macro_f1,
        checkpoint=best.checkpoint,
        search={
            **run,
            "spec_file": spec.source,
            **{k: getattr(spec, k) for k in _SPEC_FIELDS},
            "split_seed": base.val_split_seed,
            "resources": spec.resources,
            "max_concurrent": spec.max_concurrent,
            "search_space": {k: [s, a] for k, (s, a) in spec.space.items()},
            "num_trials": len(records),
            **status_counts(records),
            "nodes": sorted({r.node for r in records if r.node}),
            "hosts": sorted({r.host for r in records if r.host}),
            "devices": sorted({r.device for r in records if r.device}),
        },
        data=data,
        val_split_file=str(val_split_file),
        env=env,
    )


def optuna_distributions(spec: SearchSpec) -> dict:
    """YAML samplers -> Optuna distributions (the searcher's space and the export's); the
    [low, high] bounds are inclusive, and integer fields (randint or quniform) stay integers."""
    import optuna.distributions as od

    out = {}
    for name, (sampler, args) in spec.space.items():
        if sampler == "choice":
            out[name] = od.CategoricalDistribution(args)
        elif sampler == "randint" or CONFIG_FIELDS[name].type == "int":
            step = int(args[2]) if sampler == "quniform" else 1
            out[name] = od.IntDistribution(int(args[0]), int(args[1]), step=step)
        else:
            step = args[2] if sampler == "quniform" else None
            out[name] = od.FloatDistribution(*args[:2], log=sampler == "loguniform", step=step)
    return out


def build_study(records: Sequence[TrialRecord], spec: SearchSpec, name: str, storage=None):
    """One Optuna trial per record, in order: per-epoch values as intermediate values, the best
    value as the objective, failed trials as FAIL, and the record's ids in ``user_attrs``."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    distributions = optuna_distributions(spec)
    direction = "maximize" if spec.mode == "max" else "minimize"
    study = optuna.create_study(study_name=name, storage=storage, direction=direction)
    for r in records:
        params = {k: r.params.get(k) for k in distributions}
        if any(v is None for v in params.values()):
            continue  # a trial that died before Ray knew its config
        steps = {
            h["epoch"]: float(h[spec.metric]) for h in r.history if _finite(h.get(spec.metric))
        }
        failed = r.status == STATUS_FAILED or r.best_value is None
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions=distributions,
                value=None if failed else r.best_value,
                state=optuna.trial.TrialState.FAIL if failed else optuna.trial.TrialState.COMPLETE,
                intermediate_values=steps,
                user_attrs={
                    "ray_trial_id": r.trial_id,
                    **{k: getattr(r, k) for k in ("status", "epochs", "device", "host")},
                },
            )
        )
    return study


def export_study(records: Sequence[TrialRecord], spec: SearchSpec, name: str, path: Path) -> None:
    """Write the study to SQLite atomically, so ``optuna-dashboard`` never reads half of one."""

    with atomic_path(path) as tmp:
        storage = sqlite_storage(tmp)
        try:
            build_study(records, spec, name, storage)
        finally:
            storage.remove_session()
            storage.engine.dispose()  # no open handle on the file once it is renamed


def sqlite_storage(path: Path):
    """An Optuna storage on the SQLite file ``path``, whatever characters its path holds. In a
    URL "%20" is a space and "?" starts a query; SQLAlchemy 2.1 decodes a quoted path, 2.0 does
    not, so no URL form worked with both (2.0 failed on any folder with a space in it)."""
    import optuna

    connect = functools.partial(sqlite3.connect, str(path))
    return optuna.storages.RDBStorage("sqlite://", engine_kwargs={"creator": connect})


def write_plots(records: Sequence[TrialRecord], spec: SearchSpec, name: str, layout: Layout):
    """Learning curves, optimization history and, from enough trials, parameter importances.
    A plot that is not made says why on stderr."""
    _learning_curves(records, spec, name, layout.search_plot(name, PLOTS[0]))
    study = build_study(records, spec, name)
    _optuna_plot(study, spec, name, "optimization history", layout.search_plot(name, PLOTS[1]))
    importances = layout.search_plot(name, PLOTS[2])
    importances.unlink(missing_ok=True)  # never leave an earlier search's plot beside this one
    n = sum(r.status != STATUS_FAILED and r.best_value is not None for r in records)
    if n < MIN_TRIALS_FOR_IMPORTANCES:
        print(
            f"note: {importances.name} skipped: {n} trial(s) with a {spec.metric}, "
            f"importances need at least {MIN_TRIALS_FOR_IMPORTANCES} to mean anything",
            file=sys.stderr,
        )
    else:
        _optuna_plot(study, spec, name, "parameter importances", importances)


# Line style and end marker by how a trial ended, explained in the caption.
_STYLE = {STATUS_COMPLETED: ("-", "o"), STATUS_STOPPED: ("--", "x"), STATUS_FAILED: (":", "x")}
_KEY = (
    "solid line, o: ran to max_epochs;  dashed, x: stopped early (ASHA or the time budget);  "
    "dotted, x: failed;  thick: the best trial"
)


def _learning_curves(records: Sequence[TrialRecord], spec: SearchSpec, name: str, path: Path):
    best = pick_best(records, spec)
    drawn = [r for r in records if r.history]
    with figure_style() as plt:
        from matplotlib.ticker import MaxNLocator

        fig, ax = plt.subplots(figsize=(10, 5.5))
        for r in drawn:
            epochs = [h["epoch"] for h in r.history]
            values = [h.get(spec.metric, math.nan) for h in r.history]
            is_best = best is not None and r.trial_id == best.trial_id
            line, end = _STYLE[r.status]
            label = f"{r.trial_id} {r.status}" + (", best" if is_best else "")
            (drawn_line,) = ax.plot(
                epochs, values, line, lw=2.6 if is_best else 1.2, alpha=0.9, label=label
            )
            ax.plot(epochs[-1], values[-1], end, color=drawn_line.get_color())
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="epoch", ylabel=spec.metric)
        ax.set_title(f"{name}: learning curves of {len(drawn)} trials")
        if drawn:
            ncol = 1 if len(drawn) <= 20 else 2
            ax.legend(
                fontsize=7, title="trial", loc="upper left", bbox_to_anchor=(1.01, 1), ncol=ncol
            )
        fig.text(0.01, 0.005, _KEY, fontsize=8)
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        save(fig, path, bbox_inches="tight")


def _optuna_plot(study, spec: SearchSpec, name: str, what: str, path: Path) -> None:
    """Optuna's plot of ``what`` with the metric on its axis ("Objective Value" says nothing);
    a note instead when Optuna cannot draw it."""
    from matplotlib.ticker import MaxNLocator
    from optuna.importance import PedAnovaImportanceEvaluator
    from optuna.visualization import matplotlib as ovm

    history = what == "optimization history"
    with figure_style():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ExperimentalWarning: the matplotlib backend
                if history:
                    ax = ovm.plot_optimization_history(study, target_name=spec.metric)
                else:
                    # PED-ANOVA by name: before Optuna 5 the default was fANOVA, an unseeded
                    # random forest that ranked the same trials differently on each run
                    evaluator = PedAnovaImportanceEvaluator()
                    ax = ovm.plot_param_importances(study, evaluator, target_name=spec.metric)
        except (ValueError, RuntimeError, ZeroDivisionError) as e:
            # e.g. importances when every trial scored the same
            print(
                f"note: {path.name} skipped ({type(e).__name__}: {str(e)[:120]})", file=sys.stderr
            )
            return
        ax.set_title(f"{name}: {what}")
        if history:
            ax.set(ylabel=spec.metric, xlabel="trial (in the order started)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        save(ax.figure, path, bbox_inches="tight")


def _plain(v: Any) -> Any:
    """numpy/pandas scalars -> Python scalars (for CSV, JSON and Optuna)."""
    return v.item() if hasattr(v, "item") and not isinstance(v, (str, bytes)) else v


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _float_or_none(v: Any) -> float | None:
    return float(v) if _finite(v) else None
