"""PostgreSQL for the catalog's tests: a throw-away cluster run from Debian's package."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from devstack.supervisor import Service, StackError, free_ports


class EmbeddedPostgres:
    """PostgreSQL from Debian's ``postgresql`` package as a child process: a throw-away cluster
    on a free port of 127.0.0.1, for the catalog's tests (production points
    ``MOODSTREAM_CATALOG_URL`` at its own server).

    ``initdb`` makes the cluster in a temporary directory with trust authentication for local
    connections only and durability off (``fsync``, ``synchronous_commit`` and
    ``full_page_writes``): nothing in it outlives the tests. PostgreSQL refuses to run as root, so
    as root both run as the ``postgres`` user that the package creates (``setpriv``, which execs:
    the server stays the leader of its process group). The data directory goes where that user
    can reach it, not in ``log_dir`` (pytest's temporary folders are private to root).
    """

    def __init__(
        self,
        *,
        log_dir: Path,
        database: str = "moodstream",
        startup_timeout_s: float = 60.0,
        data_parent: Path | None = None,
    ) -> None:
        self.log_dir = Path(log_dir).resolve()
        self._data_parent = data_parent  # where the cluster goes (a file system of its own, for faults)
        self.database = database
        self.startup_seconds = 0.0
        self._port = free_ports(1)[0]
        self._startup_timeout_s = startup_timeout_s
        # SIGINT is PostgreSQL's fast shutdown; SIGTERM would wait for every client to hang up.
        self._server = Service("postgresql", self.log_dir / "postgresql.log", stop_signal=signal.SIGINT)
        self._data: Path | None = None

    @property
    def url(self) -> str:
        """The catalog URL of the test database (no password: trust authentication)."""
        return self._url(self.database)

    def _url(self, database: str) -> str:
        return f"postgresql://{_PG_USER}@127.0.0.1:{self._port}/{database}"

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> EmbeddedPostgres:
        """initdb, start the server, create the database; StackError with the log when it fails."""
        if self._server.running:
            raise StackError("postgresql is already started")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        bindir = _postgres_bindir()
        as_user = _postgres_user_prefix()
        self._data = Path(tempfile.mkdtemp(prefix="moodstream-pg-", dir=self._data_parent))
        try:
            if as_user:
                shutil.chown(self._data, user=_PG_OS_USER, group=_PG_OS_USER)
            cluster = self._data / "cluster"
            with open(self._server.log_path, "ab") as log:
                done = subprocess.run(
                    [
                        *as_user,
                        str(bindir / "initdb"),
                        "-D",
                        str(cluster),
                        "-U",
                        _PG_USER,
                        "--auth=trust",
                        "--encoding=UTF8",
                        "--no-locale",
                        "--no-sync",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            if done.returncode != 0:
                raise self._server._error(f"initdb failed with status {done.returncode}")
            self._launch()
            self.startup_seconds = self._server.await_ready(self._answers, self._startup_timeout_s)
            self.create_database(self.database)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def pid(self) -> int | None:
        """The postmaster's process id while it runs."""
        return self._server.pid

    def exited(self) -> int | None:
        """The postmaster's exit status when it stopped by itself (a PANIC), else None."""
        return self._server.exited()

    def restart(self, sig: signal.Signals = signal.SIGKILL) -> float:
        """Kill the server (``sig``: SIGKILL is a crash, SIGINT a fast shutdown) and start it again
        on the same cluster and port; seconds until it answers (after its crash recovery)."""
        self._server.kill(sig)
        self._launch()
        return self._server.await_ready(self._answers, self._startup_timeout_s)

    def _launch(self) -> None:
        assert self._data is not None, "the cluster is made by start()"
        bindir = _postgres_bindir()
        as_user = _postgres_user_prefix()
        cluster = self._data / "cluster"
        # A postmaster killed with SIGKILL leaves its pid file; the next one sees that pid gone
        # and starts with crash recovery.
        self._server.launch(
            [
                *as_user,
                str(bindir / "postgres"),
                "-D",
                str(cluster),
                "-p",
                str(self._port),
                "-k",
                str(self._data),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ]
        )

    def stop(self) -> None:
        """Stop the server (idempotent) and delete its cluster; the log stays in ``log_dir``."""
        self._server.stop()
        if self._data is not None:
            shutil.rmtree(self._data, ignore_errors=True)
            self._data = None

    def _answers(self) -> bool:
        import psycopg

        with psycopg.connect(self._url("postgres"), connect_timeout=2):
            return True

    def create_database(self, name: str) -> str:
        """Create another empty database on the server (tests take one each); its URL."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self._url("postgres"), autocommit=True) as db:
            db.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self._url(name)


_PG_USER = "moodstream"  # the cluster's superuser, made by initdb
_PG_OS_USER = "postgres"  # the account Debian's package creates; the server runs as it under root


def _postgres_bindir() -> Path:
    """Where initdb and postgres are: on PATH, else Debian's /usr/lib/postgresql/<major>/bin (newest)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if not candidates:
        raise StackError(
            "PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin): `make tools` installs Debian's postgresql"
        )
    return candidates[-1].parent


def _postgres_user_prefix() -> list[str]:
    """The command prefix that runs a program as the postgres account when we are root."""
    if os.geteuid() != 0:
        return []
    try:
        import pwd

        pwd.getpwnam(_PG_OS_USER)
    except KeyError:
        raise StackError(
            f"PostgreSQL cannot run as root and there is no {_PG_OS_USER!r} account to run it as; install Debian's postgresql package"
        ) from None
    return ["setpriv", f"--reuid={_PG_OS_USER}", f"--regid={_PG_OS_USER}", "--init-groups", "--"]
