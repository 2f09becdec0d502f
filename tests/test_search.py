"""The search CLI end to end: real Ray Tune, real Optuna (TPE + SQLite), real ASHA, real files.

    python -m pytest tests/test_search.py -x -q              # about 5 minutes on 2 CPU cores
    python -m pytest tests/test_search.py -m "not slow"      # usage errors only (seconds)

Every search runs ``python -m tune_pets.search`` in a subprocess, as a user would, on the tiny
ImageFolder from conftest (4 classes x 10 train x 4 test JPEGs) with a 2-block, width-8 CNN at
32 px. Each subprocess runs in its own session; whatever it leaves behind (Ray's gcs_server,
raylet, workers) is killed by session id afterwards, so no test touches Ray processes that
some other program on the machine started, and ``ray stop`` is never used.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from procs import kill_session, session_pids
from PIL import Image

from tune_pets.config import RunConfig

REPO = Path(__file__).resolve().parents[1]
STATUSES = {"completed", "stopped early", "failed"}
PLOTS = ("learning_curves.png", "optimization_history.png", "param_importances.png")
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


# ---------------------------------------------------------------- processes
def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS", "TUNE_PETS_DEBUG")}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
               RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1", **extra)
    return env


def start_cli(args: list, cwd: Path, env: dict | None = None, log: Path | None = None):
    """Start ``python -m tune_pets.search ARGS`` in a new session (so it can be killed whole);
    its output goes to pipes, or to the file ``log``."""
    cmd = [sys.executable, "-m", "tune_pets.search", *map(str, args)]
    if log is None:
        return subprocess.Popen(cmd, cwd=cwd, env=env or _env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env or _env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def run_cli(args: list, cwd: Path, env: dict | None = None,
            timeout: float = SEARCH_TIMEOUT_S) -> subprocess.CompletedProcess:
    proc = start_cli(args, cwd, env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"search timed out after {timeout}s\nstdout:\n{out[-3000:]}\n"
                    f"stderr:\n{err[-3000:]}")
    finally:
        leftover = kill_session(proc.pid)  # the driver's Ray normally exits with it
        assert not leftover, f"processes survived the search: {leftover}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                                  f"stderr:\n{proc.stderr[-6000:]}")
    return proc


def error_line(proc: subprocess.CompletedProcess) -> str:
    """Exit 2 and a one-line ``error:`` message as the last thing on stderr."""
    assert proc.returncode == 2, (f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                                  f"stderr:\n{proc.stderr[-3000:]}")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines, "no message on stderr"
    assert lines[-1].startswith("python -m tune_pets.search: error: "), proc.stderr[-3000:]
    return lines[-1]


def search_args(data: Path, space: Path, artifacts: Path, cache: Path, *extra) -> list:
    return ["cnn", "--data-dir", data, "--search-space", space, "--artifacts-dir", artifacts,
            "--cache-dir", cache, "--no-progress", *extra]


# ---------------------------------------------------------------- outputs
def read_trials(out_dir: Path) -> list[dict]:
    with (out_dir / "trials.csv").open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def trial_dirs(experiment: Path) -> list[Path]:
    return sorted(p for p in experiment.iterdir() if p.is_dir() and p.name.startswith("trial_"))


def write_space(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- one search, many checks
SEARCH_SAMPLES, SEARCH_EPOCHS = 6, 4


@pytest.fixture(scope="module")
def cnn_search(tiny_data, tmp_path_factory):
    """6 trials x up to 4 epochs, ASHA grace 1 / reduction 2, one trial at a time (so ASHA's
    decisions are sequential and the outcome is deterministic for a given seed)."""
    root = tmp_path_factory.mktemp("cnn_search")
    space = write_space(root / "space.yaml", CNN_SPACE)
    artifacts = root / "artifacts"
    args = search_args(tiny_data, space, artifacts, root / "cache", "--num-samples",
                       SEARCH_SAMPLES, "--max-epochs", SEARCH_EPOCHS, "--grace-period", 1,
                       "--max-concurrent", 1, "--num-cpus", 2)
    return {"proc": run_cli(args, root), "root": root, "data": tiny_data,
            "out": artifacts / "search" / "cnn", "exp": artifacts / "ray_results" / "cnn"}


@pytest.mark.slow
def test_search_writes_trials_csv_and_best_config(cnn_search):
    ok(cnn_search["proc"])
    out = cnn_search["out"]
    rows = read_trials(out)
    assert list(rows[0]) == ["trial_id", "status", "epochs", "lr", "dropout", "batch_size",
                             "best_val_acc", "best_epoch", "best_val_macro_f1", "time_s", "node",
                             "error"]
    assert len(rows) == SEARCH_SAMPLES
    assert len({r["trial_id"] for r in rows}) == SEARCH_SAMPLES
    for r in rows:
        assert r["status"] in STATUSES - {"failed"} and r["error"] == ""
        assert 1 <= int(r["epochs"]) <= SEARCH_EPOCHS
        assert 1 <= int(r["best_epoch"]) <= int(r["epochs"])
        assert 1.0e-4 <= float(r["lr"]) <= 3.0e-2 and 0.0 <= float(r["dropout"]) <= 0.5
        assert r["batch_size"] in ("8", "16")
        assert 0.0 <= float(r["best_val_acc"]) <= 1.0 and r["node"]
    assert len(trial_dirs(cnn_search["exp"])) == SEARCH_SAMPLES

    best = json.loads((out / "best_config.json").read_text())
    config = RunConfig.from_dict(best["config"], "best_config.json")
    assert best["model"] == "cnn" and config.model == "cnn"
    # YAML `fixed` and the budget made it into the config that `reproduce` will train.
    assert (config.img_size, config.width, config.depth) == (32, 8, 2)
    assert config.epochs == SEARCH_EPOCHS
    top = max(rows, key=lambda r: float(r["best_val_acc"]))
    assert best["val_acc"] == pytest.approx(float(top["best_val_acc"]))
    assert best["best_val_acc"] == pytest.approx(float(top["best_val_acc"]))
    winner = next(r for r in rows if r["trial_id"] == best["trial_id"])
    assert float(winner["best_val_acc"]) == pytest.approx(best["val_acc"])
    assert config.lr == pytest.approx(float(winner["lr"]))
    assert config.batch_size == int(winner["batch_size"])
    assert best["epoch"] == int(winner["best_epoch"])
    assert best["search"]["num_trials"] == SEARCH_SAMPLES

    # The kept checkpoint of the winner is its best epoch's (fit reports one only on a new best).
    import torch

    ckpt = torch.load(Path(best["checkpoint"]) / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == best["epoch"]
    assert ckpt["config"]["lr"] == pytest.approx(config.lr)
    assert ckpt["metrics"]["val_acc"] == pytest.approx(best["val_acc"])


@pytest.mark.slow
def test_first_trial_is_the_homework_default_and_study_is_saved(cnn_search):
    import optuna

    ok(cnn_search["proc"])
    db = cnn_search["out"] / "optuna.db"
    assert db.is_file()
    study = optuna.load_study(study_name="cnn", storage=f"sqlite:///{db}")
    trials = sorted(study.trials, key=lambda t: t.number)
    assert len(trials) == SEARCH_SAMPLES
    # Homework: lr 1e-3, dropout 0.2, batch 32 (snapped to the nearest choice, 16).
    assert trials[0].params == {"lr": pytest.approx(1e-3), "dropout": pytest.approx(0.2),
                                "batch_size": 16}
    assert len({tuple(sorted(t.params.items())) for t in trials}) == SEARCH_SAMPLES
    # ... and the same first point is the first row of trials.csv.
    first = read_trials(cnn_search["out"])[0]
    assert float(first["lr"]) == pytest.approx(1e-3) and float(first["dropout"]) == 0.2


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
def test_plots_are_real_pngs(cnn_search):
    ok(cnn_search["proc"])
    for name in PLOTS:
        with Image.open(cnn_search["out"] / name) as im:
            assert im.format == "PNG" and im.width > 100 and im.height > 100
            im.load()


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
    """Re-running a finished search refuses (exit 2, names --overwrite); --overwrite replaces
    the old trials. Works on a copy so the shared search stays intact."""
    ok(cnn_search["proc"])
    artifacts = tmp_path / "artifacts"
    shutil.copytree(cnn_search["exp"], artifacts / "ray_results" / "cnn")
    args = search_args(cnn_search["data"], cnn_search["root"] / "space.yaml", artifacts,
                       tmp_path / "cache", "--num-samples", 2, "--max-epochs", 1,
                       "--max-concurrent", 2, "--num-cpus", 2)
    line = error_line(run_cli(args, tmp_path))
    assert "--overwrite" in line and "--resume" in line and "cnn" in line

    ok(run_cli([*args, "--overwrite"], tmp_path))
    assert len(read_trials(artifacts / "search" / "cnn")) == 2
    assert len(trial_dirs(artifacts / "ray_results" / "cnn")) == 2


def test_resume_without_an_experiment_is_a_usage_error(tiny_data, tmp_path):
    space = write_space(tmp_path / "space.yaml", CNN_SPACE)
    proc = run_cli(search_args(tiny_data, space, tmp_path / "artifacts", tmp_path / "cache",
                               "--name", "never_ran", "--resume"), tmp_path, timeout=60)
    line = error_line(proc)
    assert "--resume" in line and "never_ran" in line
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- failing trials
@pytest.mark.slow
def test_a_diverging_trial_fails_alone(tiny_data, tmp_path):
    space = write_space(tmp_path / "space.yaml",
                        DIVERGING_SPACE.format(batch_size=8, lrs="[1.0e-2, 10.0]"))
    proc = ok(run_cli(search_args(tiny_data, space, tmp_path / "a", tmp_path / "cache",
                                  "--num-samples", 4, "--max-epochs", 3, "--grace-period", 3,
                                  "--max-concurrent", 2, "--num-cpus", 2), tmp_path))
    out = tmp_path / "a" / "search" / "cnn"
    rows = read_trials(out)
    assert len(rows) == 4
    failed = [r for r in rows if r["status"] == "failed"]
    assert failed, rows
    for r in failed:
        assert float(r["lr"]) == 10.0
        assert "NonFiniteLossError" in r["error"] and "loss" in r["error"]
    assert all(r["status"] == "completed" for r in rows if float(r["lr"]) == 1.0e-2)
    best = json.loads((out / "best_config.json").read_text())
    winner = next(r for r in rows if r["trial_id"] == best["trial_id"])
    assert winner["status"] != "failed" and best["config"]["lr"] == 1.0e-2
    assert f"{len(failed)} failed" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [
    4,  # NaN in epoch 1: the trials report nothing
    8,  # NaN in epoch 2: each trial reported epoch 1
])
def test_all_trials_failing_is_an_error(tiny_data, tmp_path, batch_size):
    space = write_space(tmp_path / "space.yaml",
                        DIVERGING_SPACE.format(batch_size=batch_size, lrs="[9.0, 10.0]"))
    proc = run_cli(search_args(tiny_data, space, tmp_path / "a", tmp_path / "cache",
                               "--num-samples", 2, "--max-epochs", 2, "--grace-period", 2,
                               "--max-concurrent", 2, "--num-cpus", 2), tmp_path)
    line = error_line(proc)
    assert "all 2 trials failed" in line and "NonFiniteLossError" in line
    assert not (tmp_path / "a" / "search" / "cnn" / "best_config.json").exists()
    rows = read_trials(tmp_path / "a" / "search" / "cnn")
    assert [r["status"] for r in rows] == ["failed", "failed"]


# ---------------------------------------------------------------- kill and resume
def _snapshot_status(exp: Path) -> dict[str, str] | None:
    """{trial_id: status} from Ray's last experiment snapshot in ``exp`` (what --resume
    restores from), or None while there is none or it is being rewritten."""
    files = sorted(exp.glob("experiment_state-*.json"))
    try:
        data = json.loads(files[-1].read_text())
        return {json.loads(t)["trial_id"]: json.loads(t)["status"]
                for t, _ in data["trial_data"]}
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
    num_samples trials and leave no stray trial behind."""
    n, epochs = 8, 3
    space = write_space(tmp_path / "space.yaml", CNN_SPACE)
    artifacts = tmp_path / "artifacts"
    args = search_args(tiny_data, space, artifacts, tmp_path / "cache", "--num-samples", n,
                       "--max-epochs", epochs, "--grace-period", epochs, "--max-concurrent", 1,
                       "--num-cpus", 2)
    exp = artifacts / "ray_results" / "cnn"
    log = tmp_path / "first.log"
    proc = start_cli(args, tmp_path, log=log)
    try:
        deadline = time.monotonic() + 180
        while proc.poll() is None and time.monotonic() < deadline:
            if exp.is_dir() and _stale_snapshot(exp):
                break
            time.sleep(0.002)  # the moment lasts ~20 ms: from a trial's first result to the
            # snapshot that this result forces (CheckpointConfig(num_to_keep=1))
        assert proc.poll() is None, "the search ended before the moment to kill it came: " + \
            log.read_text()[-2000:]
        assert time.monotonic() < deadline, "no trial finished within 180 s"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        leftover = kill_session(proc.pid)
    assert not leftover, f"Ray processes of the killed search survived: {leftover}"
    assert proc.returncode == -signal.SIGKILL
    assert not (artifacts / "search" / "cnn" / "trials.csv").exists()

    # A plain re-run is refused and says how to continue.
    assert "--resume" in error_line(run_cli(args, tmp_path, timeout=60))

    resumed = ok(run_cli([*args, "--resume"], tmp_path))
    assert "resuming 'cnn'" in resumed.stdout
    rows = read_trials(artifacts / "search" / "cnn")
    assert len(rows) == n and len({r["trial_id"] for r in rows}) == n
    assert all(r["status"] == "completed" for r in rows)
    assert len(trial_dirs(exp)) == n, "trials started before the kill were left behind"
    assert (artifacts / "search" / "cnn" / "best_config.json").is_file()


