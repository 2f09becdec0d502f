"""Hyperparameter search: Ray Tune trials of ``train.fit``, Optuna TPE + ASHA early stopping.

    python -m tune_pets.search cnn --data-dir data/oxford_pets
    python -m tune_pets.search vit --no-pretrained --num-samples 8 --max-epochs 5
    python -m tune_pets.search cnn --address auto --storage-path /shared/ray_results   # cluster
    python -m tune_pets.search cnn --resume                                            # continue

The search sees only the train split, carved once into train/val by a seeded stratified split
that every trial shares (saved as ``val_split.json``). The dataset is decoded once (uint8 cache)
and reaches the trials through the Ray object store; the ViT probe's frozen backbone runs once
into a feature cache and trials train only the head. This is the only module that imports Ray.
"""

from __future__ import annotations

import math
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tune_pets.config import (
    CONFIG_FIELDS,
    RunConfig,
    SearchSpec,
    cli_name,
    homework_defaults,
    load_search_spec,
    validate_config,
)
from tune_pets.utils import (
    ArgumentParser,
    UserError,
    atomic_write_csv,
    atomic_write_json,
    cli_main,
    env_info,
    fraction,
    nonneg_int,
    positive_float,
    positive_int,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SPACES = REPO_ROOT / "search_spaces"
DEFAULT_DATA_DIR = "data/oxford_pets"
STATUS_COMPLETED, STATUS_STOPPED, STATUS_FAILED = "completed", "stopped early", "failed"


# ---------------------------------------------------------------- spec -> trial configs
def base_config(spec: SearchSpec, args_overrides: dict) -> RunConfig:
    """The config every trial starts from: homework defaults + YAML ``fixed`` + CLI flags."""
    base = homework_defaults(spec.model).replace(
        epochs=spec.max_epochs, seed=spec.seed, metric=spec.metric
    )
    return validate_config(base.replace(**spec.fixed, **args_overrides), spec.source)


def optuna_space(spec: SearchSpec) -> dict:
    """YAML samplers -> Optuna distributions. Bounds: uniform/loguniform/quniform [low, high],
    randint [low, high] (both inclusive), choice: one of the listed values."""
    import optuna.distributions as od

    out = {}
    for name, (sampler, args) in spec.space.items():
        is_int = CONFIG_FIELDS[name].type == "int"
        if sampler == "choice":
            out[name] = od.CategoricalDistribution(args)
        elif sampler == "randint":
            out[name] = od.IntDistribution(args[0], args[1])
        elif sampler == "loguniform":
            out[name] = od.FloatDistribution(args[0], args[1], log=True)
        elif sampler == "quniform":
            if is_int:
                out[name] = od.IntDistribution(int(args[0]), int(args[1]), step=int(args[2]))
            else:
                out[name] = od.FloatDistribution(args[0], args[1], step=args[2])
        else:
            out[name] = od.FloatDistribution(args[0], args[1])
    return out


def first_point(spec: SearchSpec, base: RunConfig, space: dict) -> dict:
    """The homework's own hyperparameters, snapped into the space: evaluated first, so the
    search can only match or beat the baseline configuration."""
    import optuna.distributions as od

    defaults = homework_defaults(spec.model)
    point = {}
    for name, dist in space.items():
        v = getattr(defaults, name)
        if isinstance(dist, od.CategoricalDistribution):
            choices = list(dist.choices)
            if v not in choices:
                numeric = [c for c in choices if isinstance(c, (int, float))]
                v = (
                    min(numeric, key=lambda c: abs(c - v))
                    if numeric and isinstance(v, (int, float))
                    else choices[0]
                )
        else:
            v = min(max(v, dist.low), dist.high)
            if isinstance(dist, od.IntDistribution):
                v = int(dist.low + round((v - dist.low) / dist.step) * dist.step)
            elif dist.step:
                v = dist.low + round((v - dist.low) / dist.step) * dist.step
        point[name] = v
    return point


def img_sizes(spec: SearchSpec, base: RunConfig) -> list[int]:
    """Every img_size a trial may use (the shared image cache is built for the largest)."""
    if "img_size" not in spec.space:
        return [base.img_size]
    sampler, args = spec.space["img_size"]
    return [int(a) for a in (args if sampler == "choice" else args[:2])]


# ---------------------------------------------------------------- the trainable
def trainable(trial_params: dict, base: dict, data: Any, device_name: str) -> None:
    """One trial: resolve the config, call ``fit``, forward each epoch to ``tune.report``.

    ``data`` (a ``FitData``) arrives from the object store; its numpy arrays are zero-copy,
    read-only views shared by all trials on a node.
    """
    import ray
    import torch
    from ray import tune

    from tune_pets.train import fit

    ctx = ray.get_runtime_context()
    cpus = ctx.get_assigned_resources().get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))
    config = RunConfig.from_dict({**base, **trial_params}, "trial config")
    node = ctx.get_node_id()
    device = torch.device("cuda" if device_name == "cuda" and torch.cuda.is_available() else "cpu")

    def report(metrics: dict, checkpoint: dict | None) -> None:
        metrics = {**metrics, "node_id": node}
        if checkpoint is None:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            torch.save(checkpoint, os.path.join(d, "checkpoint.pt"))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    fit(config, data, report, device=device)


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


