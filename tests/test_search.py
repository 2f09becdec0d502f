"""The search end to end: real Ray Tune, real Optuna (TPE + SQLite), real ASHA, real files.

    python -m pytest tests/test_search.py -x -q              # about 5 minutes on 2 CPU cores
    python -m pytest tests/test_search.py -m "not slow"      # unit tests and usage errors (~45 s)

Every search runs ``python -m tune_pets.search`` in a subprocess, as a user would, on the tiny
ImageFolder from conftest (4 classes x 10 train x 4 test JPEGs) with a 2-block, width-8 CNN at
32 px. Each subprocess runs in its own session; whatever it leaves behind (Ray's gcs_server,
raylet, workers) is killed by session id afterwards, so no test touches Ray processes that
some other program on the machine started, and ``ray stop`` is never used. The resource choice
is tested against fake cluster views (``{"CPU": 16, "GPU": 2}``): this machine has no GPU.
"""

from __future__ import annotations

import csv
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import helpers
import pytest
from helpers import kill_session, leftovers, ok, session_pids
from PIL import Image

from tune_pets.config import RunConfig
from tune_pets.layout import Layout
from tune_pets.models import get_spec
from tune_pets.records import SearchSummary
from tune_pets.search import build_parser, resume_command
from tune_pets.cli import config_from_args
from tune_pets.search_plan import (
    DEFAULT_GPU_FRACTION,
    asha_warning,
    base_config,
    check_resumed_run,
    choose_resources,
    first_point,
    resumed_base,
    resumed_spec,
    save_spec,
)
from tune_pets.search_ray import GPUNotVisibleError, trial_device_label, _ray_classes
from tune_pets.search_results import STATUSES, build_study, make_record, pick_best, status_counts
from tune_pets.search_results import sqlite_storage, write_plots, write_trials_csv
from tune_pets.spaces import SearchSpec, default_space, load_search_spec
from tune_pets.utils import UserError, read_json

REPO = Path(__file__).resolve().parents[1]
SEARCH_TIMEOUT_S = 240

# A cheap CNN search: 32 px, 2 conv blocks of width 8; a few ms per epoch on 32 images.
CNN_SPACE = """\
model: cnn
metric: val_acc
mode: max
reduction_factor: 2
fixed: {img_size: 32, width: 8, depth: 2}
space:
  lr: {loguniform: [1.0e-4, 3.0e-2]}
  dropout: {uniform: [0.0, 0.5]}
  batch_size: {choice: [8, 16]}
"""

# Plain SGD (nesterov, momentum 0.9) with weight_decay 10 and no schedule: lr 10 makes the
# weights grow ~100x per step, so the loss is NaN within 5-8 steps and fit() raises
# NonFiniteLossError (checked directly with fit(); batch_size 8 -> epoch 2, 4 -> epoch 1).
# lr 0.01 trains normally. (lr 1.0e+8 would be simpler but the YAML loader rejects lr > 10.)
DIVERGING_SPACE = """\
model: cnn
fixed: {{img_size: 32, width: 8, depth: 2, optimizer: sgd, weight_decay: 10.0,
        scheduler: none, batch_size: {batch_size}}}
space:
  lr: {{choice: {lrs}}}
"""

# What the search prints on stdout, fresh or resumed; anything else is noise (Ray's own tables,
# a "Result logdir:" in its temp session folder, ...).
OWN_LINES = re.compile(
    r"^(resources: |data: |resuming '|trial \w+ (completed|stopped early|failed) after |"
    r"\[\d+s\] \d+/\d+ trials done|search '|best trial |  params: |wrote )"
)
TRIAL_LINE = re.compile(r"^trial (\w+) (completed|stopped early|failed) after (\d+) epochs?: ")


# ---------------------------------------------------------------- processes (helpers.py)
def start_cli(args: list, cwd: Path, extra_env: dict | None = None, log: Path | None = None):
    """``helpers.start`` of ``python -m tune_pets.search ARGS``; with ``log``, stdout goes to
    ``log`` and stderr to ``log``.err."""
    err_log = None if log is None else Path(f"{log}.err")
    return helpers.start("search", args, cwd, extra_env=extra_env, log=log, err_log=err_log)


def run_cli(
    args: list, cwd: Path, extra_env: dict | None = None, timeout: float = SEARCH_TIMEOUT_S
):
    return helpers.run("search", args, cwd, timeout=timeout, extra_env=extra_env)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """``helpers.error_line``, said by the search itself (its prog name)."""
    line = helpers.error_line(proc)
    assert line.startswith("python -m tune_pets.search: error: "), proc.stderr[-3000:]
    return line


def search_args(
    data: Path, space: Path | None, root: Path, progress: bool = False, model: str = "cnn", **flags
) -> list:
    """A search writing into ``root`` (artifacts/, runs/, cache/), with the shipped space when
    ``space`` is None; ``flags``: num_samples=6 becomes --num-samples 6."""
    args = [model, "--data-dir", data, "--artifacts-dir", root / "artifacts"]
    args += ["--runs-dir", root / "runs", "--cache-dir", root / "cache"]
    args += ([] if space is None else ["--search-space", space]) + (
        [] if progress else ["--no-progress"]
    )
    for key, value in flags.items():
        args += [f"--{key.replace('_', '-')}", value]
    return args


def foreign_lines(stdout: str) -> list[str]:
    return [ln for ln in stdout.splitlines() if ln.strip() and not OWN_LINES.match(ln)]


# ---------------------------------------------------------------- outputs
def read_trials(out_dir: Path) -> list[dict]:
    with (out_dir / "trials.csv").open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def read_best(out_dir: Path) -> SearchSummary:
    return SearchSummary.read(out_dir / "best_config.json", "best_config.json")


def trial_dirs(experiment: Path) -> list[Path]:
    return sorted(p for p in experiment.iterdir() if p.is_dir() and p.name.startswith("trial_"))


def study_trials(db: Path, name: str = "cnn") -> list:
    import optuna

    study = optuna.load_study(study_name=name, storage=sqlite_storage(db))
    return sorted(study.trials, key=lambda t: t.number)


