"""search_efficiency: does tune_pets' search find a better config faster than the simpler ways?

    python scripts/bench/search_efficiency.py              # full: 27 min on 2 idle cores
    python scripts/bench/search_efficiency.py --quick      # 4-5 min; 1 seed, 32 px: a sanity run
    python scripts/bench/search_efficiency.py --smoke      # about 1 min: what the test runs
    python scripts/bench/search_efficiency.py --out /tmp/se.json --data-dir DIR

Not part of ``scripts/benchmark.py``'s run. Six methods (``METHODS``; a is tune_pets as
shipped, through ``make_tuner`` and the real ``trainable``; c, random search with FIFO, is the
reference) search the shipped ``search_spaces/cnn.yaml`` (image size fixed) on the same photos
under the same wall-clock budget per run, over several seeds (sampler seed = trial seed = the
run's seed; one train/val split). Runs go round-robin, the order rotated per seed, so load from
other jobs spreads over the methods; one local Ray (2 CPUs), started once and not charged,
serves every Ray method. A run's anytime curve is its best val score so far against seconds
since its start; the target is c's (lower) median final best, and a run that never reaches it
counts as infinitely slow. Workload: the homework CNN at 48 px on the three ~100-image breeds of the
shared Pet sample as a 3-class task; ``workload_check`` measures how well it separates configs
(random configs' spread vs one config's seed noise). The test split only scores, once, the
config each method would hand to ``reproduce`` (retrained on all of train) under both
``pick_best`` rules. Writes the JSON (``--out``) and a PNG of the curves beside it.

Result of record (docs/search_efficiency.json, .png): one full run, 2026-11-29, 1,605 s, at
commit 0c44cbc; 2 cores of an Intel Xeon VM, no GPU, nothing else running (1-min load average
1.6-2.6: the benchmark's own two trials and driver); torch 2.14.1, ray 2.60.0, optuna 5.0.0;
90 s per run, 3 seeds. Workload check: 10 random configs' best val acc sd 0.096 (0.333-0.617)
against the homework config's seed noise sd 0.042 (3 seeds): spread/noise 2.3; one score on
the 60 val photos has a sampling sd of 0.065. Target 0.667 (40 of 60 val photos).

    method                        final best val   time to target  reached  test acc of pick
    a tune_pets (TPE + ASHA)      0.633 .633-.683  never (median)  1/3      0.624
    b random + ASHA               0.667 .667-.717  28 s            3/3      0.654
    c random, FIFO (reference)    0.667 .667-.717  42 s            3/3      0.654
    d TPE, FIFO                   0.783 .667-.800  44 s            3/3      0.685
    e Optuna alone (TPE + SHA)    0.767 .700-.783  45 s            3/3      0.705
    f homework config, no search  0.600 .550-.633  never           0/3      0.624

search_time_to_target_ratio 0 and search_vs_optuna_ratio 0 (goals >= 3 and >= 1: not met): a
reached the target in 1 of 3 seeds. A Ray search's first report came 6.7-10.5 s after its start
(Optuna alone: 0.8-3.4 s), so with c at 42 s a ratio of 3 needed a to hit the target within
14 s. Under load (3.5-8.7, 1,832 s, commit 3be8545): a 0.650, b-d 0.667, e 0.650, f 0.600;
which method wins moves with the seed and the load more than the gaps between the methods. A
6-seed rerun of a, c, d, e (2,135 s, docs/search_efficiency_6seeds.json): medians a 0.667, c
0.725, d 0.733, e 0.667; over all 9 runs a 0.650, c 0.717, d 0.733, e 0.700. At the shipped
schedule's length (`--methods a c d --set max_epochs=27 budget_s=240 ...`, 2,080 s,
docs/search_efficiency_27epochs.*): a 0.783, c 0.817, d 0.783, all within the seed spread; a's
24 trials took 198-324 trial-epochs, c's 13-16 took 314-390. See the README.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` from a checkout

from bench.harness import DEFAULT_DATA, REPO_ROOT, loadavg, log, machine_record  # noqa: E402
from tune_pets.search_results import PICK_RULES  # noqa: E402
from tune_pets.utils import atomic_write_json  # noqa: E402

BREEDS = ("Abyssinian", "Bengal", "american_bulldog")  # the three ~100-image breeds
CHECK_SAMPLER_SEED = 12345  # the workload check's random configs (not any method's seed)
# figure: (method, method, goal): the ratio of their median times to target; goal: >= this.
GOALS = {"search_time_to_target_ratio": ("c", "a", 3.0), "search_vs_optuna_ratio": ("e", "a", 1.0)}
# budget_s: wall-clock per run (every method, every seed); num_samples: cnn.yaml's 24 (a cap;
# sets TPE's startup trials). grace_period 3: epoch 1 (7 steps at batch 32) scores most configs
# at chance, so a first rung there ranks noise. quick: 1 seed (a Ray search needs 10-25 s before
# its first report); smoke: 2 one-epoch trials per search, ending long before the budget.
SETTINGS = {
    "full": {"seeds": 3, "img_size": 48, "max_epochs": 9, "grace_period": 3,
             "reduction_factor": 3, "budget_s": 90.0, "num_samples": 24, "val_fraction": 0.2,
             "check_random": 10, "check_seeds": 3, "score_test": 1},
    "quick": {"seeds": 1, "img_size": 32, "max_epochs": 4, "grace_period": 2,
              "reduction_factor": 2, "budget_s": 40.0, "num_samples": 12, "val_fraction": 0.2,
              "check_random": 4, "check_seeds": 2, "score_test": 1},
    "smoke": {"seeds": 1, "img_size": 32, "max_epochs": 1, "grace_period": 1,
              "reduction_factor": 2, "budget_s": 90.0, "num_samples": 2, "val_fraction": 0.2,
              "check_random": 2, "check_seeds": 2, "score_test": 1},
}


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # ray | optuna | single
    searcher: str = "tpe"  # make_tuner's / make_sampler's
    scheduler: str = "asha"  # make_tuner's (ray)
    first_point: bool = False  # evaluate the homework config first


METHODS = {
    "a": Method("tune_pets: Ray Tune + OptunaSearch TPE + ASHA", "ray", first_point=True),
    "b": Method("Ray Tune random search + ASHA", "ray", "random"),
    "c": Method("Ray Tune random search, FIFO (reference)", "ray", "random", "fifo"),
    "d": Method("Ray Tune + OptunaSearch TPE, FIFO", "ray", "tpe", "fifo"),
    "e": Method("Optuna alone: TPE + SuccessiveHalvingPruner, n_jobs=2", "optuna", "tpe", "sha",
                True),
    "f": Method("no search: the homework config, trained once", "single"),
}
BUDGET_WHY = (
    "equal wall-clock: the question is which method reaches a good config sooner on this "
    "machine, and what each method costs besides epochs (Ray's trial start-up and reporting, "
    "checkpoints, Optuna's threads sharing one interpreter) is part of that answer; equal "
    "trial-epochs would hide it. The trial-epochs each method ran are recorded beside it "
    "(trial_epochs), so both views are in the JSON.")
MODE_NOTES = {"full": "full run", "quick": "--quick: short budgets, small images; noisier",
              "smoke": "--smoke: checks that every method runs; the numbers mean nothing"}


@dataclass
class Ctx:
    s: dict
    spec: object  # SearchSpec (budget, space, epochs; each run sets its seed)
    model: object  # ModelSpec of the CNN
    data: object  # FitData: train minus val, and val
    tmp: Path


# ---------------------------------------------------------------- data and spec
def prepare_data(data_dir: str, tmp: Path) -> tuple[Path, dict]:
    """The 3-breed task as a temporary ImageFolder of links, or the package's shipped sample
    (all its breeds) when ``data_dir`` lacks those breeds."""
    from tune_pets.sample import SAMPLE_NAME, sample_dir

    def count(folder: Path) -> int:
        return sum(1 for p in folder.rglob("*") if p.is_file())

    src = None if data_dir == SAMPLE_NAME else Path(data_dir)
    if src is not None and all((src / s / b).is_dir() for s in ("train", "test") for b in BREEDS):
        root = tmp / "pets3"
        for split in ("train", "test"):
            for breed in BREEDS:
                (root / split).mkdir(parents=True, exist_ok=True)
                os.symlink((src / split / breed).resolve(), root / split / breed)
        return root, {
            "source": "real", "dir": str(src.resolve()), "classes": list(BREEDS),
            "counts": {s: {b: count(root / s / b) for b in BREEDS} for s in ("train", "test")},
            "note": "real Oxford-IIIT Pet photos: the three ~100-image breeds of the shared "
                    "sample as a 3-class task (chance 0.33)"}
    if data_dir != SAMPLE_NAME:
        log(f"{data_dir} lacks {', '.join(BREEDS)} in train/ and test/: using the shipped sample")
    root = sample_dir()
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    return root, {
        "source": "sample", "dir": str(root), "requested_dir": data_dir, "classes": classes,
        "counts": {s: count(root / s) for s in ("train", "test")},
        "note": f"the package's shipped sample ({len(classes)} breeds x 5 train photos): far "
                "too few photos per class to rank searchers; WEAK SIGNAL, the ratios mean "
                "little (see workload_check)"}


def bench_spec(s: dict):
    """The shipped CNN space with the image size fixed to the workload's, and the budget."""
    from tune_pets.spaces import default_space, load_search_spec

    shipped = load_search_spec(default_space("cnn"))
    return shipped.replace(
        space={k: v for k, v in shipped.space.items() if k != "img_size"},
        fixed={**shipped.fixed, "img_size": s["img_size"]}, num_samples=s["num_samples"],
        max_epochs=s["max_epochs"], grace_period=s["grace_period"],
        reduction_factor=s["reduction_factor"], max_concurrent=2, resources={"cpu": 1, "gpu": 0},
        split_seed=0, time_budget_s=s["budget_s"],
        source=f"{shipped.source} (benchmark: img_size fixed, budget set)")