# ---------------------------------------------------------------- ray setup
def connect(address: str | None, num_cpus: int | None = None) -> None:
    """Start a local Ray (dashboard off, bound to 127.0.0.1) or join a cluster at ``address``."""
    import ray

    if ray.is_initialized():
        return
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UserError(
                f"--address {address}: could not connect to a Ray cluster "
                f"({str(e).splitlines()[0][:160]}); start one with `ray start "
                f"--head` or leave out --address for a local run"
            ) from None
        return
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        logging_level="ERROR",
    )


def use_cluster_auth(address: str | None) -> None:
    """`ray start --head` turns on token authentication; a driver joining it must use it too.
    Ray reads RAY_AUTH_MODE when it is imported, so call this before anything imports ray."""
    if address and (Path.home() / ".ray" / "auth_token").is_file():
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def _check_reachable(address: str) -> None:
    """Fail in seconds, not after Ray's ~14 minutes of retries, when HOST:PORT is not listening."""
    import socket

    if address == "auto" or address.startswith("ray://") or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except (OSError, ValueError) as e:
        raise UserError(
            f"--address {address}: no Ray cluster answers there ({e}); start one with "
            f"`ray start --head`, check HOST:PORT, or leave out --address for a local run"
        ) from None


def check_resources(cpus: float, gpus: float) -> None:
    """Refuse a request the cluster can never satisfy (Ray would wait for it forever)."""
    import ray

    have = ray.cluster_resources()
    if gpus > 0 and have.get("GPU", 0) < gpus:
        raise UserError(
            f"--gpus-per-trial {gpus:g}: the Ray cluster has {have.get('GPU', 0):g} "
            f"GPU(s); use --gpus-per-trial 0 or add GPU nodes"
        )
    if cpus > have.get("CPU", 0):
        raise UserError(
            f"--cpus-per-trial {cpus:g}: the Ray cluster has only "
            f"{have.get('CPU', 0):g} CPU(s); lower --cpus-per-trial"
        )