def write_space(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- resources (fake clusters)
def _spec(**kw) -> SearchSpec:
    return SearchSpec(model="cnn", max_concurrent=2, source="space.yaml", **kw)


def _choose(flags: str, cluster: dict, kind: str = "images", resources="auto"):
    args = build_parser().parse_args(["cnn", *flags.split()])
    return choose_resources(_spec(resources=resources), cluster, kind, args)


NO_GPU, ONE_GPU, TWO_GPUS = {"CPU": 16}, {"CPU": 16, "GPU": 1}, {"CPU": 16, "GPU": 2}
CPU_ONLY = {"cpu": 1, "gpu": 0}


@pytest.mark.parametrize(
    "flags, cluster, kind, resources, expected",  # expected: cpu, gpu, trials at once
    [
        ("", NO_GPU, "images", "auto", (1, 0, 2)),  # CPU trials, the YAML's max_concurrent
        ("", TWO_GPUS, "images", "auto", (1, 0.25, 8)),  # the cnn share fills both GPUs
        ("", TWO_GPUS, "features", "auto", (1, 0.5, 4)),  # the vit share
        ("--gpus-per-trial 0.25", ONE_GPU, "images", CPU_ONLY, (1, 0.25, 4)),  # lifts the cap
        ("--gpus-per-trial 0.25 --max-concurrent 3", ONE_GPU, "images", "auto", (1, 0.25, 3)),
        ("--cpus-per-trial 2", {"CPU": 6, "GPU": 2}, "images", "auto", (2, 0.25, 3)),  # CPU cap
        ("--gpus-per-trial 0", TWO_GPUS, "images", "auto", (1, 0, 2)),  # GPUs left unused
        ("", TWO_GPUS, "images", {"cpu": 1, "gpu": 0.5}, (1, 0.5, 2)),  # YAML share: its cap
        ("", {"CPU": 1}, "images", "auto", (1, 0, 1)),  # the YAML's 2, capped by CPUs
        ("", ONE_GPU, "images", {"cpu": 1, "gpu": 1}, (1, 1, 1)),  # ... and by GPUs
    ],
)
def test_resource_choice_for_a_cluster_view(flags, cluster, kind, resources, expected):
    chosen = _choose(flags, cluster, kind, resources)
    assert (chosen.cpu, chosen.gpu, chosen.max_concurrent) == pytest.approx(expected)
    line = chosen.line(cluster)
    assert line.startswith("resources: ") and "\n" not in line


def test_the_cap_names_the_resource_that_caps():
    """On a CPU-only cluster it said "capped by GPUs"."""
    assert "max_concurrent in the YAML, capped by CPUs" in _choose("", {"CPU": 1}).line({})
    gpu_capped = _choose("", ONE_GPU, resources={"cpu": 1, "gpu": 1}).line({})
    assert "max_concurrent in the YAML, capped by GPUs" in gpu_capped


@pytest.mark.parametrize("flag", ["--overwrite", "--over", "--resume", "--res"])
def test_the_resume_command_drops_every_spelling_of_overwrite_and_resume(flag):
    """argparse took --over for --overwrite; the printed command then had both and was refused."""
    command = resume_command(["cnn", flag, "--max-epochs", "3"], "cnn", named=False)
    assert command == "python -m tune_pets.search cnn --max-epochs 3 --name cnn --resume"


@pytest.mark.parametrize("model", ["cnn", "vit"])
def test_search_space_smoke_names_the_shipped_tiny_space(model):
    """Without a checkout the smoke YAMLs were reachable only through their install path."""
    from tune_pets.search_plan import spec_from_args

    args = build_parser().parse_args([model, "--search-space", "smoke"])
    spec = spec_from_args(args, get_spec(model))
    assert Path(spec.source) == default_space(model, smoke=True) and spec.num_samples <= 6


def test_default_gpu_share_covers_every_model_kind():
    from tune_pets.models import KINDS

    assert set(DEFAULT_GPU_FRACTION) == set(KINDS)
    assert all(0 < v <= 1 for v in DEFAULT_GPU_FRACTION.values())


@pytest.mark.parametrize(
    "flags, cluster, resources, words",
    [
        ("--gpus-per-trial 1", {"CPU": 2}, "auto", ["--gpus-per-trial 1", "0 GPU"]),
        ("--gpus-per-trial 4", TWO_GPUS, "auto", ["--gpus-per-trial 4", "2 GPU"]),
        ("", {"CPU": 2}, {"cpu": 1, "gpu": 1}, ["space.yaml: resources.gpu 1", "0 GPU"]),
        ("--cpus-per-trial 4", {"CPU": 2}, "auto", ["--cpus-per-trial 4", "2 CPU"]),
        # Two 1-CPU nodes: 2 CPUs in all, but no trial can get 2 (it waited forever).
        ("--cpus-per-trial 2", {"CPU": 2}, "auto", ["--cpus-per-trial 2", "no node", "1 CPU"]),
        ("", TWO_GPUS, {"cpu": 1, "gpu": 2}, ["resources.gpu 2", "no node", "1 GPU"]),
    ],
)
def test_asking_for_more_than_the_cluster_has_is_a_user_error(flags, cluster, resources, words):
    node = {k: v / 2 for k, v in cluster.items()}  # the cluster as two equal nodes
    with pytest.raises(UserError) as e:
        args = build_parser().parse_args(["cnn", *flags.split()])
        choose_resources(_spec(resources=resources), cluster, "images", args, node)
    assert "\n" not in str(e.value)
    assert all(word in str(e.value) for word in words), str(e.value)


def test_a_trial_with_a_gpu_that_torch_cannot_see_fails():
    assert trial_device_label([], cuda_available=False) == "cpu"
    assert trial_device_label(["1"], cuda_available=True) == "cuda:1"
    with pytest.raises(GPUNotVisibleError, match="assigned GPU 1.*--gpus-per-trial 0"):
        trial_device_label(["1"], cuda_available=False)


def test_grace_period_at_max_epochs_is_warned_about():
    assert asha_warning(_spec(grace_period=1, max_epochs=3)) is None
    line = asha_warning(_spec(grace_period=3, max_epochs=2))
    assert "\n" not in line and "grace_period 3 >= max_epochs 2" in line
    assert "--grace-period" in line and "--max-epochs" in line


# ---------------------------------------------------------------- records (plain data)
def test_a_restarted_trial_is_recorded_from_its_last_run():
    """A trial that was running when the driver was killed starts over on --resume and reports
    epoch 1 again: its record is that last run, not the two runs mixed."""
    spec = _spec(max_epochs=3, space={"lr": ("loguniform", [1e-4, 1e-2])})
    reports = [{"epoch": 1, "val_acc": 0.9}, {"epoch": 2, "val_acc": 0.95}]
    reports += [{"epoch": e, "val_acc": 0.25 * e, "config": {}, "pid": 1} for e in (1, 2, 3)]
    record = make_record("t1", {"lr": 1e-3}, reports, spec)
    assert [h["epoch"] for h in record.history] == [1, 2, 3]
    assert (record.status, record.best_epoch, record.best_value) == ("completed", 3, 0.75)
    assert all("config" not in h and "pid" not in h for h in record.history)
    # A finished trial's saved reports keep when it started (the order of trials.csv): without
    # it, one re-reported on --resume sorted last.
    record = make_record("t2", {"lr": 1e-3}, [{"epoch": 1, "val_acc": 0.5, "started": 7.0}], spec)
    assert record.history[0]["started"] == 7.0


def test_failed_trials_are_never_the_best():
    spec = _spec(max_epochs=2, space={"lr": ("loguniform", [1e-4, 1e-2])})
    good = make_record("good", {"lr": 1e-3}, [{"epoch": 1, "val_acc": 0.5}], spec)
    broke = make_record("broke", {"lr": 1e-2}, [{"epoch": 1, "val_acc": 0.9}], spec, error="E: x")
    assert (good.status, broke.status) == ("stopped early", "failed")
    assert pick_best([broke, good], spec) is good
    assert pick_best([broke], spec) is None


def test_trials_csv_counts_and_study_say_what_the_records_say(tmp_path):
    """trials.csv's best columns are the best epoch's, the status counts are the records', and
    a failed trial that had scores is FAIL in optuna.db, never its best trial."""
    spec = _spec(max_epochs=3, space={"lr": ("loguniform", [1e-4, 1e-2])})
    scores = zip((1, 2, 3), (0.5, 0.9, 0.6), (0.1, 0.7, 0.3), strict=True)
    reports = [{"epoch": e, "val_acc": a, "val_macro_f1": f} for e, a, f in scores]
    done = make_record("done", {"lr": 1e-3}, reports, spec)
    stopped = make_record("stopped", {"lr": 2e-3}, reports[:1], spec)
    broke = make_record("broke", {"lr": 1e-2}, [{"epoch": 1, "val_acc": 0.95}], spec, error="E")
    records = [done, stopped, broke]
    write_trials_csv(records, spec, tmp_path / "trials.csv")
    row = read_trials(tmp_path)[0]
    assert (row["best_epoch"], row["best_val_acc"], row["best_val_macro_f1"]) == ("2", "0.9", "0.7")
    assert status_counts(records) == {"completed": 1, "stopped_early": 1, "failed": 1}
    study = build_study(records, spec, "cnn")
    assert (study.trials[2].state.name, study.trials[2].value) == ("FAIL", None)
    assert study.best_trial.user_attrs["ray_trial_id"] == "done"


def test_the_homework_point_snaps_to_the_nearest_value_of_the_space():
    cnn = get_spec("cnn")
    assert (cnn.defaults.batch_size, cnn.defaults.lr) == (32, 1e-3)
    space = {"batch_size": ("quniform", [16, 64, 24]), "lr": ("loguniform", [2e-3, 1e-2])}
    assert first_point(_spec(space=space), cnn) == {"batch_size": 40, "lr": 2e-3}


def test_fractional_cpus_per_trial_fill_the_cluster():
    spec = _spec(resources={"cpu": 1.1, "gpu": 0}).replace(max_concurrent=100)
    assert choose_resources(spec, {"CPU": 33}, "images").max_concurrent == 30  # 33/1.1: 29.99..


def test_parameter_importances_are_the_same_for_the_same_trials(tmp_path):
    """Two plots of the same trials are the same file. Before Optuna 5 the default evaluator
    was fANOVA, an unseeded random forest: on Optuna 4.5 this failed (a different ranking of
    pure noise each time) until the plot named PED-ANOVA, the default from Optuna 5 on."""
    spec = _spec(
        max_epochs=2, space={"lr": ("loguniform", [1e-4, 1e-1]), "dropout": ("uniform", [0.0, 0.5])}
    )
    rng = random.Random(0)
    records = []
    for i in range(12):
        params = {"lr": 10 ** rng.uniform(-4, -1), "dropout": rng.uniform(0, 0.5)}
        acc = rng.random()  # no signal: an unseeded forest ranks noise differently each run
        reports = [{"epoch": e, "val_acc": acc * e / 2} for e in (1, 2)]
        records.append(make_record(f"t{i:02d}", params, reports, spec))
    plots = []
    for run in ("a", "b"):
        layout = Layout(tmp_path / run)
        layout.search("cnn").mkdir(parents=True)
        write_plots(records, spec, "cnn", layout)
        plots.append(layout.search_plot("cnn", "param_importances").read_bytes())
    assert plots[0] == plots[1]


# ---------------------------------------------------------------- the live optuna.db
def test_export_callback_writes_optuna_db_after_each_finished_trial(tmp_path, capsys):
    """The tune.Callback itself, driven in-process with Tune's own Trial objects: after one
    finished trial optuna.db holds it; the state Ray snapshots restores a callback that goes on
    from there (as after --resume); every write is atomic (no temporary file is left)."""
    from ray.tune.experiment import Trial

    spec = load_search_spec(write_space(tmp_path / "space.yaml", CNN_SPACE))
    spec = spec.replace(max_epochs=2, num_samples=2)
    db = tmp_path / "out #1?%20" / "optuna.db"  # the sqlite URL's special characters
    params = {"lr": 1e-3, "dropout": 0.2, "batch_size": 16}
    a = Trial("trainable", config=params, trial_id="aaaa0001", stub=True)
    b = Trial("trainable", config={**params, "lr": 2e-3}, trial_id="bbbb0002", stub=True)
    callback = _ray_classes().OptunaExport(spec, "cnn", db)
    for epoch, acc in ((1, 0.25), (2, 0.5)):
        result = {
            "epoch": epoch,
            "val_acc": acc,
            "val_macro_f1": acc / 2,
            "device": "cpu",
            "host": "h",
            "trial_id": a.trial_id,
            "config": params,
            "time_total_s": 1.0,
        }
        callback.on_trial_result(iteration=epoch, trials=[a, b], trial=a, result=result)
    callback.on_trial_result(iteration=3, trials=[a, b], trial=b, result={"epoch": 1})
    assert not db.exists(), "nothing is exported before a trial finishes"

    callback.on_trial_complete(iteration=4, trials=[a, b], trial=a)
    (first,) = study_trials(db)
    assert first.value == 0.5 and first.intermediate_values == {1: 0.25, 2: 0.5}
    assert first.params == pytest.approx(params)
    assert first.user_attrs["ray_trial_id"] == "aaaa0001" and first.user_attrs["device"] == "cpu"
    assert first.user_attrs["status"] == "completed"
    out = capsys.readouterr().out
    assert "trial aaaa0001 completed after 2 epochs: val_acc 0.5000" in out and "[1/2" in out

    restored = _ray_classes().OptunaExport(spec, "cnn", db)
    restored.set_state(pickle.loads(pickle.dumps(callback.get_state())))
    restored.on_trial_error(iteration=5, trials=[a, b], trial=b)
    trials = study_trials(db)
    assert [t.user_attrs["ray_trial_id"] for t in trials] == ["aaaa0001", "bbbb0002"]
    assert trials[1].state.name == "FAIL" and trials[1].user_attrs["status"] == "failed"
    assert "trial bbbb0002 failed after 1 epoch: " in capsys.readouterr().out
    assert sorted(p.name for p in db.parent.iterdir()) == ["optuna.db"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [db.parent.name, "space.yaml"]


def test_an_optuna_db_error_is_told_by_its_own_line():
    """SQLAlchemy's error ends in a link to its docs: the warning for an optuna.db not updated
    gave that link as the reason."""
    import sqlite3

    import sqlalchemy.exc

    from tune_pets.search_results import error_line as reason

    cause = sqlite3.OperationalError("unable to open database file")
    assert reason(sqlalchemy.exc.OperationalError("INSERT", {}, cause)) == str(cause)


# ---------------------------------------------------------------- one search, many checks
SEARCH_SAMPLES, SEARCH_EPOCHS = 6, 4


@pytest.fixture(scope="module")
def cnn_search(tiny_data, tmp_path_factory):
    """6 trials x up to 4 epochs, ASHA grace 1 / reduction 2, one trial at a time (so ASHA's
    decisions are sequential and the outcome is deterministic for a given seed)."""
    root = tmp_path_factory.mktemp("cnn_search")
    space = write_space(root / "space.yaml", CNN_SPACE)
    args = search_args(
        tiny_data,
        space,
        root,
        num_samples=SEARCH_SAMPLES,
        grace_period=1,
        max_epochs=SEARCH_EPOCHS,
        max_concurrent=1,
        num_cpus=2,
    )
    return {
        "proc": run_cli(args, root),
        "root": root,
        "data": tiny_data,
        "out": root / "artifacts" / "search" / "cnn",
        "exp": root / "artifacts" / "ray_results" / "cnn",
        "tb": root / "runs" / "search" / "cnn",
    }


@pytest.mark.slow
def test_search_writes_trials_csv_and_best_config(cnn_search):
    ok(cnn_search["proc"])
    out = cnn_search["out"]
    rows = read_trials(out)
    columns = "trial_id status epochs lr dropout batch_size best_val_acc best_epoch"
    columns += " best_val_macro_f1 time_s node host device error restarts restart_reason"
    assert list(rows[0]) == columns.split()
    assert len(rows) == SEARCH_SAMPLES
    assert len({r["trial_id"] for r in rows}) == SEARCH_SAMPLES
    for r in rows:
        assert r["status"] in set(STATUSES) - {"failed"} and r["error"] == ""
        assert 1 <= int(r["epochs"]) <= SEARCH_EPOCHS
        assert 1 <= int(r["best_epoch"]) <= int(r["epochs"])
        assert 1.0e-4 <= float(r["lr"]) <= 3.0e-2 and 0.0 <= float(r["dropout"]) <= 0.5
        assert r["batch_size"] in ("8", "16")
        assert 0.0 <= float(r["best_val_acc"]) <= 1.0 and r["node"]
        assert r["device"] == "cpu" and r["host"] == socket.gethostname()
    assert len(trial_dirs(cnn_search["exp"])) == SEARCH_SAMPLES

    best = read_best(out)
    config = RunConfig.from_dict(best.config, "best_config.json")
    assert best.model == "cnn" and config.model == "cnn" and best.metric == "val_acc"
    # YAML `fixed` and the budget made it into the config that `reproduce` will train.
    assert (config.img_size, config.width, config.depth) == (32, 8, 2)
    assert config.epochs == SEARCH_EPOCHS
    top = max(rows, key=lambda r: float(r["best_val_acc"]))
    assert best.best_value == pytest.approx(float(top["best_val_acc"]))
    winner = next(r for r in rows if r["trial_id"] == best.trial_id)
    assert best.val_acc == pytest.approx(float(winner["best_val_acc"]))
    assert best.val_macro_f1 == pytest.approx(float(winner["best_val_macro_f1"]))
    assert config.lr == pytest.approx(float(winner["lr"]))
    assert config.batch_size == int(winner["batch_size"])
    assert best.epoch == int(winner["best_epoch"])
    assert best.search["num_trials"] == SEARCH_SAMPLES and best.search["devices"] == ["cpu"]
    assert best.search["max_concurrent"] == 1

    # The kept checkpoint of the winner is its best epoch's (fit reports one only on a new best).
    import torch

    ckpt = torch.load(best.checkpoint, weights_only=True)
    assert ckpt["epoch"] == best.epoch
    assert ckpt["config"]["lr"] == pytest.approx(config.lr)
    assert ckpt["metrics"]["val_acc"] == pytest.approx(best.val_acc)
    # So is every trial's, the ones ASHA stopped at their best epoch too: Tune ends a trial it
    # stops inside tune.report, and the checkpoint saved after the report was never written.
    for row in rows:
        path = cnn_search["exp"] / f"trial_{row['trial_id']}" / "checkpoint_best.pt"
        assert torch.load(path, weights_only=True)["epoch"] == int(row["best_epoch"]), row


@pytest.mark.slow
def test_search_log_has_one_line_per_finished_trial_and_no_ray_noise(cnn_search):
    proc = ok(cnn_search["proc"])
    rows = {r["trial_id"]: r for r in read_trials(cnn_search["out"])}
    finished = [m for m in map(TRIAL_LINE.match, proc.stdout.splitlines()) if m]
    assert {m[1] for m in finished} == set(rows) and len(finished) == SEARCH_SAMPLES
    for m in finished:
        assert (m[2], m[3]) == (rows[m[1]]["status"], rows[m[1]]["epochs"])
    assert proc.stdout.startswith("resources: 1 CPU per trial, up to 1 trial(s) at once")
    assert not foreign_lines(proc.stdout), foreign_lines(proc.stdout)
    assert "Result logdir" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_first_trial_is_the_homework_default_and_study_is_saved(cnn_search):
    ok(cnn_search["proc"])
    trials = study_trials(cnn_search["out"] / "optuna.db")
    assert len(trials) == SEARCH_SAMPLES
    # Homework: lr 1e-3, dropout 0.2, batch 32 (snapped to the nearest choice, 16).
    homework = {"lr": pytest.approx(1e-3), "dropout": pytest.approx(0.2), "batch_size": 16}
    assert trials[0].params == homework
    assert len({tuple(sorted(t.params.items())) for t in trials}) == SEARCH_SAMPLES
    rows = read_trials(cnn_search["out"])
    assert [t.user_attrs["ray_trial_id"] for t in trials] == [r["trial_id"] for r in rows]
    assert all(t.user_attrs["device"] == "cpu" for t in trials)
    # ... and the same first point is the first row of trials.csv.
    assert float(rows[0]["lr"]) == pytest.approx(1e-3) and float(rows[0]["dropout"]) == 0.2


@pytest.mark.slow
def test_each_trial_logs_scalars_and_hparams_to_tensorboard(cnn_search):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    ok(cnn_search["proc"])
    rows = read_trials(cnn_search["out"])
    assert sorted(p.name for p in cnn_search["tb"].iterdir()) == sorted(r["trial_id"] for r in rows)
    for r in rows:
        events = EventAccumulator(str(cnn_search["tb"] / r["trial_id"]))
        events.Reload()
        scalars = set(events.Tags()["scalars"])
        assert {"train_loss", "train_acc", "val_loss", "val_acc", "val_macro_f1", "lr"} <= scalars
        val_acc = events.Scalars("val_acc")
        assert [e.step for e in val_acc] == list(range(1, int(r["epochs"]) + 1))
        best = max(val_acc, key=lambda e: e.value)
        assert (best.step, best.value) == (
            int(r["best_epoch"]),
            pytest.approx(float(r["best_val_acc"])),
        )
        start = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
        assert hparams["lr"].number_value == pytest.approx(float(r["lr"]))
        assert hparams["batch_size"].number_value == int(r["batch_size"])


@pytest.mark.slow
def test_val_split_is_disjoint_and_excludes_test(cnn_search):
    ok(cnn_search["proc"])
    split = json.loads((cnn_search["out"] / "val_split.json").read_text())
    train, val = split["train"], split["val"]
    assert train and val and not set(train) & set(val)
    assert len(set(train)) == len(train) and len(set(val)) == len(val)
    data = cnn_search["data"]
    train_files = {p.relative_to(data).as_posix() for p in (data / "train").rglob("*.jpg")}
    test_files = {p.relative_to(data).as_posix() for p in (data / "test").rglob("*.jpg")}
    assert set(train) | set(val) == train_files
    assert not (set(train) | set(val)) & test_files
    assert all(p.startswith("train/") for p in train + val)
    # Stratified: every class is in val.
    assert {p.split("/")[1] for p in val} == {p.name for p in (data / "train").iterdir()}


@pytest.mark.slow
def test_plots_are_real_pngs_and_importances_wait_for_enough_trials(cnn_search):
    proc = ok(cnn_search["proc"])
    for name in ("learning_curves.png", "optimization_history.png"):
        with Image.open(cnn_search["out"] / name) as im:
            assert im.format == "PNG" and im.width > 100 and im.height > 100
            im.load()
    # 6 trials are too few for parameter importances: skipped, with one line saying so.
    assert not (cnn_search["out"] / "param_importances.png").exists()
    notes = [ln for ln in proc.stderr.splitlines() if "param_importances.png skipped" in ln]
    assert len(notes) == 1 and "at least 8" in notes[0]


@pytest.mark.slow
def test_asha_stops_some_trials_at_a_rung(cnn_search):
    ok(cnn_search["proc"])
    rows = read_trials(cnn_search["out"])
    stopped = [r for r in rows if r["status"] == "stopped early"]
    completed = [r for r in rows if r["status"] == "completed"]
    assert stopped, f"ASHA stopped nothing: {rows}"
    assert completed, "ASHA must let at least the leader run to max_epochs"
    # grace 1, reduction 2, max_t 4: rungs at epochs 1 and 2; a stopped trial ends on one.
    assert {int(r["epochs"]) for r in stopped} <= {1, 2}
    assert all(int(r["epochs"]) == SEARCH_EPOCHS for r in completed)
    # What trials.csv says matches what each trial really reported.
    for r in rows:
        lines = (cnn_search["exp"] / f"trial_{r['trial_id']}" / "result.json").read_text()
        epochs = [json.loads(ln)["epoch"] for ln in lines.splitlines() if ln.strip()]
        assert max(epochs) == int(r["epochs"])


@pytest.mark.slow
def test_existing_experiment_needs_resume_or_overwrite(cnn_search, tmp_path):
    """Re-running a finished search refuses (exit 2, names --overwrite), also with its Ray
    state elsewhere (--storage-path); --overwrite replaces the old trials, their TensorBoard
    logs and optuna.db. Works on a copy so the shared search stays intact."""
    ok(cnn_search["proc"])
    shutil.copytree(cnn_search["exp"], tmp_path / "artifacts" / "ray_results" / "cnn")
    shutil.copytree(cnn_search["tb"], tmp_path / "runs" / "search" / "cnn")
    shutil.copytree(cnn_search["out"], tmp_path / "artifacts" / "search" / "cnn")
    space = cnn_search["root"] / "space.yaml"
    args = search_args(
        cnn_search["data"],
        space,
        tmp_path,
        num_samples=2,
        max_epochs=1,
        max_concurrent=2,
        num_cpus=2,
    )
    line = error_line(run_cli(args, tmp_path))
    assert "--overwrite" in line and "--resume" in line and "cnn" in line
    line = error_line(run_cli([*args, "--storage-path", tmp_path / "elsewhere"], tmp_path))
    assert "already has results" in line and "--overwrite" in line
    assert not (tmp_path / "elsewhere").exists()

    ok(run_cli([*args, "--overwrite"], tmp_path))
    out = tmp_path / "artifacts" / "search" / "cnn"
    rows = read_trials(out)
    assert len(rows) == 2
    assert len(trial_dirs(tmp_path / "artifacts" / "ray_results" / "cnn")) == 2
    tb = sorted(p.name for p in (tmp_path / "runs" / "search" / "cnn").iterdir())
    assert tb == sorted(r["trial_id"] for r in rows)
    assert len(study_trials(out / "optuna.db")) == 2


@pytest.mark.slow
def test_resume_goes_on_with_the_settings_the_search_started_with(cnn_search, tmp_path):
    """--resume continues the search as it was started (search_spec.json): a search flag or
    space asking for something else is refused in one line; a plain --resume of the finished
    search needs none of the original flags and rewrites the same results (it once used the
    shipped YAML's num_samples and reported the search as interrupted, forever), in the same
    order (a restored ResultGrid lists the newest result first; ties in the pick follow it)."""
    ok(cnn_search["proc"])
    copies = {
        "exp": "artifacts/ray_results/cnn",
        "tb": "runs/search/cnn",
        "out": "artifacts/search/cnn",
    }
    for key, dest in copies.items():
        shutil.copytree(cnn_search[key], tmp_path / dest)
    args = [*search_args(cnn_search["data"], None, tmp_path, num_cpus=2), "--resume"]
    line = error_line(run_cli([*args, "--num-samples", SEARCH_SAMPLES + 1], tmp_path))
    assert f"--num-samples {SEARCH_SAMPLES + 1}" in line and f"with {SEARCH_SAMPLES};" in line
    assert "--val-fraction 0.3" in error_line(run_cli([*args, "--val-fraction", 0.3], tmp_path))
    smoke_space = default_space("cnn", smoke=True)
    line = error_line(run_cli([*args, "--search-space", smoke_space], tmp_path))
    assert "--search-space" in line and "differs" in line
    # Nor a flag that changes the remaining trials' config, their data or trials at once.
    line = error_line(run_cli([*args, "--max-steps-per-epoch", 1], tmp_path))
    assert "max_steps_per_epoch would be 1" in line and "started with 0" in line
    line = error_line(run_cli([*args, "--max-concurrent", 2], tmp_path))
    assert "--max-concurrent 2" in line and "runs 1 trial(s) at once" in line
    other = tmp_path / "other_data"
    shutil.copytree(cnn_search["data"], other)
    moved = [other if a == cnn_search["data"] else a for a in args]
    assert "--data-dir" in error_line(run_cli(moved, tmp_path))

    before = read_trials(cnn_search["out"])
    ok(run_cli(args, tmp_path))  # no --search-space, --num-samples or --max-epochs
    after = read_trials(tmp_path / "artifacts" / "search" / "cnn")
    assert [(r["trial_id"], r["status"], r["epochs"]) for r in after] == [
        (r["trial_id"], r["status"], r["epochs"]) for r in before
    ]


def test_resume_without_an_experiment_is_a_usage_error(tiny_data, tmp_path):
    space = write_space(tmp_path / "space.yaml", CNN_SPACE)
    args = [*search_args(tiny_data, space, tmp_path, name="never_ran"), "--resume"]
    proc = run_cli(args, tmp_path, timeout=60)
    line = error_line(proc)
    assert "--resume" in line and "never_ran" in line
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "artifacts").exists()  # the lock's folders are not left behind


def test_resume_refuses_an_explicit_val_fraction_equal_to_the_default(tmp_path):
    """0.2 given on the command line is a request like any other: refused when the search was
    started with 0.3 (it was taken for "not given" while it was the flag's default)."""
    spec = load_search_spec(default_space("cnn", smoke=True))
    save_spec(spec, 0.3, RunConfig(), tmp_path, 1, tmp_path / "search_spec.json")
    argv = ["cnn", "--resume", "--val-fraction", "0.2"]
    with pytest.raises(UserError, match=r"--val-fraction 0.2: .* started with 0.3"):
        resumed_spec(build_parser().parse_args(argv), spec, tmp_path / "search_spec.json")
    args = build_parser().parse_args(["cnn", "--resume"])  # not given: the saved fraction
    assert resumed_spec(args, spec, tmp_path / "search_spec.json")[1] == 0.3
    with pytest.raises(SystemExit):  # contradictory: argparse refuses the pair
        build_parser().parse_args(["cnn", "--resume", "--overwrite"])


def test_resume_refuses_a_search_space_that_changes_a_flags_key(tmp_path):
    """A YAML that raised num_samples (a key that also has a flag) was resumed with the old
    number and no word; --split-seed 0 on a search started with seed 0 was accepted by the
    spec check and then refused by the config check ("would be 0, but ... None")."""
    shipped = default_space("cnn", smoke=True)
    spec = load_search_spec(shipped)
    saved = tmp_path / "search_spec.json"
    base = base_config(spec, get_spec("cnn"))
    save_spec(spec, 0.2, base, tmp_path, 1, saved)
    text = shipped.read_text(encoding="utf-8")
    more = re.sub(r"(?m)^num_samples: \d+", f"num_samples: {spec.num_samples + 5}", text)
    edited = write_space(tmp_path / "more.yaml", more)
    args = build_parser().parse_args(["cnn", "--resume", "--search-space", str(edited)])
    with pytest.raises(UserError, match=rf"num_samples differs .* \({spec.num_samples + 5}, not"):
        resumed_spec(args, load_search_spec(edited), saved)
    args = build_parser().parse_args(["cnn", "--resume", "--search-space", str(shipped)])
    assert resumed_spec(args, spec, saved)[0] == spec  # the same file: no change
    args = build_parser().parse_args(["cnn", "--resume", "--split-seed", str(spec.seed)])
    was, _ = resumed_spec(args, spec, saved)
    again = config_from_args(args, base_config(was, get_spec("cnn")))
    assert check_resumed_run(args, again, tmp_path, saved) == 1
    args = build_parser().parse_args(["cnn", "--resume", "--split-seed", str(spec.seed + 1)])
    with pytest.raises(UserError, match=rf"--split-seed {spec.seed + 1}: .* started with 0;"):
        resumed_spec(args, spec, saved)


def test_resume_needs_none_of_the_config_flags_it_was_started_with(tmp_path):
    """A search started with --max-steps-per-epoch 1 and resumed with no flags was refused:
    its config was rebuilt from the YAML (6), not from the one it was started with."""
    spec = load_search_spec(default_space("cnn", smoke=True))
    saved = tmp_path / "search_spec.json"
    start = base_config(spec, get_spec("cnn"))
    save_spec(spec, 0.2, start.replace(max_steps_per_epoch=1), tmp_path, 1, saved)
    for extra, refused in (([], False), (["--max-steps-per-epoch", "2"], True)):
        args = build_parser().parse_args(["cnn", "--resume", *extra])
        base = config_from_args(args, resumed_base(read_json(saved), start, saved))
        if refused:
            with pytest.raises(UserError, match=r"max_steps_per_epoch would be 2, .* with 1;"):
                check_resumed_run(args, base, tmp_path, saved)
        else:
            assert base.max_steps_per_epoch == 1 and check_resumed_run(args, base, tmp_path, saved)


def test_resume_goes_on_with_the_data_dir_it_was_started_on(tiny_data, tmp_path, monkeypatch):
    """A search of --data-dir X resumed without the flag tried to prepare (download) the
    default data dir; now it reads X from search_spec.json, and --resume gets as far as Ray."""
    from tune_pets.search import main

    monkeypatch.chdir(tmp_path)  # no data/oxford_pets here
    spec = load_search_spec(default_space("cnn"))
    layout = Layout(tmp_path / "A")
    base = base_config(spec, get_spec("cnn"))
    save_spec(spec, 0.2, base, tiny_data, 1, layout.search_spec("cnn"))
    argv = ["cnn", "--resume", "--artifacts-dir", str(layout.artifacts)]
    with pytest.raises(UserError, match=r"^--resume: no experiment named 'cnn'"):
        main([*argv, "--storage-path", str(tmp_path / "ray")])
    assert not (tmp_path / "data").exists()


def test_resume_into_another_artifacts_dir_is_refused(tiny_data, tmp_path):
    """A search started with --artifacts-dir A and a shared --storage-path, resumed with
    --artifacts-dir B: B has no search_spec.json, so no flag could be checked against the ones
    the search was started with."""
    from tune_pets.search import main

    storage = tmp_path / "ray"
    (storage / "cnn").mkdir(parents=True)
    (storage / "cnn" / "experiment_state-2026-01-01_00-00-00.json").write_text("{}")
    argv = ["cnn", "--resume", "--data-dir", str(tiny_data), "--storage-path", str(storage)]
    with pytest.raises(UserError, match=r"started with another --artifacts-dir"):
        main([*argv, "--artifacts-dir", str(tmp_path / "B")])
    assert not (tmp_path / "B").exists()


# ---------------------------------------------------------------- failing trials
@pytest.mark.slow
def test_a_diverging_trial_fails_alone(tiny_data, tmp_path):
    text = DIVERGING_SPACE.format(batch_size=8, lrs="[1.0e-2, 10.0]")
    args = search_args(
        tiny_data,
        write_space(tmp_path / "space.yaml", text),
        tmp_path,
        num_samples=4,
        max_epochs=3,
        grace_period=3,
        max_concurrent=2,
        num_cpus=2,
    )
    proc = ok(run_cli(args, tmp_path))
    out = tmp_path / "artifacts" / "search" / "cnn"
    rows = read_trials(out)
    assert len(rows) == 4
    failed = [r for r in rows if r["status"] == "failed"]
    assert failed, rows
    for r in failed:
        assert float(r["lr"]) == 10.0
        assert "NonFiniteLossError" in r["error"] and "loss" in r["error"]
    assert all(r["status"] == "completed" for r in rows if float(r["lr"]) == 1.0e-2)
    best = read_best(out)
    winner = next(r for r in rows if r["trial_id"] == best.trial_id)
    assert winner["status"] != "failed" and best.config["lr"] == 1.0e-2
    assert f"{len(failed)} failed" in proc.stdout
    # grace_period 3 = max_epochs 3: ASHA can stop nothing, and the search says so once.
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning: grace_period")]
    assert warnings == [asha_warning(_spec(grace_period=3, max_epochs=3))]


@pytest.mark.slow
@pytest.mark.parametrize(
    "batch_size",
    [
        4,  # NaN in epoch 1: the trials report nothing
        8,  # NaN in epoch 2: each trial reported epoch 1
    ],
)
def test_all_trials_failing_is_an_error(tiny_data, tmp_path, batch_size):
    text = DIVERGING_SPACE.format(batch_size=batch_size, lrs="[9.0, 10.0]")
    args = search_args(
        tiny_data,
        write_space(tmp_path / "space.yaml", text),
        tmp_path,
        num_samples=2,
        max_epochs=2,
        grace_period=2,
        max_concurrent=2,
        num_cpus=2,
    )
    out = tmp_path / "artifacts" / "search" / "cnn"
    if batch_size == 8:  # over an earlier search's results: reproduce must not find them after
        out.mkdir(parents=True)
        for name in ("best_config.json", "learning_curves.png"):
            (out / name).write_text("the earlier search's")
        args.append("--overwrite")
    line = error_line(run_cli(args, tmp_path))
    assert "all 2 trials failed" in line and "NonFiniteLossError" in line
    assert not (out / "best_config.json").exists()
    assert not (out / "learning_curves.png").exists()
    rows = read_trials(out)
    assert [r["status"] for r in rows] == ["failed", "failed"]
    reported = 0 if batch_size == 4 else 1
    assert [r["epochs"] for r in rows] == [str(reported)] * 2, rows
    # Trials that never reported are still named by their Ray trial id, with their params.
    exp = tmp_path / "artifacts" / "ray_results" / "cnn"
    assert {f"trial_{r['trial_id']}" for r in rows} == {p.name for p in trial_dirs(exp)}
    assert {float(r["lr"]) for r in rows} == {9.0, 10.0}


# ---------------------------------------------------------------- kill and resume
def _snapshot_status(exp: Path) -> dict[str, str] | None:
    """{trial_id: status} from Ray's last experiment snapshot in ``exp`` (what --resume
    restores from), or None while there is none or it is being rewritten."""
    files = sorted(exp.glob("experiment_state-*.json"))
    try:
        data = json.loads(files[-1].read_text())
        return {json.loads(t)["trial_id"]: json.loads(t)["status"] for t, _ in data["trial_data"]}
    except (IndexError, OSError, ValueError, KeyError, TypeError):
        return None


def _stale_snapshot(exp: Path) -> bool:
    """True in the worst moment to crash, which recurs at every trial switch: with one trial
    at a time, a new trial has started (so the previous one has finished and the searcher was
    told so) but Ray's last experiment snapshot still lists an earlier trial as unfinished."""
    dirs = {d.name.removeprefix("trial_") for d in trial_dirs(exp)}
    if len(dirs) < 2:
        return False
    snap = _snapshot_status(exp)
    return bool(snap and dirs - set(snap) and any(s != "TERMINATED" for s in snap.values()))


@pytest.mark.slow
def test_resume_after_the_driver_is_killed(tiny_data, tmp_path):
    """SIGKILL the whole search (driver and its Ray) after a trial finished and the next one
    started, before Ray saved its experiment snapshot again; --resume must then finish exactly
    num_samples trials, leave no stray trial behind, and print like a fresh search. Progress is
    on, so Ray's own reporting path is what is checked."""
    n, epochs = 8, 3
    space = write_space(tmp_path / "space.yaml", CNN_SPACE)
    args = search_args(
        tiny_data,
        space,
        tmp_path,
        progress=True,
        num_samples=n,
        max_epochs=epochs,
        grace_period=epochs,
        max_concurrent=1,
        num_cpus=2,
    )
    exp = tmp_path / "artifacts" / "ray_results" / "cnn"
    out = tmp_path / "artifacts" / "search" / "cnn"
    log = tmp_path / "first.log"
    # Tune snapshots the experiment at its first step (trial 1 pending) and then every 10 s or
    # more ("auto"): a search of 8 short trials may take its second snapshot in the step where
    # a trial ended, before the next one exists, and end before a third (a CI-like run under
    # load did). With the period at an hour the step-1 snapshot stays the last one until the
    # search ends, so the moment comes with trial 2, on any machine.
    proc = start_cli(args, tmp_path, {"TUNE_GLOBAL_CHECKPOINT_S": "3600"}, log=log)
    try:
        deadline = time.monotonic() + 180
        while proc.poll() is None and time.monotonic() < deadline:
            if exp.is_dir() and _stale_snapshot(exp):
                break
            time.sleep(0.002)
        ended = "the search ended before the moment to kill it came: "
        assert proc.poll() is None, ended + log.read_text()[-2000:]
        assert time.monotonic() < deadline, "no trial finished within 180 s"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        leftover = leftovers(proc.pid)
    assert not leftover, f"Ray processes of the killed search survived: {leftover}"
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "trials.csv").exists()
    # optuna.db followed the running search: it holds the trials finished before the kill
    # (each is written before its line is printed: the kill may fall between the two).
    finished = [ln for ln in log.read_text().splitlines() if TRIAL_LINE.match(ln)]
    assert finished and len(study_trials(out / "optuna.db")) in (len(finished), len(finished) + 1)

    # A plain re-run is refused and says how to continue.
    assert "--resume" in error_line(run_cli(args, tmp_path, timeout=60))

    resumed = ok(run_cli([*args, "--resume"], tmp_path))
    assert "resuming 'cnn'" in resumed.stdout
    # A trial finished before the kill is still "running" in Ray's stale snapshot: it is
    # restarted, reports its epochs again and ends; it once trained again from epoch 1 (a
    # second TensorBoard event file, the whole curve twice).
    for line in finished:
        events = list((tmp_path / "runs/search/cnn" / TRIAL_LINE.match(line)[1]).iterdir())
        assert len(events) == 1, f"{line}: trained again after --resume"
    rows = read_trials(out)
    assert len(rows) == n and len({r["trial_id"] for r in rows}) == n
    assert all(r["status"] == "completed" for r in rows), rows
    assert len(trial_dirs(exp)) == n, "trials started before the kill were left behind"
    tb = sorted(p.name for p in (tmp_path / "runs" / "search" / "cnn").iterdir())
    assert tb == sorted(r["trial_id"] for r in rows), "a killed trial's TensorBoard logs stayed"
    assert len(study_trials(out / "optuna.db")) == n and read_best(out).search["num_trials"] == n
    # Resumed, the search prints what a fresh one prints, and nothing of Ray's.
    for text in (log.read_text(), resumed.stdout):
        assert any(TRIAL_LINE.match(ln) for ln in text.splitlines()), text[-2000:]
        assert not foreign_lines(text), foreign_lines(text)


