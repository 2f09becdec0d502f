"""Hugging Face hub access shared by ``prepare`` (the dataset) and ``backbone`` (the ViT weights):
offline detection, one short reachability probe and telling network errors from others.

    why = offline_reason() or hub_unreachable()  # None: online
"""

from __future__ import annotations

import contextlib
import importlib
import os
import socket
import ssl
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

# huggingface_hub's own retries take 25-55 s offline; a reachable hub answers well within this.
HUB_PROBE_TIMEOUT_S = 3.0


def offline_reason(datasets_too: bool = False) -> str | None:
    """Why offline mode is on (``"<VARIABLE> is set"``, naming the one that is), or None when
    it is off. With ``datasets_too``, HF_DATASETS_OFFLINE counts too.

    The environment is read as well: huggingface_hub reads its constant only once, at import."""
    keys = ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"] + (["HF_DATASETS_OFFLINE"] * datasets_too)
    for key in keys:
        if os.environ.get(key, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"{key} is set"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None and constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"  # in the environment when huggingface_hub was imported
    return None


def hub_unreachable(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """Why the hub cannot be reached (a short phrase), or None when it answers.

    One HEAD request in a thread, since a hanging DNS lookup ignores socket timeouts. Any HTTP
    answer and a TLS failure (the real client may trust other certificates) count as reachable.
    """
    from huggingface_hub import constants

    url = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    answer: list[str | None] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s)
            answer.append(None)
        except urllib.error.HTTPError:
            answer.append(None)  # the server answered
        except urllib.error.URLError as e:
            answer.append(None if isinstance(e.reason, ssl.SSLError) else _reason(e.reason))
        except (OSError, ValueError) as e:
            answer.append(_reason(e))

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not answer:
        return f"no answer from {url} within {timeout_s:g} s"
    return None if answer[0] is None else f"{url}: {answer[0]}"


def _reason(e: object) -> str:
    if isinstance(e, socket.gaierror):
        return f"cannot resolve the host name ({e.strerror or e})"
    if isinstance(e, TimeoutError):  # socket.timeout too (an alias since Python 3.10)
        return "connection timed out"
    return first_line(e) if isinstance(e, BaseException) else str(e)


@contextlib.contextmanager
def hub_offline_mode() -> Iterator[None]:
    """For this block, huggingface_hub (and datasets, if imported) use only their local caches.

    Their offline switches are constants read once, at import, so they are set and restored."""
    importlib.import_module("huggingface_hub.constants")
    switches = [
        ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
        ("datasets.config", "HF_HUB_OFFLINE"),
        ("datasets.config", "HF_DATASETS_OFFLINE"),
    ]
    saved = []
    for module_name, attr in switches:
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, attr):
            saved.append((module, attr, getattr(module, attr)))
            setattr(module, attr, True)
    try:
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


def _in_chain(e: BaseException, *names: str) -> bool:
    """Whether ``e`` or an exception it was raised from is one of the named classes (those of
    libraries that are not installed are skipped)."""
    found = []
    for name in names:
        module, _, attr = name.rpartition(".")
        with contextlib.suppress(ImportError, AttributeError):
            found.append(getattr(importlib.import_module(module), attr))
    types, seen = tuple(found), set()
    while e is not None and id(e) not in seen:
        if isinstance(e, types):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def is_network_error(e: BaseException) -> bool:
    """The failure is the network (unreachable, timed out, offline), not the request itself."""
    return _in_chain(
        e,
        "builtins.ConnectionError",
        "builtins.TimeoutError",
        "socket.gaierror",
        "huggingface_hub.errors.LocalEntryNotFoundError",  # not cached and could not download
        "httpx.TransportError",
        "requests.exceptions.ConnectionError",
        "requests.exceptions.Timeout",
    )


def is_not_found_error(e: BaseException) -> bool:
    """The hub answered: no such repo, revision or file, or no access to it (gated repos too)."""
    return _in_chain(
        e,
        "datasets.exceptions.DatasetNotFoundError",
        "huggingface_hub.errors.RepositoryNotFoundError",
        "huggingface_hub.errors.RevisionNotFoundError",
    )


def first_line(e: BaseException, limit: int = 160) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return text if len(text) <= limit else text[:limit] + "..."
