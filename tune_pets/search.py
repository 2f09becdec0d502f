"""Hyperparameter search: Ray Tune trials of ``train.fit``, Optuna TPE + ASHA early stopping.

    python -m tune_pets.search cnn --data-dir data/oxford_pets
    python -m tune_pets.search vit --no-pretrained --num-samples 8 --max-epochs 5
    python -m tune_pets.search cnn --gpus-per-trial 0.25                               # 4 per GPU
    python -m tune_pets.search cnn --address auto --storage-path /shared/ray_results   # cluster
    python -m tune_pets.search cnn --resume                                            # continue

The search sees only the train split, carved once into train/val by a seeded stratified split
(``split_seed``) that every trial shares (saved as ``val_split.json``). The data is decoded once
and reaches the trials through the Ray object store; the ViT probe's frozen backbone runs once
into a feature cache and trials train only the head. Every trial writes TensorBoard logs under
``<runs-dir>/search/<name>/<trial_id>/`` as it runs, and ``optuna.db`` is rewritten after every
finished trial. This is the only module that imports Ray; ``search_results`` writes the files.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import functools
import logging
import math
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tune_pets import cli
from tune_pets.config import RunConfig, validate_config
from tune_pets.engine import FitData, load_fit_data
from tune_pets.layout import DEFAULT_DATA_DIR, Layout
from tune_pets.models import ModelSpec, get_spec
from tune_pets.records import SearchSummary
from tune_pets.search_results import (
    TrialRecord,
    add_report,
    error_line,
    export_study,
    make_record,
    make_summary,
    optuna_distributions,
    pick_best,
    status_counts,
    trial_line,
    write_plots,
    write_trials_csv,
)
from tune_pets.spaces import PICK_RULES, SearchSpec, default_space, load_search_spec
from tune_pets.utils import UserError, atomic_path, cli_main, env_info

PROG = "python -m tune_pets.search"
# The GPU share of one trial when the cluster has GPUs and nothing else is asked for
# (``resources: auto``), by model kind. An images trial (the CNN on augmented batches) leaves
# room for four on one GPU; a features trial (a ViT-probe head) finishes in seconds, so packing
# more of them buys little and would leave TPE fewer finished trials to learn from: two per GPU.
DEFAULT_GPU_FRACTION = {"images": 0.25, "features": 0.5}
STATUS_EVERY_S = 30  # one status line this often while trials run (with progress on)
# A trial whose process dies (node lost, OOM-killed, SIGKILL) is restarted from its last
# checkpoint this many times, then recorded as failed. A trial's own errors are never retried.
MAX_TRIAL_RESTARTS = 2
# optuna.db is rewritten after each of the first EXPORT_EVERY_TRIAL_UP_TO finished trials; then
# each rewrite waits EXPORT_SPACING times as long as the last one took (<= ~10 % of the time).
EXPORT_EVERY_TRIAL_UP_TO, EXPORT_SPACING = 20, 9.0
TRIAL_ERROR = "trial_error"  # the key of the last result of a trial that failed in its own code
# Each trial's own files in its folder under --storage-path (<storage>/<name>/trial_<id>/):
# its best weights, and its whole training state after its last epoch (while it runs).
BEST_CHECKPOINT_FILE, TRAIN_STATE_FILE = "checkpoint_best.pt", "train_state.pt"


# ---------------------------------------------------------------- resources
@dataclass(frozen=True)
class ResourceRequest:
    """Per-trial resources as asked for; None: not asked (``resources: auto``, no flag)."""

    cpu: float | None = None
    gpu: float | None = None
    max_concurrent: int | None = None  # --max-concurrent
    yaml_max_concurrent: int = 2  # the YAML's max_concurrent
    # A GPU share fixed in the YAML keeps the YAML's max_concurrent; from auto or a flag, the
    # trials fill the GPUs.
    fill_gpus: bool = True
    cpu_option: str = "--cpus-per-trial"  # where each value came from, for messages
    gpu_option: str = "--gpus-per-trial"


@dataclass(frozen=True)
class TrialResources:
    """What each trial gets and how many run at once."""

    cpu: float
    gpu: float
    max_concurrent: int
    why: str  # where max_concurrent came from

    def line(self, cluster: Mapping[str, float]) -> str:
        per_trial = f"{self.cpu:g} CPU" + (f" + {self.gpu:g} GPU" if self.gpu else "")
        return (
            f"resources: {per_trial} per trial, up to {self.max_concurrent} trial(s) at once "
            f"({self.why}; cluster: {cluster.get('CPU', 0):g} CPU, {cluster.get('GPU', 0):g} GPU)"
        )


def resource_request(spec: SearchSpec, args: argparse.Namespace | None = None) -> ResourceRequest:
    """The YAML's ``resources`` (``auto`` or ``{cpu, gpu}``) with the flags in ``args``
    (``--cpus-per-trial``, ``--gpus-per-trial``, ``--max-concurrent``) over it."""
    yaml = spec.resources if isinstance(spec.resources, Mapping) else {}
    cpu, gpu = getattr(args, "cpus_per_trial", None), getattr(args, "gpus_per_trial", None)
    where = f"{spec.source}: resources"
    return ResourceRequest(
        cpu=float(yaml["cpu"]) if cpu is None and "cpu" in yaml else cpu,
        gpu=float(yaml["gpu"]) if gpu is None and "gpu" in yaml else gpu,
        max_concurrent=getattr(args, "max_concurrent", None),
        yaml_max_concurrent=spec.max_concurrent,
        fill_gpus=gpu is not None or "gpu" not in yaml,
        cpu_option="--cpus-per-trial" if cpu is not None or "cpu" not in yaml else f"{where}.cpu",
        gpu_option="--gpus-per-trial" if gpu is not None or "gpu" not in yaml else f"{where}.gpu",
    )


def choose_resources(
    request: ResourceRequest, cluster: Mapping[str, float], kind: str
) -> TrialResources:
    """Per-trial CPUs/GPUs and concurrency for a cluster whose resources are ``cluster`` (as
    ``ray.cluster_resources()`` gives them, e.g. ``{"CPU": 16, "GPU": 2}``).

    With GPUs and no GPU share asked for, a trial gets ``DEFAULT_GPU_FRACTION[kind]``; a share
    from auto or ``--gpus-per-trial`` fills the GPUs (GPUs / share trials, capped by CPUs /
    cpu-per-trial) unless ``--max-concurrent`` says otherwise. Without GPUs, or with a share
    fixed in the YAML, the YAML's ``max_concurrent`` applies. Asking for more than the cluster
    has is an error, not a search that waits forever."""
    have_cpu, have_gpu = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    cpu = 1.0 if request.cpu is None else request.cpu
    if cpu > have_cpu:
        raise UserError(
            f"{request.cpu_option} {cpu:g}: the Ray cluster has only {have_cpu:g} CPU(s); "
            f"lower --cpus-per-trial"
        )
    gpu = request.gpu
    if gpu is None:
        gpu = DEFAULT_GPU_FRACTION.get(kind, 0.5) if have_gpu > 0 else 0.0
    if gpu > have_gpu:
        raise UserError(
            f"{request.gpu_option} {gpu:g}: the Ray cluster has {have_gpu:g} GPU(s); use "
            f"--gpus-per-trial 0 or add GPU nodes"
        )
    if request.max_concurrent is not None:
        return TrialResources(cpu, gpu, request.max_concurrent, "--max-concurrent")
    if gpu > 0 and request.fill_gpus:
        # The small epsilon keeps 1 / 0.1 = 9.999... from losing a trial to rounding.
        fit_gpu, fit_cpu = math.floor(have_gpu / gpu + 1e-9), math.floor(have_cpu / cpu + 1e-9)
        share = request.gpu_option if request.gpu is not None else f"{kind} default"
        why = f"GPUs / {gpu:g} ({share})" + (", capped by CPUs" if fit_cpu < fit_gpu else "")
        return TrialResources(cpu, gpu, max(1, min(fit_gpu, fit_cpu)), why)
    return TrialResources(cpu, gpu, request.yaml_max_concurrent, "max_concurrent in the YAML")


def check_resources(request: ResourceRequest, kind: str) -> TrialResources:
    """``choose_resources`` for the connected cluster; prints the choice in one line."""
    import ray

    cluster = ray.cluster_resources()
    chosen = choose_resources(request, cluster, kind)
    print(chosen.line(cluster), flush=True)
    return chosen


def asha_warning(spec: SearchSpec) -> str | None:
    """ASHA's first rung is at ``grace_period``: at or past ``max_epochs`` it never stops one."""
    if spec.grace_period < spec.max_epochs:
        return None
    return (
        f"warning: grace_period {spec.grace_period} >= max_epochs {spec.max_epochs}: ASHA can "
        f"never stop a trial early; lower --grace-period or raise --max-epochs"
    )


