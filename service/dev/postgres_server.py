"""Embedded PostgreSQL (pgserver's binaries) on 127.0.0.1 and a free port (see dev/embedded.py)."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from service.dev.processes import (
    HOST,
    PORT_ATTEMPTS,
    EmbeddedServiceError,
    file_size,
    forget,
    free_port,
    locked,
    package_dir,
    remember,
    tail,
)

_log = logging.getLogger(__name__)


#: Environment variable naming the account PostgreSQL runs as when this process is root.
PG_USER_ENV = "HATCHED_MIRROR_EMBEDDED_PG_USER"


_PG_SUPERUSER = "postgres"
_PG_DATABASE = "postgres"


def postgres_data_dir(data_dir: Path) -> Path:
    """The PGDATA directory used for ``data_dir``."""
    return Path(data_dir).expanduser().resolve() / "postgres"


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
    package = package_dir("pgserver")
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
    return f"postgresql://{_PG_SUPERUSER}@{HOST}:{port}/{_PG_DATABASE}"


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
    with locked(pgdata.parent / ".postgres.lock"):
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
            if endpoint is not None and HOST in endpoint[1].replace(" ", "").split(","):
                _log.info("embedded postgres: adopting running server on port %d", endpoint[0])
                remember("postgres", pgdata, lambda: stop_postgres(pgdata.parent))
                return _pg_dsn(endpoint[0])
            _log.info("embedded postgres: restarting a server that does not listen on TCP")
            _pg_stop(runner, pgdata, timeout)

        log_file = pgdata / "embedded-server.log"
        failure = ""
        for _attempt in range(PORT_ATTEMPTS):
            port = free_port()
            log_start = file_size(log_file)
            # -k '' disables the unix socket (paths under deep temp dirs can exceed 107 bytes);
            # pg_ctl hands -o to /bin/sh, so the quotes survive.
            options = f"-c listen_addresses={HOST} -p {port} -k ''"
            result = runner.run(
                "pg_ctl", "start", "-D", str(pgdata), "-l", str(log_file), "-w",
                "-t", str(int(timeout)), "-o", options,
                timeout=timeout + 10,
            )  # fmt: skip
            if result.returncode == 0:
                remember("postgres", pgdata, lambda: stop_postgres(pgdata.parent))
                return _pg_dsn(port)
            failure = f"{result.stdout}\n--- {log_file} ---\n{tail(log_file, log_start)}"
            if "already in use" not in failure:
                break
        raise EmbeddedServiceError(f"could not start PostgreSQL in {pgdata}:\n{failure}")


def stop_postgres(data_dir: Path, *, timeout: float = 60.0) -> None:
    """Stop the PostgreSQL server of ``data_dir`` (fast shutdown); data is kept. No-op if down."""
    pgdata = postgres_data_dir(data_dir)
    forget("postgres", pgdata)
    if not (pgdata / "PG_VERSION").exists():
        return
    with locked(pgdata.parent / ".postgres.lock"):
        runner = _pg_runner()
        if _pg_running(runner, pgdata):
            _pg_stop(runner, pgdata, timeout)