# ---------------------------------------------------------------- a two-node cluster
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_start(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    ray = Path(sys.executable).with_name("ray")
    ray = str(ray) if ray.exists() else "ray"
    if "--head" in args:  # with RAY_AUTH_MODE=token, `ray start` only reads ~/.ray/auth_token
        gen = [ray, "get-auth-token", "--generate"]
        subprocess.run(gen, env=env, check=True, capture_output=True, timeout=120)
    cmd = [
        ray,
        "start",
        "--block",
        "--disable-usage-stats",
        "--node-ip-address",
        "127.0.0.1",
        "--num-cpus",
        "1",
        *args,
    ]
    with open(log, "w") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def _wait_for_line(proc: subprocess.Popen, log: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"`ray start` did not print {text!r}:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory):
    """A head and a worker node, 1 CPU each, started with ``ray start --block`` in their own
    sessions (a short --temp-dir: Ray's socket paths must stay under 108 bytes). Torn down by
    killing those two sessions only. Its HOME is a temp folder: ``ray start --head`` writes
    its token to ~/.ray/auth_token, and the searches find it there."""
    logs = tmp_path_factory.mktemp("cluster_logs")
    home = tmp_path_factory.mktemp("cluster_home")
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    port = _free_port()
    env = helpers.env(RAY_AUTH_MODE="token", HOME=str(home))  # `ray start --head`: token auth
    procs: list[subprocess.Popen] = []
    head = ["--head", "--port", str(port), "--include-dashboard=false", "--temp-dir", temp]
    try:
        procs.append(_ray_start(head, logs / "head.log", env))
        _wait_for_line(procs[0], logs / "head.log", "Ray runtime started", 90)
        procs.append(_ray_start(["--address", f"127.0.0.1:{port}"], logs / "worker.log", env))
        _wait_for_line(procs[1], logs / "worker.log", "Ray runtime started", 90)
        status_cmd = [str(Path(sys.executable).with_name("ray")), "status", "--address"]
        deadline = time.monotonic() + 60
        while True:  # the worker's raylet registers with the GCS shortly after it starts
            status = subprocess.run(
                [*status_cmd, f"127.0.0.1:{port}"],
                capture_output=True,
                text=True,
                env=env,
                timeout=60,
            )
            nodes = [ln for ln in status.stdout.splitlines() if ln.strip().startswith("1 node_")]
            if len(nodes) >= 2:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"cluster has {len(nodes)} node(s):\n{status.stdout}{status.stderr}")
            time.sleep(1)
        yield {"address": f"127.0.0.1:{port}", "logs": logs, "home": str(home)}
    finally:
        for p in reversed(procs):  # SIGTERM drains for up to 30 s; the cluster is ours: kill
            kill_session(p.pid, signal.SIGKILL)
        leftover = [pid for p in procs for pid in session_pids(p.pid)]
        shutil.rmtree(temp, ignore_errors=True)
        assert not leftover, f"cluster processes survived teardown: {leftover}"


def cluster_args(data: Path, root: Path, address: str, n: int, name: str) -> list:
    space = write_space(root / f"{name}.yaml", CNN_SPACE)
    return search_args(
        data,
        space,
        root,
        name=name,
        address=address,
        num_samples=n,
        storage_path=root / "ray_results",
        max_epochs=2,
        grace_period=1,
        max_concurrent=2,
        cpus_per_trial=1,
    )


@pytest.mark.slow
def test_search_on_a_two_node_cluster(two_node_cluster, tiny_data, tmp_path):
    args = cluster_args(tiny_data, tmp_path, two_node_cluster["address"], 4, "two_nodes")
    ok(run_cli(args, tmp_path, {"RAY_AUTH_MODE": "token", "HOME": two_node_cluster["home"]}))
    out = tmp_path / "artifacts" / "search" / "two_nodes"
    rows = read_trials(out)
    assert len(rows) == 4 and all(r["status"] != "failed" for r in rows)
    nodes = {r["node"] for r in rows}
    assert len(nodes) == 2 and "" not in nodes
    assert {r["host"] for r in rows} == {socket.gethostname()}  # both nodes are this machine
    assert sorted(read_best(out).search["nodes"]) == sorted(nodes)
    # --storage-path is where Ray wrote the trials, not <artifacts>/ray_results.
    assert len(trial_dirs(tmp_path / "ray_results" / "two_nodes")) == 4
    assert not (tmp_path / "artifacts" / "ray_results").exists()


@pytest.mark.slow
def test_cluster_search_sets_token_auth_itself(two_node_cluster, tiny_data, tmp_path):
    home = two_node_cluster["home"]
    assert (Path(home) / ".ray" / "auth_token").is_file()
    args = cluster_args(tiny_data, tmp_path, two_node_cluster["address"], 2, "no_env_token")
    ok(run_cli(args, tmp_path, {"HOME": home}))  # no RAY_AUTH_MODE set (helpers.env drops it)


@pytest.mark.slow
def test_without_address_a_search_starts_its_own_ray_beside_a_cluster(
    two_node_cluster, tiny_data, tmp_path
):
    """RAY_ADDRESS set (as in a Ray job), or a cluster that ray start left on this machine:
    ray.init() joined it and refused the local Ray's settings, a ValueError traceback. Without
    --address the search starts a Ray of its own, as documented; --address auto joins it."""
    cluster = {"RAY_ADDRESS": two_node_cluster["address"], "HOME": two_node_cluster["home"]}
    space = write_space(tmp_path / "space.yaml", CNN_SPACE)
    for name, flags, cpus in (("local", {"num_cpus": 1}, 1), ("auto", {"address": "auto"}, 2)):
        args = search_args(tiny_data, space, tmp_path, name=name, num_samples=2, **flags)
        out = ok(run_cli([*args, "--max-epochs", 1, "--grace-period", 1], tmp_path, cluster))
        assert f"cluster: {cpus} CPU, 0 GPU)" in out.stdout, out.stdout


@pytest.mark.slow
def test_a_long_tmpdir_is_one_line_naming_it(tiny_data, tmp_path):
    """Ray puts its socket files under $TMPDIR (often a long scratch path on HPC nodes); past
    the 107-byte limit of a socket path ray.init raised an OSError traceback."""
    long = tmp_path / ("scratch_of_a_batch_job_" * 2)
    long.mkdir()
    args = search_args(tiny_data, write_space(tmp_path / "space.yaml", CNN_SPACE), tmp_path)
    line = error_line(run_cli(args, tmp_path, {"TMPDIR": str(long)}, timeout=120))
    assert f"TMPDIR={long}: too long" in line and "RAY_TMPDIR=/tmp" in line, line
    assert not (tmp_path / "artifacts" / "search").exists()


@pytest.mark.slow
def test_a_local_ray_has_the_cpus_the_search_may_run_on(tiny_data, tmp_path):
    """Under a CPU affinity (a Slurm job's or a container's cpuset; here the test's own, which
    the command inherits) Ray counted every core of the machine and ran more trials at once
    than there were CPUs to run them."""
    cpus = os.sched_getaffinity(0)
    if len(cpus) < 2:
        pytest.skip("needs 2 CPUs to leave one out")
    space = write_space(tmp_path / "space.yaml", CNN_SPACE)
    args = search_args(tiny_data, space, tmp_path, num_samples=2, max_epochs=1, grace_period=1)
    os.sched_setaffinity(0, {min(cpus)})
    try:
        out = ok(run_cli(args, tmp_path))
    finally:
        os.sched_setaffinity(0, cpus)
    assert "up to 1 trial(s) at once" in out.stdout and "cluster: 1 CPU, 0 GPU)" in out.stdout


# ---------------------------------------------------------------- usage errors
# Each loader error, in process: test_config's BAD_SPECS. Here: the CLI says it in one line and
# writes nothing, for a check of the space and for a YAML syntax error (PyYAML's is multi-line).
BAD_SPACES = {
    "unknown_sampler": (
        "model: cnn\nspace:\n  lr: {lognormal: [1.0e-4, 1.0e-2]}\n",
        ["space.lr", "lognormal"],
    ),
    "yaml_syntax_error": (
        "model: cnn\nspace:\n  lr: {loguniform: [1.0e-4, 1.0e-2]\n"
        "  dropout: {uniform: [0.0, 0.5]}\n",
        ["YAML syntax error", "line"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SPACES))
def test_bad_search_space_yaml_is_one_line_error(case, tiny_data, tmp_path):
    text, must_mention = BAD_SPACES[case]
    space = write_space(tmp_path / f"bad {case}.yaml", text)  # a space in the path, too
    proc = run_cli(search_args(tiny_data, space, tmp_path / "a"), tmp_path, timeout=60)
    line = error_line(proc)
    assert proc.stderr.strip() == line, "expected exactly one line on stderr"
    assert str(space) in line
    for word in must_mention:
        assert word in line, f"{word!r} not in: {line}"
    assert not (tmp_path / "a").exists(), "nothing may be written for a bad YAML"


def test_search_space_for_another_model_is_refused(tiny_data, tmp_path):
    space = REPO / "search_spaces" / "vit.yaml"
    line = error_line(run_cli(search_args(tiny_data, space, tmp_path), tmp_path, timeout=60))
    assert "vit.yaml" in line and "'vit'" in line and "'cnn'" in line


# ---------------------------------------------------------------- the ViT probe
@pytest.mark.slow
def test_vit_probe_search_smoke(tiny_data, tmp_path):
    """The shipped search_spaces/vit.yaml on a random-init backbone (no download)."""
    args = search_args(
        tiny_data,
        None,
        tmp_path,
        model="vit",
        num_samples=3,
        max_epochs=2,
        grace_period=1,
        num_cpus=2,
    )
    proc = ok(run_cli([*args, "--no-pretrained"], tmp_path))
    out = tmp_path / "artifacts" / "search" / "vit"
    best = read_best(out)
    config = RunConfig.from_dict(best.config, "best_config.json")
    assert best.model == "vit" and config.model == "vit"
    assert config.pooling in ("cls", "mean", "both") and config.pretrained is False
    assert config.feature_views == 0 and config.scheduler == "cosine"  # vit.yaml `fixed`
    rows = read_trials(out)
    assert len(rows) == 3 and {"pooling", "optimizer", "lr"} <= set(rows[0])
    assert all(r["status"] in set(STATUSES) - {"failed"} for r in rows)
    assert math.isfinite(best.val_acc) and "best trial" in proc.stdout
    # The frozen backbone ran once, into the feature cache, not once per trial.
    assert any((tmp_path / "cache").rglob("*")), "no feature/image cache written"


def test_a_ctrl_c_once_ray_holds_the_experiment_names_the_resume_command(
    tmp_path, tiny_data, monkeypatch
):
    """A second Ctrl-C, or one while the results are written, said "run the same command again
    to start over"; that command is refused once Ray holds the experiment."""
    from tune_pets import search

    def stopped(*args, **kwargs):
        experiment = tmp_path / "art" / "ray_results" / "cnn"
        experiment.mkdir(parents=True)
        (experiment / "experiment_state-2026-12-07_07-00-00.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(search, "run_search", stopped)
    argv = ["cnn", "--data-dir", str(tiny_data), "--artifacts-dir", str(tmp_path / "art")]
    with pytest.raises(KeyboardInterrupt) as e:
        search.main([*argv, "--search-space", "smoke"])
    assert str(e.value).startswith("search stopped; resume it with: python -m tune_pets.search cnn")
    assert str(e.value).endswith(" --resume")