# ---------------------------------------------------------------- spec -> trial configs
def base_config(spec: SearchSpec, model: ModelSpec) -> RunConfig:
    """The config every trial starts from: the model's homework settings, the YAML's ``fixed``
    values, then the search's own budget, seeds and metric."""
    own = {
        "model": model.name,
        "epochs": spec.max_epochs,
        "seed": spec.seed,
        "split_seed": spec.split_seed,
        "metric": spec.metric,
    }
    return validate_config(model.defaults.replace(**{**spec.fixed, **own}), spec.source)


def first_point(spec: SearchSpec, model: ModelSpec) -> dict:
    """The homework's own hyperparameters, snapped into the space: evaluated first, so the
    search can only match or beat the baseline configuration."""
    import optuna.distributions as od

    point = {}
    for name, dist in optuna_distributions(spec).items():
        v = getattr(model.defaults, name)
        if isinstance(dist, od.CategoricalDistribution):
            choices = list(dist.choices)
            numeric = [c for c in choices if isinstance(c, (int, float))]
            if v not in choices:
                near = numeric and isinstance(v, (int, float))
                v = min(numeric, key=lambda c: abs(c - v)) if near else choices[0]
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
@dataclass(frozen=True)
class TrialSetup:
    """What every trial shares besides the data; reaches the workers via the object store,
    so a model registered only in the driver's process trains there too."""

    base: RunConfig
    model: ModelSpec
    tb_root: str  # absolute <runs-dir>/search/<name>: each trial logs to <tb_root>/<trial_id>
    searched: tuple[str, ...]  # the searched keys: TensorBoard's hyperparameters
    # absolute <storage-path>/<name>: each trial keeps its checkpoints in trial_<id>/ there
    # ("": none, and a restarted trial starts over)
    experiment_dir: str = ""


class GPUNotVisibleError(RuntimeError):
    """A trial was assigned a GPU but torch sees none. It fails rather than train on the CPU
    (hours instead of minutes, with trials.csv saying cpu)."""