def search_record(spec, base, sampler) -> dict:
    from tune_pets.search_plan import startup_trials

    fields = ("fixed metric mode num_samples max_epochs grace_period reduction_factor "
              "max_concurrent").split()
    return {"space": {k: [a, b] for k, (a, b) in spec.space.items()},
            **{k: getattr(spec, k) for k in fields}, "cpus_per_trial": 1,
            "tpe": {"n_startup_trials": startup_trials(spec.num_samples), "multivariate": True,
                    "constant_liar": True, "sampler": type(sampler).__name__},
            "stopped_trials_told_to_optuna_as": "pruned (tune_pets.search_ray: StoppedAsPruned)",
            "first_point": "the homework config, evaluated first by a and e",
            "homework_config": {k: getattr(base, k) for k in spec.space}}


# ---------------------------------------------------------------- Ray-side helpers
def _fit_task(config: dict, data, with_test: str | None = None, cache_dir: str | None = None):
    """One training run in a Ray task, 1 torch thread: the val history, or with ``with_test``
    (the data dir) the model's test scores, reproduce's way."""
    import torch

    from tune_pets.config import RunConfig
    from tune_pets.evaluate import evaluate_checkpoint
    from tune_pets.train import fit

    torch.set_num_threads(1)
    cfg = RunConfig.from_dict(config, "benchmark config")
    t0 = time.perf_counter()
    result = fit(cfg, data)
    out = {"time_s": time.perf_counter() - t0}
    if with_test is None:
        return {**out, "val": [h[cfg.metric] for h in result.history]}
    ev = evaluate_checkpoint(result.checkpoint, with_test, "test", cache_dir=cache_dir,
                             progress=False)
    return {**out, "test_acc": ev.scores["accuracy"], "test_macro_f1": ev.scores["macro_f1"]}