# ---------------------------------------------------------------- a two-node cluster
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_start(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    ray = Path(sys.executable).with_name("ray")
    cmd = [str(ray) if ray.exists() else "ray", "start", "--block", "--disable-usage-stats",
           "--node-ip-address", "127.0.0.1", "--num-cpus", "1", *args]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


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
    killing those two sessions only."""
    logs = tmp_path_factory.mktemp("cluster_logs")
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    port = _free_port()
    env = _env(RAY_AUTH_MODE="token")  # `ray start --head` turns token auth on
    procs: list[subprocess.Popen] = []
    try:
        procs.append(_ray_start(["--head", "--port", str(port), "--include-dashboard=false",
                                 "--temp-dir", temp], logs / "head.log", env))
        _wait_for_line(procs[0], logs / "head.log", "Ray runtime started", 90)
        procs.append(_ray_start(["--address", f"127.0.0.1:{port}"], logs / "worker.log", env))
        _wait_for_line(procs[1], logs / "worker.log", "Ray runtime started", 90)
        ray = Path(sys.executable).with_name("ray")
        deadline = time.monotonic() + 60
        while True:  # the worker's raylet registers with the GCS shortly after it starts
            status = subprocess.run([str(ray), "status", "--address", f"127.0.0.1:{port}"],
                                    capture_output=True, text=True, env=env, timeout=60)
            nodes = [ln for ln in status.stdout.splitlines() if ln.strip().startswith("1 node_")]
            if len(nodes) >= 2:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"cluster has {len(nodes)} node(s):\n{status.stdout}{status.stderr}")
            time.sleep(1)
        yield {"address": f"127.0.0.1:{port}", "logs": logs}
    finally:
        for p in reversed(procs):  # SIGTERM drains for up to 30 s; the cluster is ours: kill
            kill_session(p.pid, signal.SIGKILL)
        leftover = [pid for p in procs for pid in session_pids(p.pid)]
        shutil.rmtree(temp, ignore_errors=True)
        assert not leftover, f"cluster processes survived teardown: {leftover}"


def cluster_args(data: Path, root: Path, address: str, n: int, name: str) -> list:
    space = write_space(root / f"{name}.yaml", CNN_SPACE)
    return search_args(data, space, root / "artifacts", root / "cache", "--name", name,
                       "--address", address, "--storage-path", root / "ray_results",
                       "--num-samples", n, "--max-epochs", 2, "--grace-period", 2,
                       "--max-concurrent", 2, "--cpus-per-trial", 1)


@pytest.mark.slow
def test_search_on_a_two_node_cluster(two_node_cluster, tiny_data, tmp_path):
    args = cluster_args(tiny_data, tmp_path, two_node_cluster["address"], 4, "two_nodes")
    ok(run_cli(args, tmp_path, env=_env(RAY_AUTH_MODE="token")))
    rows = read_trials(tmp_path / "artifacts" / "search" / "two_nodes")
    assert len(rows) == 4 and all(r["status"] == "completed" for r in rows)
    nodes = {r["node"] for r in rows}
    assert len(nodes) == 2 and "" not in nodes
    best = json.loads((tmp_path / "artifacts" / "search" / "two_nodes" /
                       "best_config.json").read_text())
    assert sorted(best["search"]["nodes"]) == sorted(nodes)
    # --storage-path is where Ray wrote the trials, not <artifacts>/ray_results.
    assert len(trial_dirs(tmp_path / "ray_results" / "two_nodes")) == 4
    assert not (tmp_path / "artifacts" / "ray_results").exists()


@pytest.mark.slow
def test_cluster_search_sets_token_auth_itself(two_node_cluster, tiny_data, tmp_path):
    assert (Path.home() / ".ray" / "auth_token").is_file()
    args = cluster_args(tiny_data, tmp_path, two_node_cluster["address"], 2, "no_env_token")
    ok(run_cli(args, tmp_path, env=_env(), timeout=120))  # no RAY_AUTH_MODE in the env


# ---------------------------------------------------------------- usage errors
BAD_SPACES = {
    "unknown_top_level_key": ("model: cnn\nnum_trials: 5\nspace:\n"
                              "  lr: {loguniform: [1.0e-4, 1.0e-2]}\n", ["num_trials"]),
    "unknown_sampler": ("model: cnn\nspace:\n  lr: {lognormal: [1.0e-4, 1.0e-2]}\n",
                        ["space.lr", "lognormal"]),
    "low_not_below_high": ("model: cnn\nspace:\n  dropout: {uniform: [0.5, 0.1]}\n",
                           ["space.dropout", "low"]),
    "low_equals_high": ("model: cnn\nspace:\n  lr: {loguniform: [1.0e-3, 1.0e-3]}\n",
                        ["space.lr", "low"]),
    "non_numeric_bound": ("model: cnn\nspace:\n  lr: {loguniform: [tiny, 1.0e-2]}\n",
                          ["space.lr", "tiny"]),
    "space_key_not_a_config_field": ("model: cnn\nspace:\n"
                                     "  learning_rate: {loguniform: [1.0e-4, 1.0e-2]}\n",
                                     ["learning_rate"]),
    "value_out_of_config_range": ("model: cnn\nspace:\n  dropout: {uniform: [0.0, 1.5]}\n",
                                  ["space.dropout", "dropout"]),
    "fixed_key_not_a_config_field": ("model: cnn\nfixed: {colour: red}\nspace: {}\n",
                                     ["fixed.colour"]),
    "yaml_syntax_error": ("model: cnn\nspace:\n  lr: {loguniform: [1.0e-4, 1.0e-2]\n"
                          "  dropout: {uniform: [0.0, 0.5]}\n", ["YAML syntax error", "line"]),
}


@pytest.mark.parametrize("case", sorted(BAD_SPACES))
def test_bad_search_space_yaml_is_one_line_error(case, tiny_data, tmp_path):
    text, must_mention = BAD_SPACES[case]
    space = write_space(tmp_path / f"bad {case}.yaml", text)  # a space in the path, too
    proc = run_cli(search_args(tiny_data, space, tmp_path / "a", tmp_path / "cache"),
                   tmp_path, timeout=60)
    line = error_line(proc)
    assert proc.stderr.strip() == line, "expected exactly one line on stderr"
    assert str(space) in line
    for word in must_mention:
        assert word in line, f"{word!r} not in: {line}"
    assert not (tmp_path / "a").exists(), "nothing may be written for a bad YAML"


def test_search_space_for_another_model_is_refused(tiny_data, tmp_path):
    proc = run_cli(search_args(tiny_data, REPO / "search_spaces" / "vit.yaml", tmp_path / "a",
                               tmp_path / "cache"), tmp_path, timeout=60)
    line = error_line(proc)
    assert "vit.yaml" in line and "'vit'" in line and "'cnn'" in line


@pytest.mark.slow
def test_gpus_per_trial_without_gpus_is_refused(tiny_data, tmp_path):
    space = write_space(tmp_path / "space.yaml", CNN_SPACE)
    proc = run_cli(search_args(tiny_data, space, tmp_path / "a", tmp_path / "cache",
                               "--num-samples", 2, "--max-epochs", 1, "--gpus-per-trial", 1,
                               "--num-cpus", 2), tmp_path, timeout=120)
    line = error_line(proc)
    assert "--gpus-per-trial" in line and "GPU" in line
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "a" / "ray_results" / "cnn").exists()


@pytest.mark.slow
def test_address_without_a_cluster_fails_fast(tiny_data, tmp_path):
    space = write_space(tmp_path / "space.yaml", CNN_SPACE)
    t0 = time.monotonic()
    proc = run_cli(search_args(tiny_data, space, tmp_path / "a", tmp_path / "cache",
                               "--address", "127.0.0.1:1"), tmp_path, timeout=60)
    line = error_line(proc)
    assert "--address 127.0.0.1:1" in line
    assert time.monotonic() - t0 < 45


# ---------------------------------------------------------------- the ViT probe
@pytest.mark.slow
def test_vit_probe_search_smoke(tiny_data, tmp_path):
    """The shipped search_spaces/vit.yaml on a random-init backbone (no download)."""
    proc = ok(run_cli(["vit", "--no-pretrained", "--data-dir", tiny_data, "--num-samples", 3,
                       "--max-epochs", 2, "--grace-period", 1, "--num-cpus", 2,
                       "--artifacts-dir", tmp_path / "a", "--cache-dir", tmp_path / "cache",
                       "--no-progress"], tmp_path))
    out = tmp_path / "a" / "search" / "vit"
    best = json.loads((out / "best_config.json").read_text())
    config = RunConfig.from_dict(best["config"], "best_config.json")
    assert best["model"] == "vit" and config.model == "vit_probe"
    assert config.pooling in ("cls", "mean", "both") and config.pretrained is False
    assert config.feature_views == 0 and config.scheduler == "cosine"  # vit.yaml `fixed`
    rows = read_trials(out)
    assert len(rows) == 3 and {"pooling", "optimizer", "lr"} <= set(rows[0])
    assert all(r["status"] in STATUSES - {"failed"} for r in rows)
    assert math.isfinite(best["val_acc"]) and "best trial" in proc.stdout
    # The frozen backbone ran once, into the feature cache, not once per trial.
    assert any((tmp_path / "cache").rglob("*")), "no feature/image cache written"
