"""What the embedded servers share: ports, locks, log tails, and stopping leftovers at exit."""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import importlib.util
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

_log = logging.getLogger(__name__)


HOST = "127.0.0.1"


PORT_ATTEMPTS = 3


class EmbeddedServiceError(RuntimeError):
    """An embedded server could not be found, started or stopped."""


# --------------------------------------------------------------------------------------------
# helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


thread_lock = threading.RLock()


@contextlib.contextmanager
def locked(lock_file: Path) -> Iterator[None]:
    """Serialise start/stop of one server across threads and processes."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with thread_lock, open(lock_file, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def tail(path: Path, start: int = 0, limit: int = 4000) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(start)
            data = handle.read()
    except OSError:
        return "<no log>"
    return data[-limit:].decode("utf-8", "replace")


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def package_dir(name: str) -> Path | None:
    """Directory of an installed package, found without importing (executing) it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


# Servers started (or adopted) by this process and not yet stopped: stopped at interpreter exit
# so that an exception or a forgotten stop does not leave them running. Forked children inherit
# atexit hooks, hence the pid check.
_running: dict[tuple[str, Path], tuple[int, Callable[[], None]]] = {}
_hook_installed = False


def remember(kind: str, directory: Path, stop: Callable[[], None]) -> None:
    global _hook_installed
    with thread_lock:
        _running[(kind, directory)] = (os.getpid(), stop)
        if not _hook_installed:
            atexit.register(_stop_leftovers)
            _hook_installed = True


def forget(kind: str, directory: Path) -> None:
    with thread_lock:
        _running.pop((kind, directory), None)


def _stop_leftovers() -> None:
    for (kind, directory), (pid, stop) in list(_running.items()):
        if pid != os.getpid():
            continue
        try:
            stop()
        except Exception:  # pragma: no cover - best effort at exit
            _log.exception("embedded %s: could not stop server in %s", kind, directory)