def run_tasks(calls: list[tuple]) -> list[dict]:
    """``_fit_task(*call)`` for each call, two at a time on the local Ray, in order."""
    import ray

    task = ray.remote(num_cpus=1)(_fit_task)
    return ray.get([task.remote(*c) for c in calls])


@functools.cache
def recorder_class() -> type:
    """A ``tune.Callback`` recording [seconds since t0, value, trial id, epoch] per report."""
    from ray import tune

    class Recorder(tune.Callback):
        def __init__(self, t0: float, metric: str):
            self.t0, self.metric, self.events = t0, metric, []

        def on_trial_result(self, iteration, trials, trial, result, **info):
            v = result.get(self.metric)
            if isinstance(v, (int, float)) and math.isfinite(v) and "epoch" in result:
                self.events.append([time.time() - self.t0, float(v), trial.trial_id,
                                    int(result["epoch"])])

    return Recorder


# ---------------------------------------------------------------- the methods
# Each returns (events, records, extra): events [seconds since start, value, trial id, epoch].
@contextlib.contextmanager
def one_torch_thread():
    """Trials in this process run on one torch thread: with two on this shared 2-core machine an
    epoch took 4-8x longer (threads spinning at each barrier while other jobs hold a core)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_ray(ctx: Ctx, key: str, seed: int) -> tuple[list, list, dict]:
    from ray import tune

    from tune_pets.search_plan import base_config, first_point
    from tune_pets.search_ray import TrialSetup, make_tuner, records_from_grid, trainable

    m, spec, name = METHODS[key], ctx.spec.replace(seed=seed), f"{key}_seed{seed}"
    storage = (ctx.tmp / "ray_results").resolve()
    # As a shipped search: each trial writes its best weights and training state every epoch.
    setup = TrialSetup(base_config(spec, ctx.model), ctx.model, str(ctx.tmp / "runs" / name),
                       tuple(spec.space), str(storage / name))
    fn = tune.with_resources(tune.with_parameters(trainable, setup=setup, data=ctx.data),
                             {"cpu": 1, "gpu": 0})
    t0 = time.time()
    recorder = recorder_class()(t0, spec.metric)
    grid = make_tuner(fn, spec, storage, name,
                      first_point(spec, ctx.model) if m.first_point else None, progress=False,
                      callbacks=[recorder],
                      searcher=m.searcher, scheduler=m.scheduler).fit()
    wall = time.time() - t0
    records = records_from_grid(grid, spec)
    return recorder.events, records, {"wall_s": wall, "errors": grid.num_errors}


def run_optuna(ctx: Ctx, key: str, seed: int) -> tuple[list, list, dict]:
    """Optuna alone: ``make_sampler``'s sampler, the homework point first, a
    SuccessiveHalvingPruner with ASHA's grace period and reduction factor, ``n_jobs=2``. Trials
    running when the budget ends stop there, like Ray's ``time_budget_s``."""
    import optuna
    import optuna.distributions as od

    from tune_pets.config import RunConfig
    from tune_pets.search_plan import base_config, first_point, make_sampler
    from tune_pets.search_results import make_record, optuna_distributions
    from tune_pets.train import fit

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = ctx.spec.replace(seed=seed)
    base, dists = base_config(spec, ctx.model), optuna_distributions(spec)
    study = optuna.create_study(
        direction="maximize" if spec.mode == "max" else "minimize",
        sampler=make_sampler(spec, METHODS[key].searcher),
        pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=spec.grace_period,
                                                      reduction_factor=spec.reduction_factor))
    study.enqueue_trial(first_point(spec, ctx.model))
    events: list[list] = []
    histories: dict[int, tuple[dict, list]] = {}
    lock = threading.Lock()

    def suggest(trial, name: str, dist):
        if isinstance(dist, od.CategoricalDistribution):
            return trial.suggest_categorical(name, dist.choices)
        kind = trial.suggest_int if isinstance(dist, od.IntDistribution) else trial.suggest_float
        return kind(name, dist.low, dist.high, step=dist.step, log=dist.log)

    def objective(trial) -> float:
        params = {k: suggest(trial, k, d) for k, d in dists.items()}
        config = RunConfig.from_dict({**base.to_dict(), **params}, "trial config")
        history: list[dict] = []
        with lock:
            histories[trial.number] = (params, history)

        def on_epoch(metrics: dict, _ckpt) -> None:
            t, v = time.time() - t0, metrics[spec.metric]
            history.append(metrics)
            with lock:
                events.append([t, float(v), str(trial.number), int(metrics["epoch"])])
            trial.report(v, metrics["epoch"])
            if t > spec.time_budget_s:
                study.stop()
            if t > spec.time_budget_s or trial.should_prune():
                raise optuna.TrialPruned

        fit(config, ctx.data, on_epoch)
        return history[-1][spec.metric]

    with one_torch_thread():
        t0 = time.time()
        study.optimize(objective, n_trials=spec.num_samples, timeout=spec.time_budget_s, n_jobs=2)
    wall = time.time() - t0
    records = [make_record(str(n), p, h, spec) for n, (p, h) in sorted(histories.items())]
    return events, records, {"wall_s": wall, "errors": 0}


