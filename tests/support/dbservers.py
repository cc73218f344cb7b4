"""Database servers from Debian, started by the tests in a temporary directory on a free loopback
port (the decoders' tests and the agent's end-to-end tests share them). A server that cannot start
fails the test with what it printed: CI never skips these."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.support.agent import free_port, stop_process


@dataclass
class Server:
    port: int
    password: str | None


@contextlib.contextmanager
def redis_server(password: str | None = None) -> Iterator[Server]:
    import redis

    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed: run scripts/bootstrap.sh (Debian package redis-server)")
    with tempfile.TemporaryDirectory(prefix="kspan-redis-") as tmp:
        port = free_port()
        args = [exe, "--save", "", "--appendonly", "no", "--port", str(port), "--bind", "127.0.0.1",
                "--dir", tmp, "--enable-debug-command", "yes", "--logfile", f"{tmp}/redis.log"]  # fmt: skip
        if password is not None:
            args += ["--requirepass", password]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 15
            while True:
                try:
                    redis.Redis(port=port, password=password, socket_timeout=2).ping()
                    break
                except redis.ConnectionError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        logf = f"{tmp}/redis.log"
                        log = open(logf).read() if os.path.exists(logf) else ""
                        pytest.fail(f"redis-server did not start on port {port} (CI never skips this): {log}")
                    time.sleep(0.05)
            yield Server(port, password)
        finally:
            stop_process(proc)


PG_BIN = "/usr/lib/postgresql/15/bin"


@dataclass
class Postgres:
    port: int
    user: str
    password: str
    database: str


@contextlib.contextmanager
def postgres_server(password: str, database: str = "kspandb", extra_users: dict[str, str] | None = None,
                    hba_extra: str = "") -> Iterator[Postgres]:
    """PostgreSQL 15 (Debian's postgresql-15) in a temporary directory, run as `nobody`, with a
    scram-sha-256 user `kspan` and `database` created; `extra_users` (name -> password) too."""
    import psycopg

    if not os.path.exists(f"{PG_BIN}/initdb"):
        pytest.fail(f"{PG_BIN}/initdb missing: install Debian's postgresql-15 (scripts/bootstrap.sh)")
    import pwd

    nobody = pwd.getpwnam("nobody")
    top = tempfile.mkdtemp(prefix="kspan-pg-")
    os.chmod(top, 0o755)
    os.chown(top, nobody.pw_uid, nobody.pw_gid)
    data = os.path.join(top, "data")
    pwfile = os.path.join(top, "pw")
    with open(pwfile, "w") as f:
        f.write(password + "\n")
    os.chown(pwfile, nobody.pw_uid, nobody.pw_gid)
    as_nobody = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
    r = subprocess.run([*as_nobody, f"{PG_BIN}/initdb", "-D", data, "-U", "kspan", "--auth=scram-sha-256",
                        f"--pwfile={pwfile}", "-E", "UTF8", "--no-sync"],
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        pytest.fail(f"initdb failed: {r.stderr[-2000:]}")
    with open(os.path.join(data, "pg_hba.conf"), "w") as f:
        f.write("local all all trust\n" + hba_extra + "host all all 127.0.0.1/32 scram-sha-256\n")
    port = free_port()
    proc = subprocess.Popen([*as_nobody, f"{PG_BIN}/postgres", "-D", data, "-p", str(port),
                             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={top}",
                             "-c", "fsync=off", "-c", "ssl=off"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = psycopg.connect(host="127.0.0.1", port=port, user="kspan", password=password,
                                       dbname="postgres", autocommit=True)
                break
            except psycopg.OperationalError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    pytest.fail(f"postgres did not start on port {port}: {err[-2000:]}")
                time.sleep(0.1)
        with conn:
            conn.execute(f"CREATE DATABASE {database}")
            for user, pw in (extra_users or {}).items():
                conn.execute(f"CREATE USER {user} PASSWORD '{pw}'")
        yield Postgres(port, "kspan", password, database)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(top, ignore_errors=True)


@dataclass
class MariaDB:
    port: int
    socket: str
    user: str
    password: str
    database: str


@contextlib.contextmanager
def mariadb_server(password: str, databases: tuple[str, ...] = ("kspandb",)) -> Iterator[MariaDB]:
    """MariaDB (Debian's mariadb-server) in a temporary directory, run as `nobody`, with the user
    `app`@127.0.0.1 (all rights on `databases`, and CREATE USER)."""
    import pwd

    import pymysql

    if not shutil.which("mariadbd") or not shutil.which("mariadb-install-db"):
        pytest.fail("mariadbd / mariadb-install-db missing: install Debian's mariadb-server (scripts/bootstrap.sh)")
    nobody = pwd.getpwnam("nobody")
    top = tempfile.mkdtemp(prefix="kspan-my-")
    os.chmod(top, 0o755)
    os.chown(top, nobody.pw_uid, nobody.pw_gid)
    data = os.path.join(top, "data")
    r = subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=nobody",
                        "--auth-root-authentication-method=normal", "--skip-test-db"],
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        pytest.fail(f"mariadb-install-db failed: {r.stderr[-2000:]}")
    port = free_port()
    sock = os.path.join(top, "sock")
    proc = subprocess.Popen(["mariadbd", "--no-defaults", f"--datadir={data}", "--user=nobody", f"--port={port}",
                             "--bind-address=127.0.0.1", f"--socket={sock}", f"--pid-file={top}/pid",
                             "--skip-log-bin", "--innodb-buffer-pool-size=16M", "--skip-name-resolve"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = pymysql.connect(unix_socket=sock, user="root", autocommit=True)
                break
            except pymysql.err.OperationalError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    pytest.fail(f"mariadbd did not start on port {port}: {err[-2000:]}")
                time.sleep(0.1)
        with conn.cursor() as cur:
            cur.execute(f"CREATE USER 'app'@'127.0.0.1' IDENTIFIED BY '{password}'")
            cur.execute("GRANT CREATE USER ON *.* TO 'app'@'127.0.0.1'")
            for db in databases:
                cur.execute(f"CREATE DATABASE {db}")
                cur.execute(f"GRANT ALL ON {db}.* TO 'app'@'127.0.0.1'")
        conn.close()
        yield MariaDB(port, sock, "app", password, databases[0])
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        shutil.rmtree(top, ignore_errors=True)