# ---------------------------------------------------------------- the search
def run_search(
    spec: SearchSpec,
    data_dir: Path,
    out_dir: Path,
    storage_path: Path,
    name: str,
    *,
    overrides: dict | None = None,
    resume: bool = False,
    overwrite: bool = False,
    address: str | None = None,
    val_fraction: float = 0.2,
    cache_dir=None,
    skip_bad: bool = False,
    num_cpus: int | None = None,
    progress: bool = True,
) -> dict:
    """Run (or resume) a search; write best_config.json, trials.csv, plots; return the summary."""
    from ray import tune

    from tune_pets.train import load_fit_data

    overrides = overrides or {}
    exp_dir = storage_path / name
    exists = (exp_dir / "tuner.pkl").is_file()
    if resume and not exists:
        raise UserError(
            f"--resume: no experiment named {name!r} under {storage_path}; run without "
            f"--resume to start it"
        )
    if exists and not resume:
        if not overwrite:
            raise UserError(
                f"experiment {name!r} already exists under {storage_path}; pass "
                f"--resume to continue it, --overwrite to start over, or --name NEW"
            )
        shutil.rmtree(exp_dir)

    base = base_config(spec, overrides)
    # Cluster problems (no GPUs, too few CPUs, unreachable address) fail before anything is
    # decoded or written.
    connect(address, num_cpus)
    cpus, gpus = float(spec.resources.get("cpu", 1)), float(spec.resources.get("gpu", 0))
    check_resources(cpus, gpus)
    space = optuna_space(spec)
    import torch

    device = "cuda" if spec.resources.get("gpu", 0) > 0 else "cpu"
    t0 = time.time()
    data = load_fit_data(
        base,
        data_dir,
        val_fraction=val_fraction,
        split_file=out_dir / "val_split.json",
        cache_dir=cache_dir,
        skip_bad=skip_bad,
        img_sizes=img_sizes(spec, base),
        progress=progress,
        device=torch.device("cuda" if torch.cuda.is_available() else "cpu"),
    )
    prep_s = time.time() - t0
    print(
        f"data: {data.info['n_train']} train / {data.info['n_val']} val images, "
        f"{data.num_classes} classes ({data.kind}, ready in {prep_s:.1f}s)",
        flush=True,
    )

    fn = tune.with_resources(
        tune.with_parameters(trainable, base=base.to_dict(), data=data, device_name=device),
        {"cpu": cpus, "gpu": gpus},
    )
    if resume:
        tuner = tune.Tuner.restore(
            str(exp_dir),
            trainable=fn,
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=False,
        )
        print(f"resuming {name!r} from {exp_dir}", flush=True)
    else:
        tuner = make_tuner(fn, spec, storage_path, name, first_point(spec, base, space), progress)
    t1 = time.time()
    grid = tuner.fit()
    search_s = time.time() - t1
    trials = grid._experiment_analysis.trials
    unfinished = [t for t in trials if t.status not in ("TERMINATED", "ERROR")]
    budget_spent = spec.time_budget_s is not None and search_s >= spec.time_budget_s
    if (unfinished or len(trials) < spec.num_samples) and not budget_spent:
        # Ray caught Ctrl-C (SIGINT), stopped the trials and saved the experiment state.
        raise KeyboardInterrupt
    _remove_orphan_trial_dirs(exp_dir, trials)
    summary = write_outputs(spec, base, grid, out_dir, name, exp_dir, search_s, prep_s, data.info)
    return summary


def _remove_orphan_trial_dirs(exp_dir: Path, trials) -> None:
    """A search killed between two snapshots of Ray's experiment state may leave the folder of
    a trial that started after the last snapshot; on resume Ray reruns that trial under a new
    id, so the old folder belongs to no trial. Remove it so every folder is one trial."""
    known = {Path(t.local_path).name for t in trials if getattr(t, "local_path", None)}
    if not known:
        return
    for d in exp_dir.glob("trial_*"):
        if d.is_dir() and d.name not in known:
            shutil.rmtree(d, ignore_errors=True)