def trainable(params: dict, setup: TrialSetup, data: FitData) -> None:
    """One trial: resolve the config, call ``fit``, forward each epoch to ``tune.report`` with
    the trial's id, node, host and device. ``data`` arrives from the object store: its numpy
    arrays are zero-copy, read-only views shared by all trials on a node.

    After every epoch the trial writes its whole training state to its folder under the
    storage path (``train_state.pt``; ``checkpoint_best.pt``: its best weights). A trial whose
    process dies (its node is lost, the OOM killer or anyone SIGKILLs it) is restarted by
    Tune, at most ``MAX_TRIAL_RESTARTS`` times, and goes on here from that state. A trial that
    fails in its own code (a diverging loss, a bad config, no visible GPU) is not retried: the
    error is reported as its last result (``TRIAL_ERROR``), the trial ends and is recorded as
    failed. A full disk is neither: the search stops (``_stop_if_disk_full``) to be resumed."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    folder = Path(setup.experiment_dir) / f"trial_{trial_id}" if setup.experiment_dir else None
    t0 = time.perf_counter()
    try:
        _run_trial(params, setup, data, trial_id, folder)
    except Exception as e:  # noqa: BLE001 - the trial's own failure: recorded, never retried
        if is_disk_full(e):
            raise  # the machine's, not the trial's: the search stops (OptunaExport) to resume
        traceback.print_exc()  # the full traceback, in the worker's log
        tune.report(
            {
                setup.base.metric: math.nan,  # Tune insists on the metric; NaN never wins
                "trial_id": trial_id,
                TRIAL_ERROR: error_line(f"{type(e).__name__}: {e}"),
                "time_s": time.perf_counter() - t0,
            }
        )


def _run_trial(
    params: dict, setup: TrialSetup, data: FitData, trial_id: str, folder: Path | None
) -> None:
    import ray
    import torch
    from ray import tune

    from tune_pets.train import fit

    runtime = ray.get_runtime_context()
    torch.set_num_threads(max(1, int(runtime.get_assigned_resources().get("CPU", 1))))
    gpu_ids = runtime.get_accelerator_ids().get("GPU", [])
    identity = {
        "trial_id": trial_id,
        "node": runtime.get_node_id(),
        "host": socket.gethostname(),
        "device": trial_device_label(gpu_ids, torch.cuda.is_available()),
    }
    config = RunConfig.from_dict({**setup.base.to_dict(), **params}, "trial config")
    resume = _load_trial_state(folder / TRAIN_STATE_FILE) if folder else None
    reports: list[dict] = []
    if resume is not None:
        # Tune may know fewer epochs than the state holds (its experiment snapshot lags, and a
        # search killed and resumed restarts from that snapshot): report them all again, so
        # every epoch is on record. (A repeated epoch replaces the earlier report of it.)
        for metrics in resume["reports"]:
            tune.report(metrics)
            reports.append(metrics)
    # A restarted trial's clock goes on from its state (the time it was down is not its).
    t0 = time.perf_counter() - (reports[-1]["time_s"] if reports else 0.0)
    state: dict = {}

    def report(metrics: dict, best: dict | None) -> None:
        metrics = {**metrics, **identity, "time_s": time.perf_counter() - t0}
        tune.report(metrics)
        reports.append(metrics)
        if folder is None:
            return
        if best is not None:
            _save(best, folder / BEST_CHECKPOINT_FILE)
        # After the report: a trial killed in between repeats this epoch rather than skip it.
        _save({**state, "best_ckpt": None, "reports": reports}, folder / TRAIN_STATE_FILE)

    fit(
        config,
        data,
        report,
        # Ray sets CUDA_VISIBLE_DEVICES to the trial's GPU(s): the first visible one is its own.
        device=torch.device("cuda", 0) if gpu_ids else torch.device("cpu"),
        tb_dir=Path(setup.tb_root) / trial_id,
        hparams={k: getattr(config, k) for k in setup.searched},
        spec=setup.model,
        resume=resume,
        on_state=state.update if folder else None,  # no folder: nothing to restart from
    )


def _save(obj: dict, path: Path) -> None:
    """``torch.save`` into memory, then an atomic write: a full disk raises OSError(ENOSPC)
    (torch's own file writer reports it as a RuntimeError that names no cause)."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def _load_trial_state(path: Path) -> dict | None:
    """The state a restarted trial goes on from (``fit(resume=...)`` plus the ``reports`` it
    made), or None: no state yet, or one that cannot be read (the trial starts over)."""
    if not path.is_file():
        return None
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged state costs the trial its progress only
        print(f"warning: {path} unreadable ({error_line(e)}); the trial starts over", flush=True)
        return None


def trial_device_label(gpu_ids: Sequence[str], cuda_available: bool) -> str:
    """``cuda:N`` (N: the node's GPU index Ray assigned) or ``cpu``."""
    if not gpu_ids:
        return "cpu"
    if not cuda_available:
        raise GPUNotVisibleError(
            f"trial was assigned GPU {','.join(map(str, gpu_ids))} on {socket.gethostname()} "
            f"but torch sees no CUDA device (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}); install a CUDA build of torch "
            f"on that node or run with --gpus-per-trial 0"
        )
    return f"cuda:{gpu_ids[0]}"


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


# ---------------------------------------------------------------- ray setup
def use_cluster_auth(address: str | None) -> None:
    """`ray start --head` turns on token authentication; a driver joining it must use it too.
    Ray reads RAY_AUTH_MODE when it is imported, so call this before anything imports ray."""
    if address and (Path.home() / ".ray" / "auth_token").is_file():
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def connect(address: str | None, num_cpus: int | None = None) -> None:
    """Start a local Ray (dashboard off, bound to 127.0.0.1) or join a cluster at ``address``.

    The local Ray runs its workers (the trials) at the priority of this process. Ray's
    default renices them to +15, so on a machine shared with other jobs every other process
    gets the CPUs first: beside two busy processes on 2 cores, a worker's start took 15-64 s
    instead of 7-10 s and its compute 1.6-2x longer (the search-efficiency benchmark, where
    Optuna alone in the driver process kept its normal priority). A cluster keeps what its
    nodes were started with (``RAY_worker_niceness=0 ray start ...`` changes it there)."""
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
        _system_config={"worker_niceness": 0},
        log_to_driver=False,
        logging_level="ERROR",
    )


def _check_reachable(address: str) -> None:
    """Fail in seconds, not after Ray's ~14 minutes of retries, when HOST:PORT is not listening."""
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


