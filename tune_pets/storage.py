"""The filesystem Ray Tune writes ``--storage-path`` through: the local filesystem, except that
every file is written whole or not at all (a temporary file beside it, renamed over the old one
once complete). A full disk then leaves the previous ``experiment_state-*.json`` (what
``--resume`` reads) instead of a truncated one, so ``--resume`` continues once space is freed.

The files of one experiment snapshot (``SNAPSHOT_KINDS``) are also renamed into place together,
once all are written whole: a disk that fills between the small searcher state and the large
trial list would otherwise leave a mix that ``--resume`` reads as a search with trials missing.

    fs = atomic_local_filesystem()     # tune.RunConfig(storage_filesystem=fs), Tuner.restore(...)
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

# What Ray Tune writes into the experiment folder at every snapshot, ``<kind>-<session>.<ext>``
# (ray/tune: TuneController, SearchGenerator, Searcher and CallbackList CKPT_FILE_TMPL).
SNAPSHOT_KINDS = ("experiment_state", "searcher-state", "search_gen_state", "callback-states")
# Tune writes the callbacks' file only when some callback has state (tune_pets' always has).
OPTIONAL_KIND = "callback-states"
_SNAPSHOT_FILE = re.compile(rf"^({'|'.join(map(re.escape, SNAPSHOT_KINDS))})-(.+)\.(json|pkl)$")


class _AtomicWriter:
    """A write-only file object for ``pa.PythonFile``: writes go to a temporary file beside the
    target, which a clean ``close`` hands to ``commit`` (default: rename it over the target)
    and which is deleted when any write, flush or the close fails."""

    def __init__(self, path: str, commit: Callable[[_AtomicWriter], None] | None = None):
        self.path = path
        self.commit = commit or (lambda w: os.replace(w.tmp, w.path))
        self.on_failure: Callable[[], None] = lambda: None  # called once if the file is given up
        fd, self.tmp = tempfile.mkstemp(
            dir=os.path.dirname(path) or ".", prefix=f".{os.path.basename(path)}.", suffix=".tmp"
        )
        os.fchmod(fd, 0o644)  # as an ordinary new file, not mkstemp's 0600
        self.file = os.fdopen(fd, "wb")
        self.failed = False

    def _or_discard(self, op: Callable, *args):
        try:
            return op(*args)
        except BaseException:
            self._discard()
            raise

    def write(self, data) -> int:
        return self._or_discard(self.file.write, data)

    def flush(self) -> None:
        self._or_discard(self.file.flush)

    def _discard(self) -> None:
        """Delete the temporary file now: after a failed write pyarrow may never close the
        stream, and a partial file left behind would keep the disk full."""
        if self.failed:
            return
        self.failed = True
        try:
            self.file.close()
        except OSError:
            pass
        finally:
            Path(self.tmp).unlink(missing_ok=True)
            self.on_failure()

    def tell(self) -> int:
        return self.file.tell()

    @property
    def closed(self) -> bool:
        return self.file.closed

    def close(self) -> None:
        if not self.file.closed:
            self._or_discard(self.file.close)  # the last buffered bytes: a full disk shows here
            self.commit(self)


@dataclass
class _Snapshot:
    """The files of one experiment snapshot being written (one session's, one round)."""

    seen: set[str] = field(default_factory=set)  # kinds opened in this round
    ready: dict[str, _AtomicWriter] = field(default_factory=dict)  # written whole, held back
    failed: bool = False
    committed: bool = False

    def drop(self) -> None:
        """Give the round up: its held-back files are deleted, its later ones dropped."""
        self.failed = True
        for w in self.ready.values():
            Path(w.tmp).unlink(missing_ok=True)
        self.ready.clear()


def _has_file(folder: str, prefix: str) -> bool:
    try:
        return any(n.startswith(prefix) for n in os.listdir(folder))
    except OSError:
        return False


class _Snapshots:
    """Holds back each snapshot file until its round is complete. A round writes every kind
    once: a kind opened again starts the next round, and a round with a failed file is dropped
    whole. The callbacks' file is waited for once one exists; a session's first one, if it
    comes after the rest of its round, is renamed on its own."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # pyarrow copies files on several threads
        self.rounds: dict[tuple[str, str], _Snapshot] = {}

    def writer(self, path: str, kind: str, session: str) -> _AtomicWriter:
        key = (os.path.dirname(path), session)
        with self.lock:
            snap = self.rounds.setdefault(key, _Snapshot())
            if kind in snap.seen:  # the next round: an unfinished one is given up
                snap.drop()
                snap = self.rounds[key] = _Snapshot()
            snap.seen.add(kind)
        writer = _AtomicWriter(path, commit=lambda w: self._ready(key, snap, kind, w))
        writer.on_failure = lambda: self._failed(snap)
        return writer

    def _ready(
        self, key: tuple[str, str], snap: _Snapshot, kind: str, writer: _AtomicWriter
    ) -> None:
        with self.lock:
            if snap.failed or self.rounds.get(key) is not snap:  # given up, or an old round
                os.unlink(writer.tmp)
                return
            if snap.committed:  # the callbacks' file of a first snapshot, come after the rest
                os.replace(writer.tmp, writer.path)
                return
            snap.ready[kind] = writer
            needed = set(SNAPSHOT_KINDS) - {OPTIONAL_KIND}
            if OPTIONAL_KIND in snap.seen or _has_file(key[0], f"{OPTIONAL_KIND}-{key[1]}."):
                needed.add(OPTIONAL_KIND)
            if needed <= set(snap.ready):
                # the trial list last: a reader that finds it finds the rest of its snapshot
                for k in sorted(snap.ready, key=lambda k: k == "experiment_state"):
                    try:
                        os.replace(snap.ready[k].tmp, snap.ready[k].path)
                    except OSError:  # a later file of the round must not commit it again
                        snap.drop()
                        raise
                    del snap.ready[k]
                snap.committed = True

    def _failed(self, snap: _Snapshot) -> None:
        with self.lock:
            snap.drop()


def _local(name: str) -> Callable:
    """A handler method that is ``pyarrow.fs.LocalFileSystem``'s own ``name``."""
    return lambda self, *args: getattr(self.fs, name)(*args)


class AtomicLocalFileSystemHandler(pafs.FileSystemHandler):
    """``pyarrow.fs.LocalFileSystem`` with whole-file ``open_output_stream`` and ``copy_file``;
    everything else (appends too) is passed through."""

    def __init__(self) -> None:
        self.fs = pafs.LocalFileSystem()
        self.snapshots = _Snapshots()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AtomicLocalFileSystemHandler)

    def __hash__(self) -> int:
        return hash(AtomicLocalFileSystemHandler)

    def __reduce__(self):  # sent to every trial's process with the storage settings
        return (AtomicLocalFileSystemHandler, ())

    def get_type_name(self) -> str:
        return "tune_pets-atomic-local"

    normalize_path = _local("normalize_path")
    get_file_info = _local("get_file_info")
    get_file_info_selector = _local("get_file_info")
    delete_dir = _local("delete_dir")
    delete_file = _local("delete_file")
    move = _local("move")
    open_input_stream = _local("open_input_stream")
    open_input_file = _local("open_input_file")

    # These three pass by keyword: LocalFileSystem's own signatures differ after the path.
    def create_dir(self, path: str, recursive: bool) -> None:
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def open_append_stream(self, path: str, metadata):
        return self.fs.open_append_stream(path, metadata=metadata)

    def delete_root_dir_contents(self) -> None:
        raise OSError("refusing to delete the contents of the root folder")

    def copy_file(self, src: str, dest: str) -> None:
        writer = _AtomicWriter(dest)
        try:
            with self.fs.open_input_stream(src) as source:
                while chunk := source.read(1 << 20):
                    writer.write(chunk)
        except BaseException:
            writer._discard()
            raise
        writer.close()

    def open_output_stream(self, path: str, metadata):
        m = _SNAPSHOT_FILE.match(os.path.basename(path))
        writer = self.snapshots.writer(path, m[1], m[2]) if m else _AtomicWriter(path)
        return pa.PythonFile(writer, mode="w")


def atomic_local_filesystem() -> pafs.PyFileSystem:
    """The filesystem to give Ray Tune for a local (or NFS-mounted) ``--storage-path``."""
    return pafs.PyFileSystem(AtomicLocalFileSystemHandler())
