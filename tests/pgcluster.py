"""A throwaway PostgreSQL cluster with password auth and restarts that tests fully control."""

from __future__ import annotations

import glob
import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

APP_USER = "app"
APP_PASSWORD = "s3cret-pw"  # noqa: S105 - a fixture's password, the tests need to know it
APP_DATABASE = "app"
SUPERUSER = "postgres"
SUPERUSER_PASSWORD = "postgres-pw"  # noqa: S105 - same
_MARKER = "pgcluster.json"
_INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found; install the "
    "PostgreSQL server packages (e.g. `apt-get install -y postgresql`) or set PG_BINDIR"
)


def find_bindir() -> Path:
    """Where initdb/pg_ctl/postgres live: $PG_BINDIR, `pg_config --bindir`, else newest."""
    candidates: list[str] = []
    if os.environ.get("PG_BINDIR"):
        candidates.append(os.environ["PG_BINDIR"])
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        if out.returncode == 0:
            candidates.append(out.stdout.strip())
    versioned = glob.glob("/usr/lib/postgresql/*/bin") + glob.glob("/usr/pgsql-*/bin")
    candidates += sorted(versioned, key=_version_key, reverse=True)
    candidates.append("/usr/local/pgsql/bin")
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(str(Path(initdb).parent))
    for candidate in candidates:
        bindir = Path(candidate)
        if all(os.access(bindir / name, os.X_OK) for name in ("initdb", "pg_ctl", "postgres")):
            return bindir
    raise RuntimeError(_INSTALL_HINT)


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path))