def run_single(ctx: Ctx, key: str, seed: int) -> tuple[list, list, dict]:
    """The homework config trained once for max_epochs."""
    from tune_pets.search_plan import base_config, first_point
    from tune_pets.search_results import make_record
    from tune_pets.train import fit

    spec = ctx.spec.replace(seed=seed)
    config, events = base_config(spec, ctx.model), []

    def on_epoch(metrics: dict, _ckpt) -> None:
        events.append([time.time() - t0, float(metrics[spec.metric]), "f", metrics["epoch"]])

    with one_torch_thread():
        t0 = time.time()
        result = fit(config, ctx.data, on_epoch)
    wall = time.time() - t0
    records = [make_record("f", first_point(spec, ctx.model), result.history, spec)]
    return events, records, {"wall_s": wall, "errors": 0}


RUNNERS = {"ray": run_ray, "optuna": run_optuna, "single": run_single}


# ---------------------------------------------------------------- curves and numbers
def best_so_far(events: list[list], budget_s: float, mode: str = "max") -> list[list]:
    """[[t, best value so far]] at every improvement, reports after the budget left out."""
    curve, best = [], None
    for t, v, *_ in sorted(events, key=lambda e: e[0]):
        if t > budget_s:
            break
        if best is None or (v > best if mode == "max" else v < best):
            best = v
            curve.append([round(t, 3), v])
    return curve


def time_to(curve: list[list], target: float, mode: str = "max") -> float | None:
    """Seconds until the curve first reaches ``target``; None: never within the budget."""
    for t, v in curve:
        if (v >= target - 1e-12) if mode == "max" else (v <= target + 1e-12):
            return t
    return None


def stats(values: Sequence[float | None]) -> dict:
    """median/min/max of the values; None counts as +inf (a run that never got there)."""
    xs = [math.inf if v is None else v for v in values]
    if not xs:
        return {"median": None, "min": None, "max": None}
    return {k: round(x, 4) if math.isfinite(x) else None
            for k, x in (("median", statistics.median(xs)), ("min", min(xs)), ("max", max(xs)))}