def _shutdown() -> None:
    """Stop the local Ray (or disconnect from a cluster) so later steps get the CPUs back."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def _storage_filesystem():
    """Ray's storage with whole-file writes: a full disk leaves the last experiment state and
    checkpoints whole, so --resume continues once space is freed (``tune_pets.storage``)."""
    from tune_pets.storage import atomic_local_filesystem

    return atomic_local_filesystem()


def _quiet_ray_output() -> None:
    """Tune reads these when ``fit`` starts, for a new and a restored Tuner alike: the compact
    output (our status line, not Ray's boxed tables naming its temp session folder), and no
    TensorBoard files of Ray's own (each trial writes ours under <runs-dir>/search/)."""
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    # A trial whose process died gets one line of ours (restarting, or failed in trials.csv);
    # Tune's traceback of Ray's internals adds nothing. Neither does its traceback of a failed
    # save of the experiment state: one warning line instead. A trial that failed in its own
    # code ends with a NaN metric, which Optuna records as FAIL (it warns about the NaN).
    logging.getLogger("ray.tune.execution.tune_controller").addFilter(_not_trial_task_failed)
    logging.getLogger("ray.tune.execution.experiment_state").addFilter(_state_not_saved)
    warnings.filterwarnings("ignore", message="The value nan is not acceptable")
    # A restarted trial reports its earlier epochs again, under new iteration numbers that
    # Optuna may already hold for it: it keeps the first value, and says so.
    warnings.filterwarnings("ignore", message="The reported value is ignored because this")


def _not_trial_task_failed(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Trial task failed")


_WARNED: set[str] = set()


def _state_not_saved(record: logging.LogRecord) -> bool:
    """Tune's "Saving experiment state ... failed" (and traceback) as one warning line, once
    per reason. Tune goes on, and tries again at its next snapshot."""
    if not str(record.msg).startswith("Saving experiment state"):
        return True
    error = record.exc_info[1] if record.exc_info else None
    reason = "no space left on device" if is_disk_full(error) else error_line(error) or "error"
    if reason not in _WARNED:
        _WARNED.add(reason)
        where = record.getMessage().partition("at ")[2].partition(" failed")[0]
        print(
            f"warning: Ray's experiment state not saved to {where} ({reason}); the last one "
            f"saved is kept whole, and --resume starts from it",
            file=sys.stderr,
            flush=True,
        )
    return False


# ---------------------------------------------------------------- live outputs
@functools.cache
def _export_callback_class() -> type:
    """``OptunaExport`` (a ``tune.Callback``), made on first use because ray may be imported
    only after ``use_cluster_auth``. Ray pickles it with the Tuner (by value)."""
    from ray import tune

    class OptunaExport(tune.Callback):
        """After every finished trial: one line on stdout and ``optuna.db`` rewritten from all
        finished trials (in a long search, less often: ``_export``), so ``optuna-dashboard``
        follows a running search. The study the search relies on lives in the searcher; this
        is a derived copy. Its state (each trial's reports, the finished records) is
        snapshotted by Ray together with the searcher, so after a kill ``--resume`` goes on
        from the same set of trials."""

        def __init__(self, spec: SearchSpec, name: str, db_path: Path):
            self.spec, self.name, self.db_path = spec, name, str(db_path)
            self.reports: dict[str, list[dict]] = {}
            self.finished: dict[str, TrialRecord] = {}

        def on_trial_result(self, iteration, trials, trial, result, **info):
            add_report(self.reports.setdefault(trial.trial_id, []), result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._finish(trials, trial, None)

        def on_trial_error(self, iteration, trials, trial, **info):
            if _stop_if_disk_full(trial, _trial_failures(trial)):
                return  # not finished: --resume runs it again
            self._finish(trials, trial, _trial_error(trial))

        def on_trial_recover(self, iteration, trials, trial, **info):
            reports = self.reports.get(trial.trial_id) or [{}]
            at = f"epoch {reports[-1]['epoch']}" if "epoch" in reports[-1] else "the start"
            failures = _trial_failures(trial)
            if _stop_if_disk_full(trial, failures):
                return
            why = failure_reason(failures[-1]) if failures else "its process died"
            print(
                f"trial {trial.trial_id}: {why}; restarting it from {at} (restart "
                f"{trial.num_failures} of at most {MAX_TRIAL_RESTARTS})",
                flush=True,
            )

        def get_state(self) -> dict:
            return {
                "reports": self.reports,
                "finished": {k: r.to_dict() for k, r in self.finished.items()},
            }

        def set_state(self, state: dict) -> None:
            self.reports = state["reports"]
            self.finished = {k: TrialRecord.from_dict(d) for k, d in state["finished"].items()}

        def _finish(self, trials, trial, ray_error: str | None) -> None:
            _drop_train_state(trial)
            params = {k: trial.config.get(k) for k in self.spec.space}
            reports = self.reports.pop(trial.trial_id, [])
            own = (trial.last_result or {}).get(TRIAL_ERROR)
            error, restarts, why = trial_outcome(_trial_failures(trial), ray_error, own)
            record = make_record(
                trial.trial_id,
                params,
                reports,
                self.spec,
                error=error,
                restarts=restarts,
                restart_reason=why,
            )
            self.finished[trial.trial_id] = record
            due = time.monotonic() >= getattr(self, "next_export", 0.0)
            if due or len(self.finished) <= EXPORT_EVERY_TRIAL_UP_TO:
                self._export(trials)  # the db first: a trial announced in the log is in the db
            print(trial_line(record, self.spec, len(self.finished)), flush=True)

        def _export(self, trials) -> None:
            """Rewrite optuna.db from every finished trial. The rewrite grows with the trials
            (~0.05 s a trial on 2 busy cores: 10 s at 200) and holds up Tune's loop, so the next
            one waits EXPORT_SPACING times as long as this one took: never more than ~10 % of
            the search's time (the final results rewrite it anyway)."""
            order = {t.trial_id: i for i, t in enumerate(trials)}
            records = sorted(self.finished.values(), key=lambda r: order.get(r.trial_id, 1e9))
            start = time.monotonic()
            try:
                export_study(records, self.spec, self.name, Path(self.db_path))
            except Exception as e:  # noqa: BLE001 - a derived file must never stop the search
                why = "no space left on device" if is_disk_full(e) else error_line(e)
                print(f"warning: {self.db_path} not updated ({why})", file=sys.stderr)
            self.next_export = time.monotonic() + EXPORT_SPACING * (time.monotonic() - start)

    return OptunaExport


def export_callback(spec: SearchSpec, name: str, db_path: Path):
    """The callback that prints a line per finished trial and keeps ``optuna.db`` current."""
    return _export_callback_class()(spec, name, db_path)


def _trial_error(trial) -> str:
    """The last line of a failed trial's error, as Tune stored it."""
    try:
        return error_line(trial.get_pickled_error() or trial.get_error()) or "error"
    except OSError:  # the error file is unreadable: the status still says failed
        return "error"


# ---------------------------------------------------------------- failures and restarts
# Why the running search was stopped for want of disk space (set by OptunaExport; read by
# run_search after Tune returns). One search runs per process.
_DISK_FULL: list[str] = []


def is_disk_full(error: BaseException | str | None) -> bool:
    """Whether ``error`` (an exception, its causes, or an error's text) is a full disk or an
    exhausted quota (ENOSPC, EDQUOT)."""
    e, seen = error, 0
    while isinstance(e, BaseException) and seen < 10:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    text = str(error or "")
    full = ("No space left on device", "Disk quota exceeded", "database or disk is full")
    return any(s in text for s in full)


def _stop_if_disk_full(trial, failures: Sequence[str]) -> bool:
    """A trial that failed because the disk is full would fail again on every node: stop the
    whole search the way Ctrl-C does (Tune saves its state and ends; unfinished trials stay
    unfinished), so that --resume finishes it once space is freed. True when stopping."""
    if not failures or not is_disk_full(failures[-1]):
        return False
    if not _DISK_FULL:
        _DISK_FULL.append(f"trial {trial.trial_id} could not save its checkpoint")
        # The failed trial's error is ours already; Ray would log it again as "unhandled".
        os.environ["RAY_IGNORE_UNHANDLED_ERRORS"] = "1"
        handler = signal.getsignal(signal.SIGUSR1)
        if callable(handler):  # Tune's own stop handler (SIGINT and SIGUSR1) is installed
            signal.raise_signal(signal.SIGUSR1)
    return True


def _drop_train_state(trial) -> None:
    """A finished trial (done, stopped by ASHA, failed) has nothing to go on from: delete its
    training state (the largest file it wrote); its best weights stay."""
    try:
        folder = trial.path
    except AttributeError:  # a stub trial: no storage
        return
    if folder:
        with contextlib.suppress(OSError):
            (Path(folder) / TRAIN_STATE_FILE).unlink(missing_ok=True)


def _trial_failures(trial) -> list[str]:
    """``_failures`` of a live Tune trial (none for one without storage, e.g. a stub)."""
    try:
        return _failures(trial.error_file)
    except AttributeError:
        return []


def _failures(error_file: str | Path | None) -> list[str]:
    """Each failure Tune recorded for a trial, oldest first: its ``error.txt`` holds one entry
    per failure (the trial's process died, or Ray could not run it)."""
    try:
        text = Path(error_file).read_text(encoding="utf-8", errors="replace") if error_file else ""
    except OSError:
        return []
    return [b.strip() for b in re.split(r"(?m)^Failure # \d+ \(occurred at [^)]*\)$", text)[1:]]


def failure_reason(error: object) -> str:
    """One line saying why a trial's run ended in a Ray error: its process was killed from
    outside or its node was lost (Ray's ActorDiedError / ActorUnavailableError), or else the
    error's last line."""
    text = str(error)
    if "its node" in text or "node has died" in text or "NodeDiedError" in text:
        return "its node died"
    if "is unavailable" in text and "actor" in text:
        return "lost contact with its process (its node went away or the process was killed)"
    if "worker process has died" in text or "died unexpectedly" in text:
        pid = re.search(r"^\s*pid: (\d+)$", text, re.M)
        who = f"its process (pid {pid.group(1)})" if pid else "its process"
        return f"{who} was killed from outside (out-of-memory killer, SIGKILL or a crash)"
    return error_line(text)


def trial_outcome(
    failures: Sequence[str], ray_error: str | None, own_error: str | None
) -> tuple[str, int, str]:
    """``(error, restarts, restart_reason)`` of a finished trial. ``failures``: its recorded
    failures (``_failures``); every one was followed by a restart from the last checkpoint,
    except the last when the trial ended in a Ray error (``ray_error``: it died more than
    ``MAX_TRIAL_RESTARTS`` times). ``own_error``: what the trial reported as its own failure."""
    if ray_error is not None and not failures:
        failures = [ray_error]
    restarted = list(failures[:-1] if ray_error is not None else failures)
    why = failure_reason(restarted[-1]) if restarted else ""
    if own_error:
        error = str(own_error)
    elif ray_error is not None:
        error = failure_reason(failures[-1])
        if restarted:
            error += f"; not restarted again after {len(restarted)} restart(s)"
    else:
        error = ""
    return error, len(restarted), why


@functools.cache
def _status_reporter_class() -> type:
    """``StatusLine`` (a ``tune.ProgressReporter``), made on first use like OptunaExport."""
    from ray import tune

    class StatusLine(tune.ProgressReporter):
        """One line every STATUS_EVERY_S seconds while trials run: how many are done and how
        many are running (each finished trial gets its own line from OptunaExport)."""

        def __init__(self, num_samples: int, every_s: float = STATUS_EVERY_S):
            self.num_samples, self.every_s = num_samples, every_s
            self.start = self.last = 0.0

        def setup(self, start_time=None, total_samples=None, **kwargs):
            self.start = self.last = time.time()  # per run: a resumed search counts anew

        def should_report(self, trials, done=False):
            return done or time.time() - self.last >= self.every_s

        def report(self, trials, done, *sys_info):
            self.last = time.time()
            finished = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
            running = sum(t.status == "RUNNING" for t in trials)
            print(
                f"[{self.last - self.start:.0f}s] {finished}/{self.num_samples} trials done, "
                f"{running} running",
                flush=True,
            )

    return StatusLine


# ---------------------------------------------------------------- the tuner
SEARCHERS = ("tpe", "random")  # make_sampler's kinds
SCHEDULERS = ("asha", "fifo")


def startup_trials(num_samples: int) -> int:
    """Random trials before TPE takes over: a fifth of the search, at least 4, at most 10.

    Optuna's default (10) is made for studies of hundreds of trials; in the shipped 24-trial
    CNN search it would spend 40% of the trials on random draws, and in the search-efficiency
    benchmark's 90 s searches (5-20 trials) TPE would never start. The homework point,
    evaluated first, counts as one of these trials."""
    return max(4, min(10, math.ceil(num_samples / 5)))


def make_sampler(spec: SearchSpec, kind: str = "tpe"):
    """The Optuna sampler of a search (and of the benchmark's Optuna-alone peer).

    ``tpe``: seeded TPE, ``multivariate`` (models the joint density, so lr and batch size are
    learned together), ``constant_liar`` (running trials count as bad ones, so parallel trials
    do not all sample the same point), ``startup_trials(num_samples)`` random trials first.
    Set explicitly: Optuna's defaults for these changed between versions. ``random``: seeded
    random sampling of the same space (the benchmark's reference)."""
    import optuna

    if kind == "random":
        return optuna.samplers.RandomSampler(seed=spec.seed)
    if kind != "tpe":
        raise ValueError(f"searcher must be one of {SEARCHERS}, got {kind!r}")
    return optuna.samplers.TPESampler(
        seed=spec.seed,
        multivariate=True,
        constant_liar=True,
        n_startup_trials=startup_trials(spec.num_samples),
    )


@functools.cache
def _stopped_as_pruned_class() -> type:
    """``StoppedAsPruned`` (an ``OptunaSearch``), made on first use like OptunaExport."""
    from ray.tune.search.optuna import OptunaSearch

    class StoppedAsPruned(OptunaSearch):
        """OptunaSearch that tells Optuna a trial stopped before ``max_epochs`` (by ASHA or the
        time budget) as PRUNED, with its last epoch's value, instead of COMPLETE with it.

        Ray's OptunaSearch tells every trial that ended without an error as COMPLETE with its
        last reported value, so an epoch-3 score (taken mid-schedule, at a high learning rate)
        competes as a final score with the 30-epoch scores of the trials ASHA promoted. As
        PRUNED, TPE ranks it below every completed trial, the way Optuna's own pruners report
        it. Done through the public hook: a result without the metric is told as PRUNED by
        OptunaSearch, and Optuna then takes the trial's last intermediate value (reported
        every epoch by ``on_trial_result``) as its value."""

        def __init__(self, *args: Any, max_epochs: int, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.max_epochs = max_epochs

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error=False):
            value = (result or {}).get(self.metric)
            stopped = (
                not error
                and isinstance(value, (int, float))
                and math.isfinite(value)
                and int(result.get("epoch", self.max_epochs)) < self.max_epochs
            )
            if stopped:
                result = {k: v for k, v in result.items() if k != self.metric}
            super().on_trial_complete(trial_id, result, error)

    return StoppedAsPruned


def make_tuner(
    fn,
    spec: SearchSpec,
    storage_path: Path,
    name: str,
    first: dict | None = None,
    progress: bool = True,
    *,
    max_concurrent: int | None = None,
    callbacks: Sequence[Any] = (),
    searcher: str = "tpe",
    scheduler: str = "asha",
):
    """The Tuner every search uses: OptunaSearch (``make_sampler``: seeded multivariate TPE
    with a constant liar) behind a ConcurrencyLimiter (``max_concurrent``, default the spec's),
    ASHA on the reported ``epoch``, actor reuse, trials whose process died restarted
    (``trainable`` keeps their checkpoints), failed trials recorded without stopping the
    search. A trial stopped before ``max_epochs`` is told to Optuna as pruned at its last
    epoch (``_stopped_as_pruned_class``).

    ``searcher`` (``tpe`` | ``random``) and ``scheduler`` (``asha`` | ``fifo``: every trial runs
    to ``max_epochs``) exist for the search-efficiency benchmark's reference methods
    (``scripts/bench/search_efficiency.py``); searches use the defaults.

    The Optuna study lives inside the searcher, which Ray snapshots with the experiment state:
    a resumed search continues exactly the study that matches the trials Ray knows about. (A
    study in SQLite would run ahead of the snapshot, and a trial rerun after a crash would then
    report into an Optuna trial that is already finished.) ``optuna.db`` is an export of the
    finished trials (``export_callback``, ``search_results.export_study``)."""
    import optuna
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter

    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "study created" chatter
    _quiet_ray_output()
    run_config = tune.RunConfig(
        name=name,
        storage_path=str(storage_path),
        storage_filesystem=_storage_filesystem(),
        progress_reporter=_status_reporter_class()(spec.num_samples),
        verbose=1 if progress else 0,
        # result.json and progress.csv per trial (what Result.metrics_dataframe reads).
        callbacks=[JsonLoggerCallback(), CSVLoggerCallback(), *callbacks],
        failure_config=tune.FailureConfig(max_failures=MAX_TRIAL_RESTARTS, fail_fast=False),
    )
    search_alg = _stopped_as_pruned_class()(
        space=optuna_distributions(spec),
        metric=spec.metric,
        mode=spec.mode,
        points_to_evaluate=[first] if first else None,
        sampler=make_sampler(spec, searcher),
        study_name=name,
        max_epochs=spec.max_epochs,
    )
    if scheduler == "fifo":
        trial_scheduler = FIFOScheduler()
    else:
        trial_scheduler = ASHAScheduler(
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
            search_alg=ConcurrencyLimiter(
                search_alg, max_concurrent=max_concurrent or spec.max_concurrent
            ),
            scheduler=trial_scheduler,
            reuse_actors=True,
            time_budget_s=spec.time_budget_s,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=run_config,
    )


# ---------------------------------------------------------------- the search
@dataclass(frozen=True)
class SearchOutcome:
    """How ``run_search`` ended: finished (``summary`` set) or interrupted (Ctrl-C; Ray saved
    the experiment state and ``--resume`` continues it)."""

    interrupted: bool
    name: str
    records: list[TrialRecord]
    summary: SearchSummary | None
    out_dir: Path


@contextlib.contextmanager
def search_lock(path: Path, name: str) -> Iterator[None]:
    """Hold ``path`` (``Layout.search_lock(name)``) locked while a search of ``name`` runs, so a
    second search of the same name refuses at once (a one-line UserError naming the running
    one: pid, host, start time) instead of writing over its files. An ``flock`` is released by
    the kernel when its process dies: a killed search leaves the file (naming a dead process)
    but no lock. The holder deletes the file when done (as ``prepare``'s lock does)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by Ray's processes
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise UserError(
                f"search {name!r} is already running ({holder}; lock {path}); wait for it to "
                f"finish, or pass --name NEW to run another search beside it"
            ) from None
        # The previous holder deletes the file when done: a lock on its deleted file is no lock.
        if path.exists() and os.stat(path).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)
    try:
        holder = f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%F %T')}"
        with contextlib.suppress(OSError):  # the lock holds without its text (a full disk)
            os.ftruncate(fd, 0)  # a killed search's line
            os.pwrite(fd, (holder + "\n").encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)  # still locked here: no other search is inside
        os.close(fd)


def _read_holder(fd: int, wait_s: float = 3.0) -> str:
    """The running search's line from its lock file. The holder writes it just after taking the
    lock, so a search started at the same moment can find the file still empty: wait for the
    line (a CI run did meet the empty file) rather than name no one."""
    deadline = time.monotonic() + wait_s
    while True:
        text = os.pread(fd, 1000, 0).decode("utf-8", "replace")
        if text.endswith("\n") or time.monotonic() > deadline:
            return text.strip() or "starting up"
        time.sleep(0.02)


def _holding_search_lock(run: Callable[..., SearchOutcome]) -> Callable[..., SearchOutcome]:
    @functools.wraps(run)
    def locked(spec, base, data_dir, layout: Layout, name: str, *args, **kwargs):
        with search_lock(layout.search_lock(name), name):
            return run(spec, base, data_dir, layout, name, *args, **kwargs)

    return locked


@_holding_search_lock
def run_search(
    spec: SearchSpec,
    base: RunConfig,
    data_dir: Path,
    layout: Layout,
    name: str,
    *,
    model: ModelSpec | None = None,
    resources: ResourceRequest | None = None,
    storage_path: Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    address: str | None = None,
    val_fraction: float = 0.2,
    cache_dir: str | Path | None = None,
    skip_bad: bool = False,
    num_cpus: int | None = None,
    progress: bool = True,
) -> SearchOutcome:
    """Run (or resume) a search; write best_config.json, trials.csv, optuna.db and the plots.
    The whole run holds ``layout.search_lock(name)``: a second search of the same name refuses.

    Cluster problems (unreachable address, too few CPUs/GPUs) and experiment-name clashes fail
    before anything is decoded or written. Raises UserError when every trial failed."""
    from ray import tune

    model = model or get_spec(spec.model)
    storage_path = Path(storage_path or layout.ray_results).resolve()
    exp_dir = storage_path / name
    exists = tune.Tuner.can_restore(str(exp_dir))
    _check_experiment(exists, resume, overwrite, name, storage_path)
    warning = asha_warning(spec)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    connect(address, num_cpus)
    chosen = check_resources(resources or resource_request(spec), model.kind)
    spec = spec.replace(
        max_concurrent=chosen.max_concurrent, resources={"cpu": chosen.cpu, "gpu": chosen.gpu}
    )
    tb_root = layout.search_tb(name).resolve()
    if not resume:
        _start_fresh(exp_dir if exists else None, tb_root, layout.optuna_db(name))

    t0 = time.time()
    data = load_fit_data(
        base,
        data_dir,
        val_fraction=val_fraction,
        split_file=layout.search_val_split(name),
        cache_dir=cache_dir,
        skip_bad=skip_bad,
        img_sizes=img_sizes(spec, base),
        progress=progress,
        device=_driver_device(),
        spec=model,
    )
    prep_s = time.time() - t0
    print(
        f"data: {data.info['n_train']} train / {data.info['n_val']} val images, "
        f"{data.num_classes} classes ({data.kind}, ready in {prep_s:.1f}s)",
        flush=True,
    )
    setup = TrialSetup(base, model, str(tb_root), tuple(spec.space), str(exp_dir))
    fn = tune.with_resources(
        tune.with_parameters(trainable, setup=setup, data=data),
        {"cpu": chosen.cpu, "gpu": chosen.gpu},
    )
    if resume:
        _quiet_ray_output()
        tuner = tune.Tuner.restore(
            str(exp_dir),
            trainable=fn,
            resume_unfinished=True,
            storage_filesystem=_storage_filesystem(),
        )
        print(f"resuming {name!r} from {exp_dir}", flush=True)
    else:
        tuner = make_tuner(
            fn,
            spec,
            storage_path,
            name,
            first_point(spec, model),
            progress,
            max_concurrent=chosen.max_concurrent,
            callbacks=[export_callback(spec, name, layout.optuna_db(name))],
        )
    t1 = time.time()
    _DISK_FULL.clear()
    grid = tuner.fit()
    search_s = time.time() - t1
    if _DISK_FULL:
        raise OSError(errno.ENOSPC, f"{_DISK_FULL[0]} under {storage_path}")
    out_dir = layout.search(name)
    if _interrupted(grid, spec, search_s):
        return SearchOutcome(True, name, [], None, out_dir)
    records = records_from_grid(grid, spec)
    _remove_orphans(grid, records, exp_dir, tb_root)
    run = {
        "name": name,
        "experiment_dir": str(exp_dir),
        "tensorboard_dir": str(tb_root),
        "wall_time_s": round(search_s, 1),
        "data_prep_s": round(prep_s, 1),
    }
    summary = _write_outputs(records, spec, base, layout, name, run, data.info)
    return SearchOutcome(False, name, records, summary, out_dir)


def _check_experiment(
    exists: bool, resume: bool, overwrite: bool, name: str, storage_path: Path
) -> None:
    if resume and not exists:
        raise UserError(
            f"--resume: no experiment named {name!r} under {storage_path}; run without "
            f"--resume to start it"
        )
    if exists and not resume and not overwrite:
        raise UserError(
            f"experiment {name!r} already exists under {storage_path}; pass --resume to "
            f"continue it, --overwrite to start over, or --name NEW"
        )


def _start_fresh(old_experiment: Path | None, tb_root: Path, db: Path) -> None:
    """A new search of this name replaces the old one's Ray state, TensorBoard logs and
    optuna.db, so neither TensorBoard nor optuna-dashboard mixes two searches."""
    for path in (old_experiment, tb_root):
        if path is not None and path.exists():
            shutil.rmtree(path)
    db.unlink(missing_ok=True)


def _driver_device():
    """Where the driver runs the frozen backbone of a features model (once, before the trials):
    its GPU if it has one."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _interrupted(grid, spec: SearchSpec, search_s: float) -> bool:
    """Ray returns from ``fit`` on Ctrl-C too, after saving the experiment state: then some
    trial is unfinished, or fewer than num_samples were started (unless the budget ran out)."""
    budget_spent = spec.time_budget_s is not None and search_s >= spec.time_budget_s
    finished = grid.num_terminated + grid.num_errors
    return not budget_spent and (finished < len(grid) or len(grid) < spec.num_samples)


def records_from_grid(grid, spec: SearchSpec) -> list[TrialRecord]:
    """Ray's ``ResultGrid`` as plain records, in the order the trials were created. The trial
    id is the one each trial reported (``tune.get_context().get_trial_id()``); a trial that
    failed before its first report has only Tune's auto-filled result, which carries the same
    ``trial_id`` (and ``config`` once its actor started); failing that, a counter names it."""
    records = []
    for i, result in enumerate(grid):
        df = result.metrics_dataframe
        config = result.config or {}
        error, restarts, why = trial_outcome(
            _failures(Path(result.path) / "error.txt" if result.path else None),
            None if result.error is None else error_line(result.error),
            (result.metrics or {}).get(TRIAL_ERROR),
        )
        records.append(
            make_record(
                str((result.metrics or {}).get("trial_id") or f"unreported_{i + 1}"),
                {k: config.get(k) for k in spec.space},
                [] if df is None else df.to_dict("records"),
                spec,
                error=error,
                checkpoint=_best_checkpoint(result.path),
                restarts=restarts,
                restart_reason=why,
            )
        )
    return records


def _best_checkpoint(trial_path: str | None) -> str | None:
    best = Path(trial_path) / BEST_CHECKPOINT_FILE if trial_path else None
    return str(best) if best is not None and best.is_file() else None


def _remove_orphans(grid, records: list[TrialRecord], exp_dir: Path, tb_root: Path) -> None:
    """A search killed between two snapshots of Ray's experiment state may leave folders of a
    trial that started after the last snapshot; on resume Ray reruns that trial under a new
    id, so the old folders belong to no trial. Remove them so every folder is one trial."""
    known_dirs = {Path(r.path).name for r in grid if r.path}
    known_ids = {r.trial_id for r in records}
    for d in list(exp_dir.glob("trial_*")) if known_dirs else []:
        if d.is_dir() and d.name not in known_dirs:
            shutil.rmtree(d, ignore_errors=True)
    for d in list(tb_root.iterdir()) if tb_root.is_dir() else []:
        if d.is_dir() and d.name not in known_ids:
            shutil.rmtree(d, ignore_errors=True)


def _write_outputs(
    records: list[TrialRecord],
    spec: SearchSpec,
    base: RunConfig,
    layout: Layout,
    name: str,
    run: dict,
    data_info: dict,
) -> SearchSummary:
    write_trials_csv(records, spec, layout.trials_csv(name))
    export_study(records, spec, name, layout.optuna_db(name))
    best = pick_best(records, spec)
    if best is None:
        errors = "; ".join(sorted({r.error for r in records if r.error}))[:400]
        raise UserError(
            f"all {len(records)} trials failed ({errors}); see {layout.trials_csv(name)}"
        )
    summary = make_summary(
        best,
        records,
        spec,
        base,
        run=run,
        data=data_info,
        val_split_file=layout.search_val_split(name),
        env=env_info(),
    )
    summary.write(layout.best_config(name))
    write_plots(records, spec, name, layout)
    return summary


# ---------------------------------------------------------------- CLI
def build_parser() -> cli.ArgumentParser:
    p = cli.command_parser(__doc__, PROG)
    cli.add_model_arg(p, "which model to search")
    cli.add_data_args(p, split_default="the YAML's split_seed, else --seed")
    cli.add_weights_args(p)
    g = p.add_argument_group("search (each flag overrides the search-space YAML)")
    g.add_argument(
        "--search-space",
        default=None,
        help="search-space YAML (default: the shipped search_spaces/<model>.yaml)",
    )
    g.add_argument("--num-samples", type=cli.positive_int, help="number of trials")
    g.add_argument("--max-epochs", type=cli.positive_int, help="epochs per trial (ASHA's max_t)")
    g.add_argument(
        "--grace-period",
        type=cli.positive_int,
        help="ASHA: epochs before a trial can be stopped (must be < --max-epochs to stop any)",
    )
    g.add_argument(
        "--pick",
        choices=PICK_RULES,
        help="how the trial handed to reproduce is chosen: best_epoch (its best epoch is the "
        "best of all) or final_mean (the best mean of the last 3 epochs among the trials that "
        "ran longest: less swayed by one lucky epoch); default: the YAML's pick, else "
        "best_epoch",
    )
    g.add_argument(
        "--time-budget-s",
        type=cli.positive_float,
        help="wall-clock budget for the whole search, in seconds",
    )
    g.add_argument(
        "--seed",
        type=cli.nonneg_int,
        help="seed of the TPE sampler and of every trial (weights, batch order, augmentation)",
    )
    g.add_argument(
        "--max-steps-per-epoch",
        type=cli.nonneg_int,
        help="cap steps per epoch, for smoke runs (0: no cap)",
    )
    g.add_argument("--name", default=None, help="experiment name (default: the model)")
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue the experiment --name (finished trials are not rerun)",
    )
    g.add_argument(
        "--overwrite", action="store_true", help="replace an existing experiment of this name"
    )
    r = p.add_argument_group("Ray cluster and resources")
    r.add_argument(
        "--address",
        default=None,
        help="join a running Ray cluster: auto or HOST:PORT (default: start a local Ray)",
    )
    r.add_argument(
        "--storage-path",
        default=None,
        help="absolute folder for Ray's experiment state and trial checkpoints, writable by "
        "every node (default: <artifacts-dir>/ray_results)",
    )
    r.add_argument("--num-cpus", type=cli.positive_int, help="CPUs of the local Ray (default: all)")
    r.add_argument("--cpus-per-trial", type=cli.positive_float, help="CPUs per trial (default: 1)")
    r.add_argument(
        "--gpus-per-trial",
        type=cli.nonneg_float,
        help="GPUs per trial, may be fractional (0.25: four trials share a GPU); alone it also "
        "sets how many run at once (GPUs / share). Default with GPUs: "
        + ", ".join(f"{v:g} for {k} models" for k, v in DEFAULT_GPU_FRACTION.items()),
    )
    r.add_argument(
        "--max-concurrent",
        type=cli.positive_int,
        help="trials at once (default: fill the GPUs, else max_concurrent from the YAML)",
    )
    cli.add_output_args(p)
    return p


def spec_from_args(args: Any, model: ModelSpec) -> SearchSpec:
    """The search-space YAML with the search flags applied."""
    path = Path(args.search_space) if args.search_space else default_space(model.name)
    spec = load_search_spec(path)
    if spec.model != model.name:
        raise UserError(f"--search-space {path} is for model {spec.model!r}, not {model.name!r}")
    flags = (
        "num_samples",
        "max_epochs",
        "grace_period",
        "seed",
        "split_seed",
        "time_budget_s",
        "pick",
    )
    return spec.replace(**{k: getattr(args, k) for k in flags if getattr(args, k) is not None})


def _data_dir(args: Any) -> Path:
    """--data-dir, prepared first when it is the default and missing."""
    if args.data_dir == DEFAULT_DATA_DIR and not Path(args.data_dir).exists():
        from tune_pets.prepare import prepare

        print(f"{args.data_dir} not found: preparing the dataset there first", flush=True)
        prepare(Path(args.data_dir), progress=not args.no_progress)
    return cli.data_dir_from_args(args)


def _storage_path(args: Any, layout: Layout) -> Path:
    if args.storage_path is None:
        return layout.ray_results.resolve()
    storage = Path(args.storage_path)
    if not storage.is_absolute():
        raise UserError(f"--storage-path {storage}: must be an absolute path (all nodes use it)")
    return storage


def resume_command(argv: Sequence[str], name: str, named: bool) -> str:
    """The command that continues this search: the same arguments, with --resume."""
    again = [a for a in argv if a not in ("--overwrite", "--resume")]
    if not named:
        again += ["--name", name]
    return shlex.join(["python", "-m", "tune_pets.search", *again, "--resume"])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    model = get_spec(args.model)
    spec = spec_from_args(args, model)
    base = cli.config_from_args(args, base_config(spec, model))
    layout = cli.layout_from_args(args)
    name = args.name or model.name
    storage = _storage_path(args, layout)
    data_dir = _data_dir(args)
    use_cluster_auth(args.address)
    try:
        outcome = run_search(
            spec,
            base,
            data_dir,
            layout,
            name,
            model=model,
            resources=resource_request(spec, args),
            storage_path=storage,
            resume=args.resume,
            overwrite=args.overwrite,
            address=args.address,
            val_fraction=args.val_fraction,
            cache_dir=args.cache_dir,
            skip_bad=args.skip_bad_images,
            num_cpus=args.num_cpus,
            progress=not args.no_progress,
        )
    except OSError as e:
        if not is_disk_full(e):
            raise
        named = args.name is not None
        message = disk_full_message(e, storage / name, layout.search(name), argv, name, named)
        raise UserError(message) from None
    finally:
        _shutdown()
    if outcome.interrupted:
        print(
            f"\n{PROG}: interrupted: search stopped; the experiment state is saved. Resume "
            f"with: {resume_command(argv, name, args.name is not None)}",
            file=sys.stderr,
        )
        return 130
    _print_summary(outcome, spec, layout, model.name)
    return 0


def disk_full_message(
    error: OSError,
    experiment: Path,
    out_dir: Path,
    argv: Sequence[str],
    name: str,
    named: bool,
) -> str:
    """One line for a search stopped by a full disk: what could not be written, that the files
    written before are whole (every write is atomic), and the command that goes on."""
    if error.filename:
        what = f"writing {error.filename}"
    elif error.errno and error.strerror == os.strerror(error.errno):
        what = f"writing the results in {out_dir}"
    else:
        what = str(error.strerror)
    if any(experiment.glob("experiment_state-*.json")):
        then = f"free space, then resume with: {resume_command(argv, name, named)}"
    else:
        then = "free space, then run the same command again"
    return (
        f"no space left on device ({what}); the search stopped and the files it wrote before "
        f"are intact; {then}"
    )


def _print_summary(outcome: SearchOutcome, spec: SearchSpec, layout: Layout, model: str) -> None:
    s, name = outcome.summary, outcome.name
    counts = status_counts(outcome.records)
    print(
        f"\nsearch {name!r}: {len(outcome.records)} trials ({counts['completed']} completed, "
        f"{counts['stopped_early']} stopped early, {counts['failed']} failed) in "
        f"{s.search['wall_time_s']:.0f}s"
    )
    f1 = "n/a" if s.val_macro_f1 is None else f"{s.val_macro_f1:.4f}"
    print(
        f"best trial {s.trial_id} (epoch {s.epoch}): {s.metric} {s.best_value:.4f}, "
        f"val_macro_f1 {f1}"
    )
    print("  params: " + ", ".join(f"{k}={s.config[k]!r}" for k in spec.space))
    best = layout.best_config(name)
    print(
        f"wrote {outcome.out_dir}/ (best_config.json, trials.csv, optuna.db, plots) and "
        f"TensorBoard logs in {layout.search_tb(name)}/; next: python -m tune_pets.reproduce "
        f"{model}" + (f" --best-config {best}" if name != model else "")
    )


if __name__ == "__main__":
    cli_main(main, prog=PROG)
