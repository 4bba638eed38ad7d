"""A private PostgreSQL server on loopback (Debian's `postgresql` package), started once per test session.

initdb into a fresh folder, `pg_ctl start` on a free port with the socket in that folder, then one
role and one database for Dagster with a password (so the deploy/ instance logs in the way a real
one does: over TCP with DAGSTER_PG_PASSWORD). As root the server runs as the `postgres` OS user.
"""

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from support.dagster_procs import free_port

PG_ROOTS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    user: str
    password: str
    db: str
    data_dir: Path

    def env(self) -> dict[str, str]:
        """What deploy/dagster.yaml reads."""
        return {"DAGSTER_PG_HOST": self.host, "DAGSTER_PG_PORT": str(self.port), "DAGSTER_PG_USER": self.user,
                "DAGSTER_PG_PASSWORD": self.password, "DAGSTER_PG_DB": self.db}

    def create_database(self, name: str) -> "PostgresServer":
        """A fresh database owned by the same role (one per test that needs a clean instance)."""
        _psql(self, f'CREATE DATABASE "{name}" OWNER "{self.user}"')
        return PostgresServer(self.host, self.port, self.user, self.password, name, self.data_dir)


def _bin(name: str) -> str:
    for root in PG_ROOTS:
        if (root / name).exists():
            return str(root / name)
    pytest.fail(f"{name} not found under /usr/lib/postgresql/*/bin: apt-get install postgresql (make test installs it)")


def _as_owner():
    """subprocess kwargs: as root run as `postgres` (the server refuses root), else as ourselves."""
    if os.geteuid() != 0:
        return {}
    entry = pwd.getpwnam("postgres")
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _psql(server: PostgresServer, sql: str) -> None:
    subprocess.run([_bin("psql"), "-h", str(server.data_dir), "-p", str(server.port), "-U", "postgres",
                    "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-qc", sql],
                   check=True, capture_output=True, text=True, **_as_owner())


@pytest.fixture(scope="session")
def postgres_server():
    base = Path(tempfile.mkdtemp(prefix="packer-assets-pg-"))  # not under pytest's root-only tmp tree
    data = base / "data"
    owner = _as_owner()
    if owner:
        os.chown(base, owner["user"], owner["group"])
    port = free_port()
    password = os.urandom(12).hex()
    server = PostgresServer("127.0.0.1", port, "dagster", password, "dagster", base)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8", "HOME": str(base)}
    started = False
    try:
        pwfile = base / "pw"
        pwfile.write_text("unused-superuser-password\n")
        if owner:
            os.chown(pwfile, owner["user"], owner["group"])
        subprocess.run([_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth-local=trust",
                        "--auth-host=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8"],
                       check=True, capture_output=True, text=True, env=env, **owner)
        subprocess.run([_bin("pg_ctl"), "-D", str(data), "-l", str(base / "server.log"), "-w", "-t", "60",
                        "-o", f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c max_connections=200",
                        "start"], check=True, capture_output=True, text=True, env=env, **owner)
        started = True
        _psql(server, f"CREATE ROLE dagster LOGIN PASSWORD '{password}'")
        _psql(server, "CREATE DATABASE dagster OWNER dagster")
        yield server
    except subprocess.CalledProcessError as exc:
        log = (base / "server.log").read_text() if (base / "server.log").exists() else ""
        pytest.fail(f"postgres: {exc.cmd[0]} failed: {exc.stderr}\n{log[-2000:]}")
    finally:
        if started:
            subprocess.run([_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                           capture_output=True, env=env, **owner)
            time.sleep(0.1)
        shutil.rmtree(base, ignore_errors=True)
