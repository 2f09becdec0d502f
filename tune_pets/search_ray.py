"""A search on Ray Tune; the only module that imports Ray. It connects to Ray (or starts one),
defines the trainable each trial runs (``train.fit``, restartable from its state), Tune's
callbacks and searcher, and the tuner (Optuna TPE + ASHA), and ``run_search`` runs or resumes a
search. Trials see only the train split, carved once into train/val by ``split_seed`` (saved as
``val_split.json``); the decoded data (or the ViT probe's feature cache) reaches them through
the object store. ``search_plan`` settles what runs; ``search_results`` writes the files.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import math
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tune_pets.config import RunConfig
from tune_pets.engine import FitData, load_fit_data
from tune_pets.layout import Layout
from tune_pets.models import ModelSpec
from tune_pets.records import SearchSummary
from tune_pets.search_plan import (
    add_session,
    asha_warning,
    choose_resources,
    first_point,
    img_sizes,
    make_sampler,
    save_spec,
)
from tune_pets.search_results import (
    TrialRecord,
    add_report,
    error_line,
    export_study,
    make_record,
    make_summary,
    optuna_distributions,
    pick_best,
    trial_line,
    write_plots,
    write_trials_csv,
)
from tune_pets.spaces import SearchSpec
from tune_pets.utils import (
    DISK_FULL_ERRNOS,
    UserError,
    atomic_torch_save,
    env_info,
    note_stop_signal,
    on_sigterm,
    usable_cores,
)

STATUS_EVERY_S = 30  # one status line this often while trials run (with progress on)


# A trial whose process dies (node lost, OOM, SIGKILL) restarts from its last state this many
# times, then is recorded as failed. A trial's own errors are never retried.
MAX_TRIAL_RESTARTS = 2


# optuna.db is rewritten after each of the first EXPORT_EVERY_TRIAL_UP_TO finished trials; then
# each rewrite waits EXPORT_SPACING times as long as the last one took (<= ~10 % of the time).
EXPORT_EVERY_TRIAL_UP_TO, EXPORT_SPACING = 20, 9.0


TRIAL_ERROR = "trial_error"  # the key of the last result of a trial that failed in its own code


# A trial's files in <storage>/<name>/trial_<id>/: its best weights, its state after each epoch.
BEST_CHECKPOINT_FILE, TRAIN_STATE_FILE = "checkpoint_best.pt", "train_state.pt"


# ---------------------------------------------------------------- the trainable
@dataclass(frozen=True)
class TrialSetup:
    """What every trial shares besides the data; reaches the workers via the object store,
    so a model registered only in the driver's process trains there too."""

    base: RunConfig
    model: ModelSpec
    tb_root: str  # absolute <runs-dir>/search/<name>: each trial logs to <tb_root>/<trial_id>
    searched: tuple[str, ...]  # the searched keys: TensorBoard's hyperparameters
    experiment_dir: str  # absolute <storage-path>/<name>, holding each trial's trial_<id>/


class GPUNotVisibleError(RuntimeError):
    """A trial was assigned a GPU but torch sees none: fail rather than train for hours on CPU."""


