"""Small shared helpers: user-facing errors, the CLI wrapper, atomic writes, seeding, env info.

with atomic_path("out/metrics.csv") as tmp:  # readers never see a half-written file
    tmp.write_text(text)
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import platform
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import tune_pets


class UserError(Exception):
    """An expected failure caused by input: printed as one line, exit code 2."""


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


_TERMINATED: list[int] = []


def on_sigterm(signum, frame) -> None:
    """SIGTERM (``kill``, a batch scheduler's time limit or preemption) ends a command as
    Ctrl-C does: the same KeyboardInterrupt paths save a checkpoint or Tune's state and remove
    temp files, and the exit code is 143. By default it killed the command where it stood
    (temp files stayed; a search's Ray aborted with a C++ stack dump)."""
    note_stop_signal(signum)
    raise KeyboardInterrupt


def note_stop_signal(signum: int) -> None:
    """Note the signal that stops the command (for ``stopped_by``), where a handler other
    than ``on_sigterm`` takes it."""
    if signum == signal.SIGTERM:
        _TERMINATED.append(signum)


def stopped_by() -> tuple[str, int]:
    """How the command was stopped, for its last line: ("interrupted", 130) for Ctrl-C,
    ("terminated", 143) for SIGTERM."""
    return tune_pets.STOPPED_BY[signal.SIGTERM if _TERMINATED else signal.SIGINT]


def cli_main(
    main: Callable[[Sequence[str] | None], int | None],
    argv: Sequence[str] | None = None,
    prog: str = "tune_pets",
) -> None:
    """Run a CLI ``main``, turning expected failures into one line and an exit code;
    ``--debug`` anywhere in argv (or TUNE_PETS_DEBUG=1) also prints the traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("TUNE_PETS_DEBUG") == "1"
    tune_pets.stop_if_interrupted_while_starting(prog)
    _TERMINATED.clear()
    # Not where SIGTERM is ignored, nor off the main thread (signal.signal refuses there).
    term = threading.current_thread() is threading.main_thread()
    term = term and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    if term:
        signal.signal(signal.SIGTERM, on_sigterm)
    try:
        rc = main([a for a in argv if a != "--debug"])
    except UserError as e:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        # A path option that names a file where a folder is due, a folder it may not write, a
        # read-only or a full disk: one line naming the file.
        path_error = isinstance(
            e, (NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError)
        ) or e.errno in (errno.ENAMETOOLONG, errno.ELOOP)
        disk_error = e.errno in (*DISK_FULL_ERRNOS, errno.EROFS)  # the disk, not the code
        if debug or not e.filename or not (path_error or disk_error):
            raise
        fix = (
            "free space, then run the same command again; files written before are whole"
            if e.errno in DISK_FULL_ERRNOS
            else "check the path options: --data-dir, --output-dir, --artifacts-dir, "
            "--runs-dir, --cache-dir or $TUNE_PETS_CACHE"
        )
        target = e.filename2 or e.filename  # a rename's destination, not its temp file
        print(f"{prog}: error: {target}: {e.strerror} ({fix})", file=sys.stderr)
        sys.exit(2)
    except (MemoryError, RuntimeError) as e:
        # numpy's MemoryError, torch's CPU allocator and CUDA out-of-memory (RuntimeErrors):
        # the sizes asked for, not the code. Any other RuntimeError is a bug: its traceback.
        oom = isinstance(e, MemoryError) or re.search(r"out of memory|can't allocate", str(e))
        if debug or not oom:
            raise
        print(
            f"{prog}: error: out of memory ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
            "use a smaller --batch-size, --img-size or --backbone-batches",
            file=sys.stderr,
        )
        sys.exit(2)
    except KeyboardInterrupt as e:
        # Commands may say what to do next (e.g. the resume command) in the exception's text.
        what = str(e) or (
            "files written so far are complete (writes are atomic); run the same command "
            "again to start over"
        )
        how, code = stopped_by()
        print(f"\n{prog}: {how}: {what}", file=sys.stderr)
        # A KeyboardInterrupt that passed through exec() of a string on its way (a lazy import)
        # sets CPython's "unhandled KeyboardInterrupt" flag, and python -m then exits by
        # SIGINT (-2) whatever sys.exit says (3 of 15 evaluate/reproduce runs). Each exec of a
        # string clears the flag first.
        exec("pass")  # noqa: S102
        sys.exit(code)
    finally:
        if term:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sys.exit(rc or 0)


# ---------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterable[Path]:
    """Yield a temp path next to ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; use the usual mode
        os.replace(tmp, path)
    except OSError as e:
        if not e.errno and re.fullmatch(r"\d+ requested and \d+ written", str(e)):
            e.errno, e.strerror = errno.ENOSPC, "No space left on device"  # numpy's short write
        if e.filename or not e.errno:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e  # a failed write names no file
    finally:
        Path(tmp).unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def atomic_write_csv(
    path: str | os.PathLike, rows: list[dict], fieldnames: Sequence[str] | None = None
) -> None:
    buf = io.StringIO()
    fieldnames = list(fieldnames or (rows[0].keys() if rows else []))
    writer = csv.DictWriter(buf, fieldnames=fieldnames, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to memory, then an atomic write: a full disk raises OSError(ENOSPC)
    naming ``path``, not torch's RuntimeError that names no cause."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer, np.floating, np.ndarray)):
        return o.tolist()  # Python ints, floats or lists
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(
            f"{what} {path} is not valid JSON ({e}); delete it or pass another file"
        ) from None


def upsert_csv_row(
    path: str | os.PathLike,
    row: dict,
    key: Sequence[str],
    fieldnames: Sequence[str],
    insert: bool = True,
) -> None:
    """Insert ``row`` into the CSV at ``path``, replacing the rows with the same ``key`` values
    (``insert=False``: only remove them). Writers in other processes wait their turn (read,
    change, replace: two at once lost rows); a file that is not such a table is an error, never
    overwritten."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _folder_lock(path.parent):
        rows: list[dict] = []
        if path.is_file():
            try:
                with path.open(newline="", encoding="utf-8") as f:
                    reader = csv.DictReader(f)
                    rows = list(reader)
                table = set(key) <= set(reader.fieldnames or key)  # an empty file is one
            except (UnicodeDecodeError, csv.Error):
                table = False
            if not table:
                raise UserError(
                    f"{path}: not a table with the columns {', '.join(fieldnames)}; move it "
                    "away (it is left as it is) and run again"
                )
        rows = [r for r in rows if any(str(r.get(k)) != str(row[k]) for k in key)]
        atomic_write_csv(path, [*rows, dict(row)] if insert else rows, fieldnames)


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """A blocking ``flock`` on ``folder`` itself (no lock file left behind), where there is one."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


# ---------------------------------------------------------------- seeding and environment
def seed_everything(seed: int, deterministic: bool = True) -> dict:
    """Seed python, numpy and torch; with ``deterministic``, make torch use deterministic
    algorithms (an op without one raises). Returns what was set, for config.json."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        enable_cuda_determinism()
        # Nothing here reads uninitialised memory; filling it cost up to 31 % of reproduce's CPU.
        torch.utils.deterministic.fill_uninitialized_memory = False
    # Both ways: a deterministic run earlier in this process must not leave it on.
    torch.backends.cudnn.deterministic = deterministic
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = not deterministic
    return {"seed": seed, "deterministic": deterministic}


def enable_cuda_determinism() -> None:
    """cuBLAS reads this workspace setting, needed for deterministic matmuls, at its first
    call: commands that want determinism call this before any CUDA work."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def usable_cores() -> int:
    """The cores this process may use (its CPU affinity, where the OS has one), at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cores or 1)


def env_info() -> dict:
    """Library versions, hardware and git commit, recorded next to every result."""
    from importlib import metadata

    import torch

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = None
    cpu = None
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")), None)
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu": cpu or platform.processor() or "unknown",
        "cpu_count": os.cpu_count(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git_commit": commit or None,
    }
    # Versions from package metadata: importing ray/optuna just for this costs seconds.
    for key in ("torchvision", "timm", "ray", "optuna", "sklearn"):
        try:
            info[key] = metadata.version({"sklearn": "scikit-learn"}.get(key, key))
        except metadata.PackageNotFoundError:
            info[key] = None
    return info


# ---------------------------------------------------------------- one process at a time
class LockHeld(Exception):
    """``exclusive_lock``'s file is locked by another process; the text: its holder's line."""


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[bool]:
    """Hold an ``flock`` on ``path`` for the block, the file naming this process (pid, host,
    start time); if another process holds it, raise LockHeld naming that one. The kernel drops
    an flock when its process dies, so a killed holder leaves a file naming a dead process but
    no lock; the holder deletes the file. Yields False (no lock) where there is no fcntl."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise LockHeld(holder) from None
        # The previous holder deletes the file when done: a lock on its deleted file is no lock.
        if path.exists() and os.stat(path).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)
    try:
        holder = f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%F %T')}"
        with contextlib.suppress(OSError):  # the lock holds without its text (a full disk)
            os.ftruncate(fd, 0)  # a killed holder's line
            os.pwrite(fd, (holder + "\n").encode(), 0)
        yield True
    finally:
        path.unlink(missing_ok=True)  # still locked here: no other process is inside
        os.close(fd)


def _read_holder(fd: int, wait_s: float = 3.0) -> str:
    """The holder's line from its lock file. It is written just after the lock is taken, so a
    process started at the same moment may find the file empty: wait for it."""
    deadline = time.monotonic() + wait_s
    while True:
        text = os.pread(fd, 1000, 0).decode("utf-8", "replace")
        if text.endswith("\n") or time.monotonic() > deadline:
            return text.strip() or "starting up"
        time.sleep(0.02)


@contextlib.contextmanager
def command_lock(path: Path, running: str, hint: str) -> Iterator[None]:
    """Hold ``path`` locked while a command runs: a second one refuses at once in one line,
    naming the running one (``exclusive_lock``: a killed holder leaves no lock). Folders made
    here stay only if the command wrote into them (a refused start leaves nothing)."""
    made = [d for d in (path.parent, *path.parent.parents) if not d.exists()]  # deepest first
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with exclusive_lock(path):
            yield
    except LockHeld as held:
        raise UserError(f"{running} is already running ({held}; lock {path}); {hint}") from None
    finally:
        for folder in made:
            with contextlib.suppress(OSError):  # not empty: the command's results are in it
                folder.rmdir()