def free_port() -> int:
    """A port nothing listens on right now (racy, as every free-port pick is)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PgCluster:
    """A private cluster: scram-sha-256 over TCP on 127.0.0.1, trust on its unix socket.

    Has role `app` (password `s3cret-pw`) owning database `app`, and superuser `postgres`
    (password `postgres-pw`). As root, everything runs as the `postgres` OS user, since
    PostgreSQL refuses to run as root. Pass an existing `directory` to reuse a cluster
    another process started there (the CLI does this).
    """

    host = "127.0.0.1"

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.bindir = find_bindir()
        self._run_as = _os_user()
        self._owns_dir = directory is None
        self.dir = Path(directory or tempfile.mkdtemp(prefix="pgcluster-")).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.datadir = self.dir / "data"
        self.socket_dir = self.dir
        self.log_path = self.dir / "postgres.log"
        if self._run_as is not None:
            os.chown(self.dir, self._run_as.pw_uid, self._run_as.pw_gid)
        marker = self.dir / _MARKER
        if marker.exists():
            self.port = int(json.loads(marker.read_text())["port"])
        else:
            self.port = free_port()
            marker.write_text(json.dumps({"port": self.port, "bindir": str(self.bindir)}))

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Start the server (initialising the cluster the first time) and wait until it accepts."""
        if not (self.datadir / "PG_VERSION").exists():
            self._initdb()
        if self.running():
            return
        result = self._pg(
            "pg_ctl", "start", "-D", str(self.datadir), "-l", str(self.log_path), "-w", "-t", "60"
        )
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed:\n{result.stdout}\n{self.log_tail()}")

    def stop(self) -> None:
        """Fast shutdown: clients are disconnected, as in a real restart or failover."""
        if not self.running():
            return
        result = self._pg("pg_ctl", "stop", "-D", str(self.datadir), "-m", "fast", "-w", "-t", "60")
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl stop failed:\n{result.stdout}\n{self.log_tail()}")

    def restart(self) -> None:
        """Stop fast and start again on the same port, so clients must reconnect."""
        self.stop()
        self.start()

    def running(self) -> bool:
        """Whether the server is up, so stop() and close() can be called at any point."""
        if not (self.datadir / "PG_VERSION").exists():
            return False
        return self._pg("pg_ctl", "status", "-D", str(self.datadir)).returncode == 0

    def close(self) -> None:
        """Stop the server and remove the cluster's directory."""
        try:
            self.stop()
        finally:
            if self._owns_dir or (self.dir / _MARKER).exists():
                shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- connecting -------------------------------------------------------------------

    def dsn(
        self,
        user: str = APP_USER,
        password: str | None = APP_PASSWORD,
        database: str = APP_DATABASE,
    ) -> str:
        """A TCP URL (password auth applies), e.g. to hand the application under test."""
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        return f"postgresql://{auth}@{self.host}:{self.port}/{quote(database, safe='')}"

    def superuser_dsn(self) -> str:
        """A superuser TCP URL, for inspecting the server (pg_stat_activity) around a test."""
        return self.dsn(SUPERUSER, SUPERUSER_PASSWORD, "postgres")

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server log, to explain a failure."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    # -- internals --------------------------------------------------------------------

    def _initdb(self) -> None:
        result = self._pg(
            "initdb", "-D", str(self.datadir), "-U", SUPERUSER, "-E", "UTF8", "--locale=C",
            "--no-sync", "--auth-local=trust", "--auth-host=scram-sha-256",
        )  # fmt: skip
        if result.returncode != 0:
            hint = ""
            if self._run_as is not None:
                hint = f"(as root it runs as OS user postgres, who must reach {self.dir})\n"
            raise RuntimeError(f"initdb failed:\n{hint}{result.stdout}")
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "password_encryption": "'scram-sha-256'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "100",
        }
        with (self.datadir / "postgresql.conf").open("a") as conf:
            conf.write("\n# pgcluster.py\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        (self.datadir / "pg_hba.conf").write_text(
            "local all all trust\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
            "host all all ::1/128 scram-sha-256\n"
        )
        sql = (
            f"ALTER ROLE {SUPERUSER} PASSWORD '{SUPERUSER_PASSWORD}';\n"
            f"CREATE ROLE {APP_USER} LOGIN PASSWORD '{APP_PASSWORD}';\n"
            f"CREATE DATABASE {APP_DATABASE} OWNER {APP_USER};\n"
        )
        result = self._pg("postgres", "--single", "-D", str(self.datadir), "postgres", stdin=sql)
        if result.returncode != 0 or "ERROR" in result.stdout:
            raise RuntimeError(f"setting up roles failed:\n{result.stdout}")

    def _pg(
        self, program: str, *args: str, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a server binary, as the `postgres` OS user when we are root."""
        kwargs: dict[str, Any] = {}
        if self._run_as is not None:
            kwargs = {"user": self._run_as.pw_uid, "group": self._run_as.pw_gid, "extra_groups": []}
        env = {**os.environ, "LC_ALL": "C", "HOME": str(self.dir)}
        env.pop("PGDATA", None)
        return subprocess.run(
            [str(self.bindir / program), *args],
            input=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=self.dir,
            env=env,
            check=False,
            **kwargs,
        )


def _os_user() -> pwd.struct_passwd | None:
    """The OS user to run PostgreSQL as: `postgres` when we are root, else ourselves (None)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise RuntimeError(
            "running as root, but PostgreSQL refuses to run as root and there is no `postgres` "
            "OS user to run it as; install the server packages (`apt-get install -y postgresql`) "
            "or create the user (`useradd --system postgres`)"
        ) from None


def main(argv: list[str]) -> int:
    """CLI for shell scripts: `start <dir>` prints a superuser DSN; `stop <dir>` removes it."""
    if len(argv) != 3 or argv[1] not in ("start", "stop"):
        print(f"usage: {argv[0]} start|stop <dir>", file=sys.stderr)
        return 2
    command, directory = argv[1], argv[2]
    if command == "stop" and not Path(directory, _MARKER).exists():
        return 0  # never started, or already removed
    try:
        cluster = PgCluster(directory)
        if command == "start":
            cluster.start()
            print(cluster.superuser_dsn())
        else:
            cluster.close()
    except RuntimeError as exc:
        print(f"pgcluster: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
