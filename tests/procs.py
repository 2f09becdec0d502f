"""Process helpers for tests that start CLIs (and so Ray) in their own session: find and kill
everything a ``start_new_session=True`` child left behind, and nothing else on the machine."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes in session ``sid``: one start_new_session child and everything
    it spawned (Ray's raylet, gcs_server, workers, agents)."""
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