def summarize_run(events, records, spec, extra: dict) -> dict:
    """A run's curve, final best, size (trials, trial-epochs, statuses) and its picks."""
    from tune_pets.search_results import pick_best, status_counts

    curve = best_so_far(events, spec.time_budget_s, spec.mode)
    picks = {}
    for rule in PICK_RULES:
        r = pick_best(records, spec, rule=rule)
        picks[rule] = None if r is None else {
            "trial_id": r.trial_id, "params": r.params, "epochs": r.epochs,
            "best_value": r.best_value, "best_epoch": r.best_epoch}
    in_budget = [e for e in events if e[0] <= spec.time_budget_s]
    return {"curve": curve, "final_best": curve[-1][1] if curve else None,
            "first_report_s": round(min(e[0] for e in events), 3) if events else None,
            "trials": len(records), "trials_reporting_in_budget": len({e[2] for e in in_budget}),
            "trial_epochs": len(in_budget), **status_counts(records),
            "wall_s": round(extra["wall_s"], 2), "errors": extra["errors"], "picks": picks,
            "events": [[round(t, 3), round(v, 4), tid, ep] for t, v, tid, ep in events]}


def _f(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def workload_check(ctx: Ctx, data_ref) -> dict:
    """Does the workload separate configs? ``check_random`` random configs against the homework
    config over ``check_seeds`` training seeds, each trained for max_epochs, two at a time: the
    spread of the random configs' scores against one config's seed-to-seed noise."""
    import optuna

    from tune_pets.search_plan import base_config
    from tune_pets.search_results import optuna_distributions

    s, spec = ctx.s, ctx.spec.replace(seed=0)
    base = base_config(spec, ctx.model)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=CHECK_SAMPLER_SEED))
    runs = []
    for _ in range(s["check_random"]):
        trial = study.ask(optuna_distributions(spec))
        study.tell(trial, 0.0)
        runs.append({"what": "random", "seed": 0, "params": trial.params})
    runs += [{"what": "homework", "seed": k, "params": {}} for k in range(s["check_seeds"])]
    t0, la0 = time.time(), loadavg()
    log(f"workload check: {s['check_random']} random configs + the homework config x "
        f"{s['check_seeds']} seeds, {spec.max_epochs} epochs each")
    calls = [(base.replace(seed=r["seed"], **r["params"]).to_dict(), data_ref) for r in runs]
    for r, out in zip(runs, run_tasks(calls), strict=True):
        r.update(best=max(out["val"]), last=out["val"][-1], val=[round(v, 4) for v in out["val"]],
                 time_s=round(out["time_s"], 2))

    def spread(key: str, what: str) -> dict:
        xs = [r[key] for r in runs if r["what"] == what]
        sd = statistics.stdev(xs) if len(xs) > 1 else None
        return {"sd": sd, "min": min(xs), "max": max(xs), "range": max(xs) - min(xs), "n": len(xs)}

    out = {"runs": runs, "wall_s": round(time.time() - t0, 1), "loadavg_start": la0,
           "loadavg_end": loadavg(), "metric": spec.metric, "epochs": spec.max_epochs}
    for key in ("best", "last"):
        sp, noise = spread(key, "random"), spread(key, "homework")
        out[f"{key}_{spec.metric}"] = {
            "spread_random_configs": sp, "noise_homework_over_seeds": noise,
            "spread_sd_over_noise_sd": sp["sd"] / noise["sd"] if sp["sd"] and noise["sd"] else None}
    n_val, p = len(ctx.data.val_y), statistics.median(r["best"] for r in runs)
    out.update(n_val=n_val, val_sampling_sd=math.sqrt(p * (1 - p) / n_val))
    main = out[f"best_{spec.metric}"]
    ratio = main["spread_sd_over_noise_sd"]
    sp, noise = main["spread_random_configs"], main["noise_homework_over_seeds"]
    # A rule of thumb, not a test: with 10 configs and 3 seeds an F test at p < 0.05 needs a
    # ratio of 4.4 (the run of record's 2.3 gives p = 0.17).
    out["separates"] = bool(ratio is not None and ratio >= 2.0)
    out["verdict"] = (
        f"random configs' best {spec.metric}: sd {_f(sp['sd'])}, range {_f(sp['min'])}-"
        f"{_f(sp['max'])}; the homework config over {s['check_seeds']} seeds: sd "
        f"{_f(noise['sd'])}, range {_f(noise['range'])}; spread/noise {_f(ratio, 1)}; one "
        f"score on {n_val} val images has a sampling sd of {_f(out['val_sampling_sd'])}")
    log(f"workload check: {out['verdict']}")
    return out


