"""The one way tests run tune_pets commands as a user would: ``python -m tune_pets.<cmd>`` in a
subprocess of its own session, offline, with a clean Ray environment; whatever the command
left behind (Ray's gcs_server, raylet, workers) is killed by session id afterwards, so no test
touches processes that another program on the machine started, and ``ray stop`` is never used.

    from helpers import run, start, ok, error_line, kill_session, leftovers
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TIMEOUT_S = 240


def env(**extra: str) -> dict:
    """The environment of a command under test: offline hub, no inherited Ray cluster settings,
    unbuffered output, the checkout importable."""
    e = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS", "TUNE_PETS_DEBUG")
    }
    e.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), e.get("PYTHONPATH")])),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONUNBUFFERED="1",
        PYTHONIOENCODING="utf-8",
    )
    e.update(extra)
    return e


def start(
    cmd: str,
    args,
    cwd: Path,
    *,
    extra_env: dict | None = None,
    log: Path | None = None,
    err_log: Path | None = None,
):
    """Start ``python -m tune_pets.<cmd> ARGS`` in a new session; output to pipes, or stdout to
    ``log`` and stderr to ``err_log`` (to ``log`` too when not given)."""
    cwd = Path(cwd)
    cwd.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", f"tune_pets.{cmd}", *map(str, args)]
    # The files are closed by the OS when the process ends.
    out = subprocess.PIPE if log is None else open(log, "w")  # noqa: SIM115
    err = subprocess.PIPE if log is None else subprocess.STDOUT
    if log is not None and err_log is not None:
        err = open(err_log, "w")  # noqa: SIM115
    return subprocess.Popen(
        argv,
        cwd=cwd,
        env=env(**(extra_env or {})),
        stdout=out,
        stderr=err,
        text=True,
        encoding="utf-8",
        errors="replace",
        start_new_session=True,
    )


def run(
    cmd: str,
    args,
    cwd: Path,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    extra_env: dict | None = None,
) -> subprocess.CompletedProcess:
    """Run a command to completion (or fail the test at ``timeout``); kill its leftovers."""
    proc = start(cmd, args, cwd, extra_env=extra_env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)
        out, err = proc.communicate()
        pytest.fail(
            f"{cmd} still running after {timeout}s\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"
        )
    finally:
        leftover = leftovers(proc.pid)
        assert not leftover, f"processes survived {cmd}: {leftover}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_script(script: Path, args, cwd: Path, *, timeout: float, **extra_env: str):
    """Run ``python SCRIPT ARGS`` (a benchmark) to completion in a new session; fail the test
    on a non-zero exit or on processes it left behind (Ray's). Returns its CompletedProcess."""
    argv = [sys.executable, str(script), *map(str, args)]
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env=env(**extra_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        assert not leftovers(proc.pid), f"{script.name} left processes behind (Ray?)"
    return ok(subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr))


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"
    )
    return proc


def error_line(proc: subprocess.CompletedProcess) -> str:
    """Exit 2 and a single ``error:`` line on stderr; returns that line."""
    assert proc.returncode == 2, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    )
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert lines and "error:" in lines[-1], proc.stderr[-3000:]
    errors = [ln for ln in lines if "error:" in ln]
    assert len(errors) == 1, proc.stderr[-3000:]
    return lines[-1]


def copy_checkout(dest: Path) -> Path:
    """What a clone holds: tracked files plus untracked ones git does not ignore (no build/,
    no caches), copied to ``dest``. Callers skip without git: see ``has_checkout``."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():  # a tracked file deleted in the working tree is not copied
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def has_checkout() -> bool:
    return bool(shutil.which("git")) and (REPO / ".git").exists()


# ---------------------------------------------------------------- process sessions
def session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes in session ``sid``: one start_new_session child and everything
    it spawned."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def leftovers(sid: int, grace_s: float = 15.0) -> list[int]:
    """What a finished command left behind: the processes of session ``sid`` still alive
    ``grace_s`` after it ended (Ray's exit on their own once it shuts down), which are then
    killed. (Asking kill_session instead could not fail: it kills them first.)"""
    deadline = time.monotonic() + grace_s
    while (alive := session_pids(sid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    kill_session(sid)
    return alive


def kill_session(sid: int, sig: int = signal.SIGKILL, wait_s: float = 20.0) -> list[int]:
    """Signal every process of session ``sid``; return those still alive after ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = session_pids(sid)
        if not alive or time.monotonic() > deadline:
            return alive
        for pid in alive:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(0.3)