def make_tuner(
    fn,
    spec: SearchSpec,
    storage_path: Path,
    name: str,
    first: dict | None = None,
    progress: bool = True,
):
    """The Tuner every search uses: OptunaSearch (seeded TPE) behind a ConcurrencyLimiter, ASHA
    on the reported ``epoch``, actor reuse, one checkpoint per trial, failed trials recorded
    without stopping the search.

    The Optuna study lives inside the searcher, which Ray snapshots with the experiment state:
    a resumed search continues exactly the study that matches the trials Ray knows about. (A
    study in SQLite would run ahead of the snapshot, and a trial rerun after a crash would then
    report into an Optuna trial that is already finished.) ``optuna.db`` is written from the
    results when the search ends (``export_study``)."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    space = optuna_space(spec)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "study created" chatter
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # use the compact CLIReporter table below
    reporter = tune.CLIReporter(
        parameter_columns=list(space),
        metric_columns=["epoch", spec.metric, "val_macro_f1"],
        max_report_frequency=30,
        max_progress_rows=12,
        sort_by_metric=True,
    )
    run_config = tune.RunConfig(
        name=name,
        storage_path=str(storage_path),
        progress_reporter=reporter,
        verbose=1 if progress else 0,
        failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
    )
    searcher = OptunaSearch(
        space=space,
        metric=spec.metric,
        mode=spec.mode,
        points_to_evaluate=[first] if first else None,
        sampler=optuna.samplers.TPESampler(seed=spec.seed),
        study_name=name,
    )
    scheduler = ASHAScheduler(
        time_attr="epoch",
        max_t=spec.max_epochs,
        grace_period=min(spec.grace_period, spec.max_epochs),
        reduction_factor=spec.reduction_factor,
    )
    return tune.Tuner(
        fn,
        tune_config=tune.TuneConfig(
            metric=spec.metric,
            mode=spec.mode,
            num_samples=spec.num_samples,
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=spec.max_concurrent),
            scheduler=scheduler,
            reuse_actors=True,
            time_budget_s=spec.time_budget_s,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=run_config,
    )


def _trial_rows(spec: SearchSpec, grid) -> tuple[list[dict], list[Any]]:
    rows, frames = [], []
    better = max if spec.mode == "max" else min
    for result in grid:
        df = result.metrics_dataframe
        has = df is not None and len(df) and spec.metric in df
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name.split("_")[1]
        epochs = int(df["epoch"].max()) if has else 0
        if result.error is not None:
            status = STATUS_FAILED
        elif epochs >= spec.max_epochs:
            status = STATUS_COMPLETED
        else:
            status = STATUS_STOPPED
        best_row = None
        if has:
            vals = df[spec.metric].astype(float)
            vals = vals[vals.apply(math.isfinite)]
            if len(vals):
                best_row = df.loc[better(vals.index, key=lambda i: vals[i])]
        row = {
            "trial_id": trial_id,
            "status": status,
            "epochs": epochs,
            **{k: result.config.get(k) for k in spec.space},
            f"best_{spec.metric}": None if best_row is None else float(best_row[spec.metric]),
            "best_epoch": None if best_row is None else int(best_row["epoch"]),
            "best_val_macro_f1": (
                None
                if best_row is None or "val_macro_f1" not in best_row
                else float(best_row["val_macro_f1"])
            ),
            "time_s": round(float(df["time_total_s"].max()), 3) if has else None,
            "node": df["node_id"].iloc[-1] if has and "node_id" in df else None,
            "error": (str(result.error).strip().splitlines() or [""])[-1][:300]
            if result.error is not None
            else "",
        }
        rows.append(row)
        frames.append((trial_id, df if has else None, status, result))
    return rows, frames


def write_outputs(
    spec,
    base,
    grid,
    out_dir: Path,
    name: str,
    exp_dir: Path,
    search_s: float,
    prep_s: float,
    data_info: dict,
) -> dict:
    rows, frames = _trial_rows(spec, grid)
    atomic_write_csv(out_dir / "trials.csv", rows)
    ok = [r for r in rows if r[f"best_{spec.metric}"] is not None and r["status"] != STATUS_FAILED]
    if not ok:
        errors = "; ".join(sorted({r["error"] for r in rows if r["error"]}))[:400]
        raise UserError(f"all {len(rows)} trials failed ({errors}); see {out_dir / 'trials.csv'}")
    pick = max if spec.mode == "max" else min
    best = pick(ok, key=lambda r: r[f"best_{spec.metric}"])
    best_result = next(res for tid, _, _, res in frames if tid == best["trial_id"])
    config = base.replace(**{k: best_result.config[k] for k in spec.space})
    counts = {
        s: sum(r["status"] == s for r in rows)
        for s in (STATUS_COMPLETED, STATUS_STOPPED, STATUS_FAILED)
    }
    summary = {
        "model": cli_name(spec.model),
        "config": config.to_dict(),
        "val_acc": best.get("best_val_acc") if spec.metric != "val_acc" else best["best_val_acc"],
        "val_macro_f1": best["best_val_macro_f1"],
        "metric": spec.metric,
        "mode": spec.mode,
        f"best_{spec.metric}": best[f"best_{spec.metric}"],
        "trial_id": best["trial_id"],
        "epoch": best["best_epoch"],
        "checkpoint": str(best_result.checkpoint.path) if best_result.checkpoint else None,
        "search": {
            "name": name,
            "experiment_dir": str(exp_dir),
            "spec_file": spec.source,
            "num_trials": len(rows),
            **{k.replace(" ", "_"): v for k, v in counts.items()},
            "num_samples": spec.num_samples,
            "max_epochs": spec.max_epochs,
            "grace_period": spec.grace_period,
            "reduction_factor": spec.reduction_factor,
            "search_space": {k: [s, a] for k, (s, a) in spec.space.items()},
            "wall_time_s": round(search_s, 1),
            "data_prep_s": round(prep_s, 1),
            "nodes": sorted({r["node"] for r in rows if r["node"]}),
        },
        "data": data_info,
        "val_split_file": str(out_dir / "val_split.json"),
        "env": env_info(),
    }
    if spec.metric == "val_acc":
        summary["val_acc"] = best["best_val_acc"]
    else:
        df = next(d for tid, d, _, _ in frames if tid == best["trial_id"])
        summary["val_acc"] = float(df.loc[df["epoch"] == best["best_epoch"], "val_acc"].iloc[0])
    atomic_write_json(out_dir / "best_config.json", summary)
    write_plots(spec, frames, out_dir, name)
    return summary


def export_study(spec: SearchSpec, frames, db_path: Path, name: str):
    """Write the search as an Optuna study in SQLite (for ``optuna-dashboard`` and the plots):
    one Optuna trial per Ray trial, in order, with its per-epoch values as intermediate values
    and its best value over epochs as the objective; failed trials are marked FAIL and ASHA-
    stopped ones carry ``user_attrs["status"] = "stopped early"``."""
    import optuna

    from tune_pets.utils import atomic_path

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = optuna_space(spec)
    direction = "maximize" if spec.mode == "max" else "minimize"
    better = max if spec.mode == "max" else min
    with atomic_path(db_path) as tmp:
        study = optuna.create_study(
            study_name=name, storage=f"sqlite:///{tmp.resolve()}", direction=direction
        )
        for tid, df, status, result in frames:
            params = {k: result.config.get(k) for k in space}
            if any(v is None for v in params.values()):
                continue
            steps = {}
            if df is not None:
                for e, v in zip(df["epoch"], df[spec.metric], strict=True):
                    if math.isfinite(float(v)):
                        steps[int(e)] = float(v)
            failed = status == STATUS_FAILED or not steps
            study.add_trial(
                optuna.trial.create_trial(
                    params=params,
                    distributions=space,
                    value=None if failed else better(steps.values()),
                    state=optuna.trial.TrialState.FAIL
                    if failed
                    else optuna.trial.TrialState.COMPLETE,
                    intermediate_values=steps,
                    user_attrs={"ray_trial_id": tid, "status": status},
                )
            )
    return optuna.load_study(study_name=name, storage=f"sqlite:///{db_path.resolve()}")


def write_plots(spec: SearchSpec, frames, out_dir: Path, name: str) -> list[str]:
    """Optimization history, parameter importances (Optuna), learning curves (where ASHA
    stopped each trial). A plot that cannot be made (too few trials) is skipped with a note."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tune_pets.utils import atomic_savefig

    written = []
    fig, ax = plt.subplots(figsize=(8, 5))
    for _tid, df, status, _ in frames:
        if df is None:
            continue
        style = {"completed": "-", "stopped early": "--", "failed": ":"}[status]
        (line,) = ax.plot(df["epoch"], df[spec.metric], style, alpha=0.8, lw=1.2)
        ax.plot(
            df["epoch"].iloc[-1],
            df[spec.metric].iloc[-1],
            "x" if status != "completed" else "o",
            color=line.get_color(),
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel(spec.metric)
    ax.set_title(f"{name}: learning curves (x = stopped by ASHA or failed, o = ran to max_t)")
    fig.tight_layout()
    atomic_savefig(fig, out_dir / "learning_curves.png", dpi=110)
    plt.close(fig)
    written.append("learning_curves.png")

    study = export_study(spec, frames, out_dir / "optuna.db", name)
    import warnings

    from optuna.visualization import matplotlib as ovm

    for fname, plot in (
        ("optimization_history.png", ovm.plot_optimization_history),
        ("param_importances.png", ovm.plot_param_importances),
    ):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ExperimentalWarning for the matplotlib backend
                ax = plot(study)
            atomic_savefig(ax.figure, out_dir / fname, dpi=110, bbox_inches="tight")
            plt.close(ax.figure)
            written.append(fname)
        except Exception as e:  # noqa: BLE001 - e.g. too few completed trials for importances
            print(f"note: {fname} skipped ({type(e).__name__}: {str(e)[:120]})", file=sys.stderr)
    return written


def _shutdown() -> None:
    """Stop the local Ray (or disconnect from a cluster) so later steps get the CPUs back."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


# ---------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = ArgumentParser(prog="python -m tune_pets.search", description=__doc__.split("\n\n")[0])
    p.add_argument("model", choices=["cnn", "vit"])
    p.add_argument(
        "--data-dir",
        default=DEFAULT_DATA_DIR,
        help=f"ImageFolder root; the default {DEFAULT_DATA_DIR} is prepared if missing",
    )
    p.add_argument("--search-space", default=None, help="YAML (default search_spaces/<model>.yaml)")
    p.add_argument("--num-samples", type=positive_int)
    p.add_argument("--max-epochs", type=positive_int, help="epochs per trial (ASHA max_t)")
    p.add_argument("--grace-period", type=positive_int)
    p.add_argument("--max-concurrent", type=positive_int)
    p.add_argument("--cpus-per-trial", type=positive_float)
    p.add_argument("--gpus-per-trial", type=float, help="may be fractional, e.g. 0.25")
    p.add_argument("--address", default=None, help="join a Ray cluster: auto or HOST:PORT")
    p.add_argument(
        "--storage-path",
        default=None,
        help="absolute dir for Ray results (shared by all nodes on a cluster; "
        "default <artifacts>/ray_results)",
    )
    p.add_argument("--name", default=None, help="experiment name (default: the model)")
    p.add_argument("--time-budget-s", type=positive_float)
    p.add_argument("--resume", action="store_true", help="continue the experiment --name")
    p.add_argument("--overwrite", action="store_true", help="replace an existing experiment")
    p.add_argument("--seed", type=nonneg_int)
    p.add_argument("--val-fraction", type=fraction, default=0.2)
    p.add_argument("--max-steps-per-epoch", type=nonneg_int, help="cap steps per epoch (smoke)")
    p.add_argument("--artifacts-dir", default="artifacts")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--skip-bad-images", action="store_true")
    p.add_argument("--no-pretrained", action="store_true", help="ViT: random backbone (tests)")
    p.add_argument("--weights", default=None, help="ViT: local backbone weights file")
    p.add_argument("--num-cpus", type=positive_int, help="CPUs for a local Ray (default: all)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    spec_path = Path(args.search_space or DEFAULT_SPACES / f"{args.model}.yaml")
    spec = load_search_spec(spec_path)
    if cli_name(spec.model) != args.model:
        raise UserError(
            f"--search-space {spec_path} is for model {cli_name(spec.model)!r}, not {args.model!r}"
        )
    changes: dict[str, Any] = {}
    for flag, key in (
        ("num_samples", "num_samples"),
        ("max_epochs", "max_epochs"),
        ("grace_period", "grace_period"),
        ("max_concurrent", "max_concurrent"),
        ("seed", "seed"),
        ("time_budget_s", "time_budget_s"),
    ):
        if getattr(args, flag) is not None:
            changes[key] = getattr(args, flag)
    res = dict(spec.resources)
    if args.cpus_per_trial is not None:
        res["cpu"] = args.cpus_per_trial
    if args.gpus_per_trial is not None:
        if not (args.gpus_per_trial >= 0 and math.isfinite(args.gpus_per_trial)):
            raise UserError(f"--gpus-per-trial must be >= 0, got {args.gpus_per_trial}")
        res["gpu"] = args.gpus_per_trial
    spec = spec.replace(resources=res, **changes)
    overrides: dict[str, Any] = {}
    if args.no_pretrained:
        overrides["pretrained"] = False
    if args.weights:
        overrides["weights"] = args.weights
    if args.max_steps_per_epoch is not None:
        overrides["max_steps_per_epoch"] = args.max_steps_per_epoch

    data_dir = Path(args.data_dir)
    if not data_dir.exists() and args.data_dir == DEFAULT_DATA_DIR:
        from tune_pets.prepare import prepare

        print(f"{data_dir} not found: preparing the dataset there first", flush=True)
        prepare(data_dir, progress=not args.no_progress)
    from tune_pets.data import check_data_dir

    check_data_dir(data_dir)
    artifacts = Path(args.artifacts_dir)
    name = args.name or args.model
    storage = Path(args.storage_path) if args.storage_path else (artifacts / "ray_results")
    if args.storage_path and not storage.is_absolute():
        raise UserError(f"--storage-path {storage}: must be an absolute path (all nodes use it)")
    storage = storage.resolve()
    out_dir = artifacts / "search" / name
    use_cluster_auth(args.address)
    try:
        summary = run_search(
            spec,
            data_dir,
            out_dir,
            storage,
            name,
            overrides=overrides,
            resume=args.resume,
            overwrite=args.overwrite,
            address=args.address,
            val_fraction=args.val_fraction,
            cache_dir=args.cache_dir,
            skip_bad=args.skip_bad_images,
            num_cpus=args.num_cpus,
            progress=not args.no_progress,
        )
    except KeyboardInterrupt:
        again = [a for a in argv if a not in ("--overwrite", "--resume")]
        if args.name is None:
            again += ["--name", name]
        resume_cmd = shlex.join(["python", "-m", "tune_pets.search", *again, "--resume"])
        raise KeyboardInterrupt(
            f"search stopped; the experiment state is saved. Resume with: {resume_cmd}"
        ) from None
    finally:
        _shutdown()
    s = summary["search"]
    print(
        f"\nsearch {name!r}: {s['num_trials']} trials ({s['completed']} completed, "
        f"{s['stopped_early']} stopped early, {s['failed']} failed) in {s['wall_time_s']:.0f}s"
    )
    print(
        f"best trial {summary['trial_id']} (epoch {summary['epoch']}): "
        f"{spec.metric} {summary[f'best_{spec.metric}']:.4f}, val_macro_f1 "
        f"{summary['val_macro_f1']:.4f}"
    )
    print("  params: " + ", ".join(f"{k}={summary['config'][k]!r}" for k in spec.space))
    print(
        f"wrote {out_dir}/best_config.json, trials.csv, plots; next: python -m "
        f"tune_pets.reproduce {args.model}"
        + (f" --best-config {out_dir}/best_config.json" if name != args.model else "")
    )
    return 0


if __name__ == "__main__":
    cli_main(main, prog="python -m tune_pets.search")