def trainable(params: dict, setup: TrialSetup, data: FitData) -> None:
    """One trial: ``fit`` with each epoch forwarded to ``tune.report`` (with trial id, node,
    host, device). After each epoch it saves its state; restarted after its process died, it
    goes on from there. An error of its own is reported as its last result (``TRIAL_ERROR``)
    and never retried; a full disk propagates, to stop the search (``_stop_if_disk_full``)."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    folder = Path(setup.experiment_dir) / f"trial_{trial_id}"  # as _trial_dirname names it
    t0 = time.perf_counter()
    try:
        _run_trial(params, setup, data, trial_id, folder)
    except Exception as e:  # noqa: BLE001 - the trial's own failure: recorded, never retried
        if is_disk_full(e):
            raise
        traceback.print_exc()  # the full traceback, in the worker's log
        tune.report(
            {
                setup.base.metric: math.nan,  # Tune insists on the metric; NaN never wins
                "trial_id": trial_id,
                TRIAL_ERROR: error_line(f"{type(e).__name__}: {e}"),
                "time_s": time.perf_counter() - t0,
            }
        )


def _run_trial(params: dict, setup: TrialSetup, data: FitData, trial_id: str, folder: Path) -> None:
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
    state_file = folder / TRAIN_STATE_FILE
    resume = None  # a restarted trial's state: fit's resume plus its reports
    if state_file.is_file():
        try:
            resume = torch.load(state_file, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a damaged state costs the trial its progress only
            warning = f"warning: {state_file} unreadable ({error_line(e)}); the trial starts over"
            print(warning, flush=True)
    # Tune's snapshot may know fewer epochs than the state holds: report them all again (a
    # repeated epoch replaces the earlier report of it).
    reports: list[dict] = [] if resume is None else list(resume["reports"])
    for metrics in reports:
        tune.report(metrics)
    if resume is not None and resume.get("finished"):  # see _keep_reports_only
        return
    # A restarted trial's clock goes on from its state (the time it was down is not its).
    t0 = time.perf_counter() - (reports[-1]["time_s"] if reports else 0.0)
    # When it first started: the order of trials.csv (and of ties in the best pick), since a
    # restored ResultGrid lists trials by their last result, newest first.
    identity["started"] = reports[0].get("started", time.time()) if reports else time.time()
    state: dict = {}

    def report(metrics: dict, best: dict | None) -> None:
        metrics = {**metrics, **identity, "time_s": time.perf_counter() - t0}
        reports.append(metrics)
        # Saved before the report: Tune ends a trial it stops (ASHA, max_epochs, the budget)
        # inside tune.report, so nothing after it ran for that epoch (no best checkpoint of a
        # trial's last epoch). Killed before the report, a trial restarted reports it again.
        if best is not None:
            atomic_torch_save(best, folder / BEST_CHECKPOINT_FILE)
        atomic_torch_save({**state, "best_ckpt": None, "reports": reports}, state_file)
        tune.report(metrics)

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
        on_state=state.update,
    )


def _keep_reports_only(state_file: Path, reports: list[dict]) -> None:
    """A finished trial's state becomes its ``reports`` as Tune received them, marked finished.
    Its weights and optimizer state, the largest file, are of no more use; but until
    Ray's next snapshot the trial is listed as running, so a driver killed before then
    restarts it on --resume, and it must report its epochs again and end, not train again."""
    with contextlib.suppress(OSError):  # a full disk: the trial trains again if restarted
        if reports:
            atomic_torch_save({"reports": reports, "finished": True}, state_file)
        else:  # failed before an epoch: nothing to report again
            state_file.unlink(missing_ok=True)


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
    """`ray start --head` turns on token authentication; a joining driver must use it too. Ray
    reads RAY_AUTH_MODE on import, so call this before anything imports ray."""
    if address and (Path.home() / ".ray" / "auth_token").is_file():
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def connect(address: str | None, num_cpus: int | None = None) -> None:
    """Start a local Ray (dashboard off, bound to 127.0.0.1) or join a cluster at ``address``.
    Local workers keep this process's priority: Ray's default nice +15 made trials 1.6-2x
    slower on a shared machine."""
    import ray

    if ray.is_initialized():
        return
    # A Ctrl-C inside ray.init was lost (the search then ran to its end and exited 0) or
    # interrupted its core worker half-built (a segfault at exit): it waits until Ray is up.
    # The mask alone did not hold it off where the process had other threads (a pipeline has
    # run sanity by then): one of them took the signal, and Python ran the handler in the main
    # thread, inside ray.init, all the same (2 segfaults in 9 tries). So the handler only notes it.
    # SIGTERM likewise; restoring its handler after ray.init also undoes Ray's own (a C++ stack
    # dump, then exit 15 or an abort: no last Tune snapshot, no ray.shutdown).
    stops = (signal.SIGINT, signal.SIGTERM)
    pressed: list = []
    previous = {s: signal.signal(s, lambda *args: pressed.append(args)) for s in stops}
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    try:
        _init_ray(address, num_cpus)
    finally:
        for s in stops:  # first: ray.init put Ray's C++ handler in, which a pending SIGTERM hit
            signal.signal(s, previous[s])
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # a pending signal: handled here
    if pressed and callable(previous[pressed[0][0]]):
        previous[pressed[0][0]](*pressed[0])  # the Ctrl-C or SIGTERM, now that Ray is up


def disconnect() -> None:
    """Stop the local Ray (or leave the cluster): CPUs back. ``ray.shutdown`` leaves SIGTERM at
    its default action while Python still names our handler (a SIGTERM while the results were
    written, or in a pipeline's later steps, killed the command with no line): put it back."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
        for s in (signal.SIGINT, signal.SIGTERM):
            if (handler := signal.getsignal(s)) is not None:
                signal.signal(s, handler)


def _init_ray(address: str | None, num_cpus: int | None) -> None:
    import ray

    if address:
        # Fail in seconds, not after Ray's ~14 minutes of retries, when nothing listens there.
        if address != "auto" and not address.startswith("ray://") and ":" in address:
            host, _, port = address.rpartition(":")
            try:
                socket.create_connection((host, int(port)), timeout=5).close()
            except (OSError, ValueError) as e:
                raise UserError(
                    f"--address {address}: no Ray cluster answers there ({e}); start one with "
                    f"`ray start --head`, check HOST:PORT, or leave out --address for a local run"
                ) from None
        try:
            ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UserError(
                f"--address {address}: could not connect to a Ray cluster "
                f"({str(e).splitlines()[0][:160]}); start one with `ray start "
                f"--head` or leave out --address for a local run"
            ) from None
        return
    try:
        ray.init(
            # not address=None: that joins the cluster in RAY_ADDRESS, else the one `ray start`
            # last started on this machine, and then refuses these settings (a ValueError)
            address="local",
            # Ray counts the machine's cores, not the ones this process may use (a Slurm job's
            # or a container's cpuset): it ran more trials at once than there were CPUs
            num_cpus=num_cpus or usable_cores(),
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            _system_config={"worker_niceness": 0},
            log_to_driver=False,
            logging_level="ERROR",
        )
    except OSError as e:  # Ray's sockets live under $RAY_TMPDIR, else $TMPDIR (HPC: often long)
        if "AF_UNIX path length" not in str(e):
            raise
        where = next((k for k in ("RAY_TMPDIR", "TMPDIR") if k in os.environ), "TMPDIR")
        raise UserError(
            f"{where}={os.environ.get(where)}: too long for the paths of Ray's socket files "
            "(107 bytes at most); set RAY_TMPDIR to a short folder, e.g. RAY_TMPDIR=/tmp"
        ) from None


def _storage_filesystem():
    """Whole-file writes: a full disk leaves the last experiment state whole, for --resume."""
    from tune_pets.storage import atomic_local_filesystem

    return atomic_local_filesystem()


def _quiet_ray_output() -> None:
    """Set before ``fit`` (new and restored Tuner): our status line instead of Ray's tables,
    no TensorBoard files of Ray's own, and one line of ours instead of Tune's tracebacks for a
    dead trial process or a failed state save."""
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    logging.getLogger("ray.tune.execution.tune_controller").addFilter(_not_trial_task_failed)
    logging.getLogger("ray.tune.execution.experiment_state").addFilter(_state_not_saved)
    # A failed trial's NaN metric (Optuna records FAIL), and a restarted trial's repeated epochs
    # (Optuna keeps the first value): both expected, so no warning.
    warnings.filterwarnings("ignore", message="The value nan is not acceptable")
    warnings.filterwarnings("ignore", message="The reported value is ignored because this")


def _not_trial_task_failed(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Trial task failed")


_WARNED: set[str] = set()


def _state_not_saved(record: logging.LogRecord) -> bool:
    """Tune's "Saving experiment state ... failed" as one warning line, once per reason."""
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


# ---------------------------------------------------------------- failures and restarts
# Why the running search stopped for want of disk space (set by OptunaExport, read by
# run_search after Tune returns). One search runs per process.
_DISK_FULL: list[str] = []


def is_disk_full(error: BaseException | str | None) -> bool:
    """Whether ``error`` (an exception, its causes, or an error's text) is ENOSPC or EDQUOT."""
    e, seen = error, 0
    while isinstance(e, BaseException) and seen < 10:
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    text = str(error or "")
    full = ("No space left on device", "Disk quota exceeded", "database or disk is full")
    return any(s in text for s in full)


def _stop_if_disk_full(trial, failures: Sequence[str]) -> bool:
    """A trial failed by a full disk would fail on every node: stop the search as Ctrl-C does
    (Tune saves its state), so --resume finishes it once space is freed. True when stopping."""
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


@contextlib.contextmanager
def _ctrl_c_stops_tune(seen: list[bool]) -> Iterator[None]:
    """Ctrl-C during ``tuner.fit()`` stops Tune as its SIGUSR1 does (state saved, trials
    ended) and is noted in ``seen``. Tune's own SIGINT handler is switched off: it marks the
    running trials TERMINATED, so a search stopped after its last trial had started looked
    finished and exited 0. A second Ctrl-C raises KeyboardInterrupt. SIGTERM, where the
    command's handler takes it (``utils.on_sigterm``), does the same."""
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # read when tuner.fit() starts
    previous = {signal.SIGINT: signal.getsignal(signal.SIGINT)}
    if signal.getsignal(signal.SIGTERM) is on_sigterm:
        previous[signal.SIGTERM] = on_sigterm

    def on_ctrl_c(signum, frame) -> None:
        seen.append(True)
        note_stop_signal(signum)
        stop = signal.getsignal(signal.SIGUSR1)
        if callable(stop):
            stop(signal.SIGUSR1, frame)  # Tune's handler; it sets SIGINT back to this one
        for s, handler in previous.items():  # a second one: KeyboardInterrupt
            signal.signal(s, handler)
        if not callable(stop):  # Tune is not running yet
            raise KeyboardInterrupt

    for s in previous:
        signal.signal(s, on_ctrl_c)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _failures(error_file: str | Path | None) -> list[str]:
    """Each failure Tune recorded in a trial's ``error.txt``, oldest first: its process died,
    or Ray could not run it."""
    try:
        text = Path(error_file).read_text("utf-8", errors="replace") if error_file else ""
    except OSError:
        return []
    return [b.strip() for b in re.split(r"(?m)^Failure # \d+ \(occurred at [^)]*\)$", text)[1:]]


def _trial_failures(trial) -> list[str]:
    return _failures(getattr(trial, "error_file", None))  # a stub trial has no error_file


def failure_reason(error: object) -> str:
    """One line on why a trial's run ended in a Ray error: killed from outside, its node lost
    (ActorDiedError / ActorUnavailableError), or else the error's last line."""
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
    """``(error, restarts, restart_reason)`` of a finished trial. Each of ``failures`` was
    followed by a restart, except the last when the trial ended in ``ray_error`` (it died more
    than MAX_TRIAL_RESTARTS times); ``own_error``: the failure the trial reported itself."""
    if ray_error is not None and not failures:
        failures = [ray_error]
    restarted = list(failures[:-1] if ray_error is not None else failures)
    why = failure_reason(restarted[-1]) if restarted else ""
    error = str(own_error) if own_error else ""
    if ray_error is not None and not own_error:
        error = failure_reason(failures[-1])
        if restarted:
            error += f"; not restarted again after {len(restarted)} restart(s)"
    return error, len(restarted), why


# ---------------------------------------------------------------- Ray's classes
@functools.cache
def _ray_classes() -> SimpleNamespace:
    """Our Tune callback, progress reporter and searcher, made on first use: ray may be imported
    only after use_cluster_auth."""
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    class OptunaExport(tune.Callback):
        """Per finished trial: a line on stdout and ``optuna.db`` rewritten (a copy for
        optuna-dashboard; the search's study lives in the searcher), after the first
        EXPORT_EVERY_TRIAL_UP_TO trials less often (``_export``). Its state is snapshotted
        with the searcher's, so --resume goes on from the same trials."""

        def __init__(self, spec: SearchSpec, name: str, db_path: Path):
            self.spec, self.name, self.db_path = spec, name, str(db_path)
            self.reports: dict[str, list[dict]] = {}
            self.finished: dict[str, TrialRecord] = {}

        def on_trial_result(self, iteration, trials, trial, result, **info):
            add_report(self.reports.setdefault(trial.trial_id, []), result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._finish(trials, trial, None)

        def on_trial_error(self, iteration, trials, trial, **info):
            # Tune has ended the trial (status ERROR): --resume does not run it again. Its
            # last failure a full disk, the search stops too (every trial would fail).
            _stop_if_disk_full(trial, _trial_failures(trial))
            try:
                error = error_line(trial.get_pickled_error() or trial.get_error()) or "error"
            except OSError:  # the error file is unreadable: the status still says failed
                error = "error"
            self._finish(trials, trial, error)

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
            finished = {k: r.to_dict() for k, r in self.finished.items()}
            return {"reports": self.reports, "finished": finished}

        def set_state(self, state: dict) -> None:
            self.reports = state["reports"]
            self.finished = {k: TrialRecord.from_dict(d) for k, d in state["finished"].items()}

        def _finish(self, trials, trial, ray_error: str | None) -> None:
            history = self.reports.pop(trial.trial_id, [])
            own = (trial.last_result or {}).get(TRIAL_ERROR)
            error, restarts, why = trial_outcome(_trial_failures(trial), ray_error, own)
            if folder := getattr(trial, "path", None):  # None: a stub trial, no storage
                # A failed trial keeps nothing: restarted, it runs (and fails) again.
                _keep_reports_only(Path(folder) / TRAIN_STATE_FILE, [] if error else history)
            record = make_record(
                trial.trial_id,
                {k: trial.config.get(k) for k in self.spec.space},
                history,
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
            """Rewrite optuna.db from every finished trial. It grows with the trials and holds
            up Tune's loop, so the next one waits EXPORT_SPACING times as long as this one."""
            order = {t.trial_id: i for i, t in enumerate(trials)}
            records = sorted(self.finished.values(), key=lambda r: order.get(r.trial_id, 1e9))
            start = time.monotonic()
            try:
                export_study(records, self.spec, self.name, Path(self.db_path))
            except Exception as e:  # noqa: BLE001 - a derived file must never stop the search
                why = "no space left on device" if is_disk_full(e) else error_line(e)
                print(f"warning: {self.db_path} not updated ({why})", file=sys.stderr)
            self.next_export = time.monotonic() + EXPORT_SPACING * (time.monotonic() - start)

    class StatusLine(tune.ProgressReporter):
        """Every STATUS_EVERY_S seconds: trials done and running (OptunaExport announces each
        finished one)."""

        def __init__(self, num_samples: int):
            self.num_samples = num_samples
            self.start = self.last = 0.0

        def setup(self, start_time=None, total_samples=None, **kwargs):
            self.start = self.last = time.time()  # per run: a resumed search counts anew

        def should_report(self, trials, done=False):
            return done or time.time() - self.last >= STATUS_EVERY_S

        def report(self, trials, done, *sys_info):
            self.last = time.time()
            finished = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
            running = sum(t.status == "RUNNING" for t in trials)
            print(
                f"[{self.last - self.start:.0f}s] {finished}/{self.num_samples} trials done, "
                f"{running} running",
                flush=True,
            )

    class StoppedAsPruned(OptunaSearch):
        """Tells Optuna a trial ASHA stopped before ``max_epochs`` as PRUNED at its last epoch,
        not COMPLETE: an epoch-3 score must not compete with the 30-epoch ones. A result without
        the metric is told as PRUNED by OptunaSearch. (Tune tells no searcher of the trials the
        time budget ends: the search is over then.)"""

        def __init__(self, *args: Any, max_epochs: int, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.max_epochs = max_epochs

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error=False):
            value = (result or {}).get(self.metric)
            scored = not error and isinstance(value, (int, float)) and math.isfinite(value)
            if scored:
                # Tune hands the result that ends a trial only to on_trial_complete, never to
                # on_trial_result: it is the trial's last intermediate value, by which TPE
                # ranks a pruned trial (one stopped at epoch 1 had none: ranked worst).
                self.on_trial_result(trial_id, result)
            if scored and int(result.get("epoch", self.max_epochs)) < self.max_epochs:
                result = {k: v for k, v in result.items() if k != self.metric}
            super().on_trial_complete(trial_id, result, error)

    class SchedulerState(tune.Callback):
        """Tune snapshots the searcher and the callbacks with the experiment, not the scheduler:
        without this a resumed search's ASHA starts with empty rungs, and stops trials that the
        rungs it had would have kept. Its state: the scheduler's own ``save`` file. (The
        scheduler Tune restores and this callback's are one object: both come out of one
        pickle, tuner.pkl, and Tune restores callbacks before it re-adds any trial.)"""

        def __init__(self, scheduler):
            self.scheduler = scheduler

        def get_state(self) -> dict:
            with tempfile.TemporaryDirectory() as tmp:
                self.scheduler.save(f"{tmp}/scheduler.pkl")
                return {"scheduler": Path(tmp, "scheduler.pkl").read_bytes()}

        def set_state(self, state: dict) -> None:
            with tempfile.TemporaryDirectory() as tmp:
                Path(tmp, "scheduler.pkl").write_bytes(state["scheduler"])
                self.scheduler.restore(f"{tmp}/scheduler.pkl")

    return SimpleNamespace(
        OptunaExport=OptunaExport,
        SchedulerState=SchedulerState,
        StatusLine=StatusLine,
        StoppedAsPruned=StoppedAsPruned,
    )


# ---------------------------------------------------------------- the tuner
SCHEDULERS = ("asha", "fifo")


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
    """OptunaSearch behind a ConcurrencyLimiter, ASHA on ``epoch``, dead trials restarted;
    ``searcher``/``scheduler`` pick the benchmark's reference methods. The study lives in the
    searcher, snapshotted with Ray's state, so --resume continues the study that matches it."""
    import optuna
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter

    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "study created" chatter
    _quiet_ray_output()
    if scheduler == "fifo":
        trial_scheduler, kept = FIFOScheduler(), []
    else:
        trial_scheduler = ASHAScheduler(
            time_attr="epoch",
            max_t=spec.max_epochs,
            grace_period=min(spec.grace_period, spec.max_epochs),
            reduction_factor=spec.reduction_factor,
        )
        kept = [_ray_classes().SchedulerState(trial_scheduler)]  # its rungs, for --resume
    run_config = tune.RunConfig(
        name=name,
        storage_path=str(storage_path),
        storage_filesystem=_storage_filesystem(),
        progress_reporter=_ray_classes().StatusLine(spec.num_samples),
        verbose=1 if progress else 0,
        # result.json and progress.csv per trial (what Result.metrics_dataframe reads).
        callbacks=[JsonLoggerCallback(), CSVLoggerCallback(), *callbacks, *kept],
        failure_config=tune.FailureConfig(max_failures=MAX_TRIAL_RESTARTS, fail_fast=False),
    )
    search_alg = _ray_classes().StoppedAsPruned(
        space=optuna_distributions(spec),
        metric=spec.metric,
        mode=spec.mode,
        points_to_evaluate=[first] if first else None,
        sampler=make_sampler(spec, searcher),
        study_name=name,
        max_epochs=spec.max_epochs,
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
def run_search(
    args: Any,  # the parsed command line: --resume, --overwrite, the Ray and resource flags
    spec: SearchSpec,
    base: RunConfig,
    data_dir: Path,
    layout: Layout,
    name: str,
    model: ModelSpec,
    storage_path: Path,
    val_fraction: float,
) -> tuple[list[TrialRecord], SearchSummary] | None:
    """Run (or resume) a search; write best_config.json, trials.csv, optuna.db and the plots.
    Returns None when interrupted (Ctrl-C: Ray saved its state, --resume continues). Cluster
    problems and name clashes fail before anything is written. UserError: every trial failed."""
    import ray
    import torch
    from ray import tune

    resume, overwrite, progress = args.resume, args.overwrite, not args.no_progress
    storage_path = Path(storage_path).resolve()
    exp_dir = storage_path / name
    exists = tune.Tuner.can_restore(str(exp_dir))
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
    if layout.best_config(name).is_file() and not resume and not overwrite:  # another storage
        raise UserError(
            f"search {name!r} already has results in {layout.search(name)}; pass --overwrite "
            f"to replace them, or --name NEW"
        )
    try:  # Ray's pyarrow error for a folder it cannot make has no file name: a traceback
        storage_path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = f"{e.strerror}; pick a folder you can write"
        raise UserError(f"--storage-path {storage_path}: {why}") from None
    if warning := asha_warning(spec):
        print(warning, file=sys.stderr, flush=True)
    ctrl_c: list[bool] = []
    # From Ray's start on: a Ctrl-C before the trials run (Ray swallowed some) stops them too.
    with _ctrl_c_stops_tune(ctrl_c):
        connect(args.address, args.num_cpus)
        cluster = ray.cluster_resources()
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        largest = {k: max((n.get(k, 0) for n in nodes), default=0) for k in ("CPU", "GPU")}
        chosen = choose_resources(spec, cluster, model.kind, args, largest)
        print(chosen.line(cluster), flush=True)
        asked = spec
        spec = spec.replace(
            max_concurrent=chosen.max_concurrent, resources={"cpu": chosen.cpu, "gpu": chosen.gpu}
        )
        tb_root = layout.search_tb(name).resolve()
        if not resume:
            # A new search replaces the old one's Ray state, TensorBoard logs and results, so
            # neither TensorBoard nor optuna-dashboard mixes two searches, and a new search that
            # fails leaves no old best_config.json for reproduce to retrain.
            for path in (exp_dir if exists else None, tb_root):
                if path is not None and path.exists():
                    shutil.rmtree(path)
            old = [layout.best_config(name), layout.trials_csv(name), layout.search_spec(name)]
            old += [layout.optuna_db(name), *layout.search(name).glob("*.png")]
            for path in old:
                path.unlink(missing_ok=True)

        t0 = time.time()
        try:
            data = load_fit_data(
                base,
                data_dir,
                val_fraction=val_fraction,
                split_file=layout.search_val_split(name),
                reuse_split=resume,
                cache_dir=args.cache_dir,
                skip_bad=args.skip_bad_images,
                img_sizes=img_sizes(spec, base),
                progress=progress,
                # where a features model's frozen backbone runs (once, before the trials)
                device=torch.device("cuda" if torch.cuda.is_available() else "cpu"),
                spec=model,
            )
        except BaseException:
            if not resume:  # a search that never ran leaves no split (so no empty folder)
                layout.search_val_split(name).unlink(missing_ok=True)
            raise
        prep_s = time.time() - t0
        print(
            f"data: {data.info['n_train']} train / {data.info['n_val']} val images, "
            f"{data.num_classes} classes ({data.kind}, ready in {prep_s:.1f}s)",
            flush=True,
        )
        setup = TrialSetup(base, model, str(tb_root), tuple(spec.space), str(exp_dir))
        fn = tune.with_resources(
            tune.with_parameters(trainable, setup=setup, data=data), spec.resources
        )
        if resume:
            _quiet_ray_output()
            # Unfinished trials continue (said outright: --resume must not depend on Ray's default).
            tuner = tune.Tuner.restore(
                str(exp_dir),
                trainable=fn,
                resume_unfinished=True,
                storage_filesystem=_storage_filesystem(),
            )
            print(f"resuming {name!r} from {exp_dir}", flush=True)
        else:
            # Saved once the data is known good: --resume continues from it.
            limit = chosen.max_concurrent
            save_spec(asked, val_fraction, base, data_dir, limit, layout.search_spec(name))
            export = _ray_classes().OptunaExport(spec, name, layout.optuna_db(name))
            first = first_point(spec, model)
            tuner = make_tuner(fn, spec, storage_path, name, first, progress, callbacks=[export])
        t1 = time.time()
        _DISK_FULL.clear()
        if ctrl_c:  # a Ctrl-C whose KeyboardInterrupt Ray swallowed: no trial starts
            raise KeyboardInterrupt
        grid = tuner.fit()
    search_s, prep_s, sessions = add_session(layout.search_spec(name), time.time() - t1, prep_s)
    if _DISK_FULL:
        raise OSError(errno.ENOSPC, f"{_DISK_FULL[0]} under {storage_path}")
    # Ray returns from fit when stopped too, after saving its state: by Ctrl-C, or by a SIGUSR1
    # from outside (then some trial is unfinished, or fewer than num_samples were started), or
    # by the time budget. Tune counts the budget over every session of a resumed search: a
    # resumed one that stops without a Ctrl-C spent it (the time of a killed session is lost).
    budget_spent = spec.time_budget_s is not None and (search_s >= spec.time_budget_s or resume)
    finished = grid.num_terminated + grid.num_errors
    if ctrl_c or not budget_spent and (finished < len(grid) or len(grid) < spec.num_samples):
        return None
    records = records_from_grid(grid, spec)
    _remove_orphans(grid, records, exp_dir, tb_root)

    write_trials_csv(records, spec, layout.trials_csv(name))
    export_study(records, spec, name, layout.optuna_db(name))
    best = pick_best(records, spec)
    if best is None:
        errors = "; ".join(sorted({r.error for r in records if r.error}))[:400]
        if not errors and spec.time_budget_s is not None:  # the budget ran out first
            # A resumed search keeps the budget it was started with.
            more = "start it anew with --overwrite and a larger" if resume else "raise"
            raise UserError(
                f"no trial finished an epoch within the time budget ({spec.time_budget_s:g} s); "
                f"{more} --time-budget-s"
            )
        raise UserError(
            f"all {len(records)} trials failed ({errors}); see {layout.trials_csv(name)}"
        )
    run = {
        "name": name,
        "experiment_dir": str(exp_dir),
        "tensorboard_dir": str(tb_root),
        "wall_time_s": round(search_s, 1),  # over every session (a killed one's is not known)
        "data_prep_s": round(prep_s, 1),
        "sessions": sessions,  # 1 + the times it was resumed
    }
    val_split = layout.search_val_split(name)
    summary = make_summary(
        best, records, spec, base, run=run, data=data.info, val_split_file=val_split, env=env_info()
    )
    summary.write(layout.best_config(name))
    write_plots(records, spec, name, layout)
    return records, summary


def records_from_grid(grid, spec: SearchSpec) -> list[TrialRecord]:
    """Ray's ``ResultGrid`` as records, in the order the trials started. A trial that failed
    before its first report has only Tune's auto-filled result (its ``trial_id``, ``config``
    once its actor started); failing that, a counter names it."""

    def started(result) -> float:
        df = result.metrics_dataframe
        return float(df["started"].min()) if df is not None and "started" in df else math.inf

    records = []
    for i, result in enumerate(sorted(grid, key=started)):  # stable: unreported ones last
        df = result.metrics_dataframe
        config = result.config or {}
        error, restarts, why = trial_outcome(
            _failures(Path(result.path) / "error.txt" if result.path else None),
            None if result.error is None else error_line(result.error),
            (result.metrics or {}).get(TRIAL_ERROR),
        )
        best = Path(result.path) / BEST_CHECKPOINT_FILE if result.path else None
        records.append(
            make_record(
                str((result.metrics or {}).get("trial_id") or f"unreported_{i + 1}"),
                {k: config.get(k) for k in spec.space},
                [] if df is None else df.to_dict("records"),
                spec,
                error=error,
                checkpoint=str(best) if best is not None and best.is_file() else None,
                restarts=restarts,
                restart_reason=why,
            )
        )
    return records


def _remove_orphans(grid, records: list[TrialRecord], exp_dir: Path, tb_root: Path) -> None:
    """A search killed between two state snapshots may leave folders of a trial started after
    the last one, which Ray reruns under a new id: remove them, so every folder is one trial."""
    known_dirs = {Path(r.path).name for r in grid if r.path}
    known_ids = {r.trial_id for r in records}
    for d in list(exp_dir.glob("trial_*")) if known_dirs else []:
        if d.is_dir() and d.name not in known_dirs:
            shutil.rmtree(d, ignore_errors=True)
    for d in list(tb_root.iterdir()) if tb_root.is_dir() else []:
        if d.is_dir() and d.name not in known_ids:
            shutil.rmtree(d, ignore_errors=True)