def score_picks(ctx: Ctx, result: dict, data_root: Path) -> dict:
    """Retrain every pick (each method, seed and pick rule; f: the homework config) on all of
    train, deterministic, for max_epochs, and score it on the test split once: what
    ``reproduce`` would report. Identical configs are trained once."""
    import ray

    from tune_pets.data import load_split
    from tune_pets.engine import load_fit_data
    from tune_pets.search_plan import base_config

    picks = []  # (pick, the config reproduce trains for it)
    for m in result["methods"].values():
        for run in m["runs"]:
            base = base_config(ctx.spec.replace(seed=run["seed"]), ctx.model)
            picks += [(pick, base.replace(**pick["params"], deterministic=True).to_dict())
                      for pick in run["picks"].values() if pick is not None]
    wanted = {json.dumps(cfg, sort_keys=True): cfg for _, cfg in picks}
    if not wanted:
        return {}
    cache, base0 = ctx.tmp / "cache", base_config(ctx.spec.replace(seed=0), ctx.model)
    full = load_fit_data(base0, data_root, full_train=True, cache_dir=cache,
                         img_sizes=[ctx.s["img_size"]], progress=False)
    load_split(data_root, "test", ctx.model.cache_res(base0), cache_dir=cache,
               classes=full.classes, progress=False)  # decode the test split once, here
    t0 = time.time()
    log(f"test scores: retraining {len(wanted)} distinct picked configs on all of train")
    ref = ray.put(full)
    outs = run_tasks([(cfg, ref, str(data_root), str(cache)) for cfg in wanted.values()])
    scores = dict(zip(wanted, outs, strict=True))
    for pick, cfg in picks:
        got = scores[json.dumps(cfg, sort_keys=True)]
        pick.update(test_acc=got["test_acc"], test_macro_f1=got["test_macro_f1"])
    return {"distinct_configs": len(wanted), "wall_s": round(time.time() - t0, 1),
            "n_train": full.info["n_train"], "epochs": ctx.spec.max_epochs,
            "protocol": "reproduce's: all of train (train + the search's val), "
                        "deterministic, the run's seed, max_epochs; the test split scored "
                        "once per config"}


# ---------------------------------------------------------------- aggregate
def _ratio(num: float | None, den: float | None) -> float | None:
    """num / den of two median times; None (never reached) is +inf. inf/x -> None (see
    ratio_notes), x/inf -> 0."""
    if den is None:
        return 0.0 if num is not None else None
    return None if num is None or den <= 0 else num / den


def finalize(result: dict, spec) -> None:
    """Target, times to target, per-method summaries and the top-level figures."""
    methods = result["methods"]
    finals = {k: [r["final_best"] for r in m["runs"]] for k, m in methods.items()}
    c_finals = [x for x in finals.get("c", []) if x is not None]
    # The lower median: with an even number of seeds the mean of the middle two is reached by
    # only half of c's runs, which would leave c's median time infinite by construction.
    target = statistics.median_low(c_finals) if c_finals else None
    result["target"] = {"value": target, "metric": spec.metric,
                        "rule": "median over seeds of method c's final best"}
    for k, m in methods.items():
        runs = m["runs"]
        times = [None if target is None else time_to(r["curve"], target, spec.mode) for r in runs]
        after = []
        for r, t in zip(runs, times, strict=True):
            r["time_to_target_s"] = t
            after.append(None if t is None else t - r["first_report_s"])
        m["final_best"] = {**stats(finals[k]), "per_seed": finals[k]}
        m["time_to_target_s"] = {**stats(times), "per_seed": times,
                                 "reached": f"{sum(t is not None for t in times)}/{len(times)}"}
        m["time_to_target_after_first_report_s"] = {**stats(after), "per_seed": after}
        m["first_report_s"] = stats([r["first_report_s"] for r in runs])
        m["trial_epochs"] = stats([r["trial_epochs"] for r in runs])
        m["trials"] = stats([r["trials_reporting_in_budget"] for r in runs])
        m["pick_test_acc"] = {}
        for rule in PICK_RULES:
            xs = [(r["picks"].get(rule) or {}).get("test_acc") for r in runs]
            if any(x is not None for x in xs):
                m["pick_test_acc"][rule] = {**stats([x for x in xs if x is not None]),
                                            "per_seed": xs}
    med = {k: m["time_to_target_s"]["median"] for k, m in methods.items()}
    after = {k: m["time_to_target_after_first_report_s"]["median"] for k, m in methods.items()}
    ratios = {key: (num, den) for key, (num, den, _) in GOALS.items()
              if num in methods and den in methods}
    notes = []
    for key, (num, den) in ratios.items():
        value, thr = _ratio(med[num], med[den]), GOALS[key][2]
        infinite = med[num] is None and med[den] is not None
        if infinite:
            notes.append(f"{key}: {num} never reached the target in most seeds, a did: "
                         "infinite (a faster by more than any ratio)")
        result[key] = value
        result.setdefault("goals", {})[key] = {
            "goal": f">= {thr:g}", "value": value,
            "met": infinite or (value is not None and value >= thr)}
    result["ratio_notes"] = notes
    result["diagnostics"] = {
        "what": "the same ratios with each run's clock started at its first report, i.e. "
        "without the fixed start-up of a search (Ray: a Tuner, two trial actors importing "
        "torch, the first epoch of a cold process); not the goal's figures",
        "first_report_s": {k: m["first_report_s"]["median"] for k, m in methods.items()},
        "time_to_target_after_first_report_s": after,
        **{f"{key}_after_first_report": _ratio(after[num], after[den])
           for key, (num, den) in ratios.items()}}
    result["search_final_best"] = {k: m["final_best"]["median"] for k, m in methods.items()}
    result["search_time_to_target_s"] = med
    result["search_pick_test_acc"] = {
        k: {rule: v["median"] for rule, v in m["pick_test_acc"].items()}
        for k, m in methods.items()}


