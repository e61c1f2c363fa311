"""A throwaway PostgreSQL server on 127.0.0.1 (initdb + pg_ctl), for `bench/` and the tests
(through conftest's `postgres` fixture).

As root the server runs as `nobody` (PostgreSQL refuses to run as root), in a temp directory
that user owns; the superuser `postgres` logs in over TCP with a password (scram-sha-256),
so the password path is the real one.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

USER = "postgres"
PASSWORD = "pw-not-a-real-secret-7f3a"
BIN_DIRS = ("/usr/local/bin", "/usr/lib/postgresql/17/bin", "/usr/lib/postgresql/16/bin",
            "/usr/lib/postgresql/15/bin")


@dataclass(frozen=True)
class PostgresServer:
    port: int
    data: Path
    host: str = "127.0.0.1"
    user: str = USER
    password: str = PASSWORD

    def env(self, database: str, password: str | None = None) -> dict[str, str]:
        """The libpq environment a client of this server uses (its password unless given)."""
        return {"PGHOST": self.host, "PGPORT": str(self.port), "PGDATABASE": database,
                "PGUSER": self.user, "PGPASSWORD": self.password if password is None else password}

    def cpu_seconds(self) -> float:
        """CPU time of the whole server so far: the postmaster, its exited children (the
        backends of closed connections) and the live ones."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        ticks = os.sysconf("SC_CLK_TCK")
        fields = _stat(postmaster)
        total = sum(int(value) for value in fields[11:15])  # utime, stime, cutime, cstime
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                child = _stat(int(entry.name))
                if child and int(child[1]) == postmaster:
                    total += int(child[11]) + int(child[12])
        return total / ticks

    def conninfo(self, database: str) -> str:
        return (f"host={self.host} port={self.port} dbname={database} user={self.user} "
                f"password={self.password}")


def _stat(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name: [state, ppid, …]; [] once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return text.rsplit(")", 1)[1].split()


def find_binaries() -> Path | None:
    for directory in (os.environ.get("PG_BIN"), *BIN_DIRS):
        if directory and (Path(directory) / "initdb").exists() and (
            Path(directory) / "pg_ctl"
        ).exists():
            return Path(directory)
    found = shutil.which("initdb")
    return Path(found).parent if found and shutil.which("pg_ctl") else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def postgres_server(bin_dir: Path) -> Iterator[PostgresServer]:
    root = Path(tempfile.mkdtemp(prefix="pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # postgres will not run as root
        import pwd

        nobody = pwd.getpwnam("nobody")
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
        as_user = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
                   "--clear-groups"]
    pwfile = root / "pw"
    pwfile.write_text(PASSWORD + "\n")
    if as_user:
        os.chown(pwfile, nobody.pw_uid, nobody.pw_gid)
    data = root / "data"
    port = _free_port()

    def run(*command: str) -> None:
        subprocess.run([*as_user, *command], check=True, capture_output=True, cwd=root)

    try:
        run(str(bin_dir / "initdb"), "-D", str(data), "-U", USER, "--pwfile", str(pwfile),
            "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8",
            "--no-instructions", "--locale=C")
        options = (f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off")
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l",
            str(root / "log"), "-w", "-t", "60", "start")
        try:
            yield PostgresServer(port, data)
        finally:
            run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)
