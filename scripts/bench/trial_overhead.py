"""trial_overhead_s: per-trial overhead of the project's search path (``tune_pets.search_ray``'s
``make_tuner``: Ray Tune + OptunaSearch + ASHA, actor reuse) on a trivial trainable; and
optuna_trial_overhead_s: the same trivial study in plain in-process Optuna (the anchor).
overhead = (wall - work) / trials, work = epochs run x sleep per epoch / concurrency."""

from __future__ import annotations

import inspect
import logging
import math
import sys
import time

from bench.harness import Context, figure, loadavg, log, now

CONCURRENCY = 2
SPACE = {"lr": ("loguniform", [1e-4, 1e-1])}


def score(lr: float, epoch: int) -> float:  # peaks at lr = 1e-2: ASHA has something to cut
    return 1.0 - abs(math.log10(lr) + 2.0) / 3.0 + 0.01 * epoch


def trivial_trainable(config: dict, sleep_s: float) -> None:
    from ray import tune

    for epoch in (1, 2):
        time.sleep(sleep_s)
        s = score(config["lr"], epoch)
        tune.report({"epoch": epoch, "val_acc": s, "val_macro_f1": s})


def run_ray(ctx: Context) -> dict:
    import ray
    from ray import tune

    from tune_pets.search_ray import connect, make_tuner
    from tune_pets.spaces import SearchSpec

    n, sleep_s = ctx.s["ray_trials"], ctx.s["ray_sleep_s"]
    spec = SearchSpec(model="cnn", num_samples=n, max_epochs=2, grace_period=1,
                      reduction_factor=3, max_concurrent=CONCURRENCY, seed=0,
                      resources={"cpu": 1, "gpu": 0}, space=dict(SPACE), source="<benchmark>")
    # Ray's workers cannot import scripts/bench: ship the trainable by value (as __main__'s).
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    la0, was_up = loadavg(), ray.is_initialized()
    log(f"trial overhead: local Ray (2 CPUs) + make_tuner, {n} trivial trials")
    t0 = now()
    connect(None, num_cpus=2)
    ray_start_s = now() - t0
    logging.getLogger("ray.tune").setLevel(logging.ERROR)
    try:
        fn = tune.with_resources(tune.with_parameters(trivial_trainable, sleep_s=sleep_s),
                                 {"cpu": 1})
        t0 = now()
        tuner = make_tuner(fn, spec, (ctx.tmp / "ray_results").resolve(), "overhead",
                           first=None, progress=False)
        build_s, t1 = now() - t0, now()
        grid = tuner.fit()
        fit_s = now() - t1
        epochs = [int((r.metrics or {}).get("epoch", 0)) for r in grid]
        errors = sum(r.error is not None for r in grid)
    finally:
        if not was_up:
            ray.shutdown()
    wall, work_total = build_s + fit_s, sum(epochs) * sleep_s
    overhead = (wall - work_total / CONCURRENCY) / len(epochs)
    return {"trial_overhead_s": figure(
        "trial_overhead_s", overhead, "s per trial", la0,
        way_a={"name": "tune_pets.search_ray.make_tuner (Ray Tune + OptunaSearch + ASHA + "
                       "ConcurrencyLimiter), function trainable",
               "wall_s": wall, "make_tuner_s": build_s, "tuner_fit_s": fit_s,
               "ray_startup_s_excluded": ray_start_s, "trials": len(epochs),
               "trial_errors": errors, "epochs_run_per_trial": epochs,
               "work_s_total": work_total, "concurrency": CONCURRENCY,
               "work_s": work_total / CONCURRENCY},
        params={"num_samples": n, "max_epochs": 2, "grace_period": 1, "reduction_factor": 3,
                "max_concurrent": CONCURRENCY, "sleep_s_per_epoch": sleep_s,
                "space": {k: list(v) for k, v in SPACE.items()},
                "make_tuner_signature": str(inspect.signature(make_tuner))},
        formula="(wall - work) / trials, work = sum(epochs run) * sleep_s / concurrency; wall = "
                "make_tuner + Tuner.fit, Ray startup (connect) excluded and recorded")}


def run_optuna(ctx: Context) -> dict:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    n, sleep_s = ctx.s["optuna_trials"], ctx.s["ray_sleep_s"]
    epochs_run = 0

    def objective(trial) -> float:
        nonlocal epochs_run
        lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        for epoch in (1, 2):
            time.sleep(sleep_s)
            epochs_run += 1
            trial.report(score(lr, epoch), epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return score(lr, 2)

    la0, t0 = loadavg(), now()
    study = optuna.create_study(
        direction="maximize", sampler=optuna.samplers.TPESampler(seed=0),
        pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3))
    study.optimize(objective, n_trials=n)
    wall, work = now() - t0, epochs_run * sleep_s
    return {"optuna_trial_overhead_s": figure(
        "optuna_trial_overhead_s", (wall - work) / n, "s per trial", la0,
        way_a={"name": "plain Optuna, in-process, in-memory storage, TPESampler(seed=0) + "
                       "SuccessiveHalvingPruner, sequential", "wall_s": wall, "trials": n,
               "epochs_run": epochs_run, "work_s": work, "concurrency": 1},
        params={"sleep_s_per_epoch": sleep_s, "max_epochs": 2},
        formula="(wall - work) / trials, work = epochs run * sleep_s")}