# ---------------------------------------------------------------- the figure and the table
def plot(result: dict, path: Path) -> None:
    """Best val score so far vs seconds: median over seeds, min-max band, one line per method;
    the target dashed, each method's median time to it as a dot."""
    import numpy as np

    from tune_pets.figures import figure_style, save

    grid = np.linspace(0, result["settings"]["budget_s"], 400)
    target = (result.get("target") or {}).get("value")

    def at(curve: list, t: float) -> float:
        vals = [v for tc, v in curve if tc <= t]
        return vals[-1] if vals else np.nan

    with figure_style() as plt:
        fig, ax = plt.subplots(figsize=(9, 5.5))
        for k, m in result["methods"].items():
            # A seed that has not reported has found nothing (-inf): the median shows once half
            # the seeds have reported and never drops; the band spans the seeds that have.
            ys = np.array([[at(r["curve"], t) for t in grid] for r in m["runs"]])
            found = ~np.isnan(ys)
            med = np.median(np.where(found, ys, -np.inf), 0)
            med[np.isinf(med)] = np.nan
            lo, hi = np.where(found, ys, np.inf).min(0), np.where(found, ys, -np.inf).max(0)
            test = (m.get("pick_test_acc", {}).get("best_epoch") or {}).get("median")
            label = f"{k}: {METHODS[k].name}" + ("" if test is None else f" [test {test:.3f}]")
            (line,) = ax.plot(grid, med, lw=2.2 if k == "a" else 1.4, label=label)
            ax.fill_between(grid, lo, hi, where=found.any(0), color=line.get_color(),
                            alpha=0.12, lw=0)
            t = m.get("time_to_target_s", {}).get("median")
            if target is not None and t is not None:
                ax.plot([t], [target], "o", color=line.get_color(), ms=6)
        if target is not None:
            ax.axhline(target, ls="--", color="k", lw=1, label="target: c's median final best")
        ax.set_xlabel("wall-clock seconds since the run started")
        ax.set_ylabel(f"best {result['target']['metric']} so far (validation)")
        ax.set_title(f"search efficiency: {result['data']['task']}, median and min-max "
                     f"over {result['settings']['seeds']} seed(s)")
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(alpha=0.3)
        m = result["machine"]
        fig.text(0.01, 0.005, f"{m['cpu']}, {m['cpu_count']} cores; load average "
                 f"{result['loadavg_summary']}; dots: median time to the target; [test]: median "
                 "test acc of the config handed to reproduce", fontsize=7)
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        save(fig, path)


def summary_table(result: dict) -> str:
    def f(x, unit=""):
        return "-" if x is None else (f"{x:.3f}" if not unit else f"{x:.0f}{unit}")

    rows = [("method", "final best (med [min-max])", "time to target (med)", "reached", "trials",
             "trial-epochs", "test acc: best-epoch pick", "final-mean pick")]
    for k, m in result["methods"].items():
        fb, tt, pt = m["final_best"], m["time_to_target_s"], m["pick_test_acc"]
        rows.append((k, f"{f(fb['median'])} [{f(fb['min'])}-{f(fb['max'])}]",
                     f(tt["median"], " s"), tt["reached"], f(m["trials"]["median"], " "),
                     f(m["trial_epochs"]["median"], " "),
                     f((pt.get("best_epoch") or {}).get("median")),
                     f((pt.get("final_mean") or {}).get("median"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    target = result.get("target", {}).get("value")
    return "\n".join([*lines, f"target {target}; "
                      + "; ".join(f"{k} {result.get(k)}" for k in GOALS)])


# ---------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python scripts/bench/search_efficiency.py",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO_ROOT / "artifacts/bench/search_efficiency.json"),
                   help="JSON output, written atomically after every run; the PNG goes beside "
                        "it (default: %(default)s)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller and shorter: 4-5 minutes")
    size.add_argument("--smoke", action="store_true",
                      help="--quick at its smallest (1 seed, seconds per run): what the test "
                           "runs; the numbers mean nothing")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA),
                   help="ImageFolder root holding the three breeds in train/ and test/; "
                        "'sample' (or a folder without them) uses the package's shipped "
                        "photos: weak signal (default: %(default)s)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), metavar="M",
                   help="run only these methods (default: all; the ratios need a, c and e)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help=f"override a setting, for experiments: {', '.join(SETTINGS['full'])}")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace, mode: str) -> dict:
    s = dict(SETTINGS[mode])
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in s:
            raise SystemExit(f"--set {item}: unknown setting {key!r}; valid: {', '.join(s)}")
        s[key] = type(s[key])(float(value)) if isinstance(s[key], int) else float(value)
    return s


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    mode = "quick" if args.quick else "smoke" if args.smoke else "full"
    s = settings_from(args, mode)
    keys = [k for k in METHODS if k in (args.methods or METHODS)]
    out_path, png = Path(args.out), Path(args.out).with_suffix(".png")
    machine, env = machine_record()
    t_start = time.time()
    result = {
        "benchmark": "scripts/bench/search_efficiency.py",
        "created": dt.datetime.now().isoformat("T", "seconds"),
        "argv": sys.argv[1:] if argv is None else list(argv), "mode": mode, "settings": s,
        "machine": machine, "versions": env, "data": None,
        "budget": {"kind": "equal wall-clock", "per_run_s": s["budget_s"], "why": BUDGET_WHY},
        "methods": {k: {"name": METHODS[k].name, "runs": []} for k in keys}}
    import ray

    from tune_pets.engine import load_fit_data
    from tune_pets.models import get_spec
    from tune_pets.search_plan import base_config, make_sampler
    from tune_pets.search_ray import connect

    try:
        with tempfile.TemporaryDirectory(prefix="tune_pets_search_eff_") as tmp_name:
            tmp = Path(tmp_name)
            data_root, result["data"] = prepare_data(args.data_dir, tmp)
            spec, model = bench_spec(s), get_spec("cnn")
            base = base_config(spec.replace(seed=0), model)
            data = load_fit_data(base, data_root, val_fraction=s["val_fraction"],
                                 split_file=tmp / "val_split.json", cache_dir=tmp / "cache",
                                 img_sizes=[s["img_size"]], progress=False)
            n_train, n_val = data.info["n_train"], data.info["n_val"]
            result["data"].update(
                task=f"{len(data.classes)}-class CNN at {s['img_size']} px, {n_train} train / "
                     f"{n_val} val photos",
                n_train=n_train, n_val=n_val, split_seed=0, val_fraction=s["val_fraction"])
            result["search"] = search_record(spec, base, make_sampler(spec, "tpe"))
            t0 = time.time()
            connect(None, num_cpus=2)
            result["ray_startup_s_not_charged"] = round(time.time() - t0, 2)
            ctx = Ctx(s, spec, model, data, tmp)
            if s["check_random"] and s["check_seeds"]:  # 0: skipped (experiments only)
                result["workload_check"] = workload_check(ctx, ray.put(data))
            atomic_write_json(out_path, result)
            for seed in range(s["seeds"]):  # round-robin, the order rotated per seed
                for k in keys[seed % len(keys):] + keys[: seed % len(keys)]:
                    la0 = loadavg()
                    log(f"seed {seed}: {k} ({METHODS[k].name}), budget {s['budget_s']:g} s")
                    events, records, extra = RUNNERS[METHODS[k].kind](ctx, k, seed)
                    run = {"seed": seed, **summarize_run(events, records, spec, extra),
                           "loadavg_start": la0, "loadavg_end": loadavg()}
                    result["methods"][k]["runs"].append(run)
                    log(f"  {k}: final best {run['final_best']}, {run['trials']} trials, "
                        f"{run['trial_epochs']} trial-epochs, {run['wall_s']:.0f} s")
                    result["total_wall_s"] = round(time.time() - t_start, 1)
                    atomic_write_json(out_path, result)
            if s["score_test"]:  # 0: skipped (experiments only)
                result["test_scoring"] = score_picks(ctx, result, data_root)
    finally:
        ray.shutdown()
    finalize(result, spec)
    one_min = [r[k][0] for m in result["methods"].values() for r in m["runs"]
               for k in ("loadavg_start", "loadavg_end") if r[k]]
    result["loadavg_summary"] = (
        f"1-min {min(one_min):.1f}-{max(one_min):.1f}, median {statistics.median(one_min):.1f}"
        if one_min else "n/a")
    result["loadavg_at_end"] = loadavg()
    result["total_wall_s"] = round(time.time() - t_start, 1)
    result["note"] = MODE_NOTES[mode] + ("" if result["data"]["source"] == "real"
                                         else "; the shipped sample: weak signal")
    atomic_write_json(out_path, result)
    plot(result, png)
    print(summary_table(result))
    print(f"wrote {out_path} and {png}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
