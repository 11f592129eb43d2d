"""Throw-away PostgreSQL 15 and nginx from Debian's packages, for the scale-out tests and bench.

- :class:`Postgres`: ``initdb`` + ``pg_ctl`` as the ``postgres`` user in a temporary directory
  that user owns, listening on 127.0.0.1 (the unix socket in that directory, never /var/run),
  trust authentication for the loopback user ``paygate``; stopped by its postmaster's PID.
- :class:`Nginx`: a load balancer on 127.0.0.1 in front of given upstreams (round robin, no
  retry of a POST on another upstream), ``daemon off``, stopped by its PID. With ``sticky``
  (replica name → upstream) it routes by key (docs/SCALING.md): a request naming a key id
  ``...@<replica>`` goes to that replica, the others are its backups for connection failures.

A missing program raises :class:`ComponentMissing` naming the Debian package.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from paygate_dev.stack import SETUP_HINT, ComponentMissing, free_port, require

PG_BIN = Path("/usr/lib/postgresql/15/bin")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


class Postgres:
    """One PostgreSQL 15 cluster; ``url(db)`` for a database in it, ``create_database()``."""

    def __init__(self) -> None:
        if not (PG_BIN / "initdb").exists():
            raise ComponentMissing(
                f"PostgreSQL 15 not found in {PG_BIN}: apt-get install postgresql; {SETUP_HINT}"
            )
        try:
            self._user = pwd.getpwnam("postgres")
        except KeyError:
            raise ComponentMissing(
                f"no postgres user: apt-get install postgresql; {SETUP_HINT}"
            ) from None
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="paygate-pg-"))
        self.pid: int | None = None

    def _as_postgres(self, *args: str, timeout: float = START_TIMEOUT) -> None:
        result = subprocess.run(
            ["runuser", "-u", "postgres", "--", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} failed: {result.stderr.strip()[-400:]}")

    def start(self) -> Postgres:
        os.chown(self.dir, self._user.pw_uid, self._user.pw_gid)
        os.chmod(self.dir, 0o700)
        data = self.dir / "data"
        self._as_postgres(
            str(PG_BIN / "initdb"),
            "-D",
            str(data),
            "-A",
            "trust",
            "-U",
            "paygate",
            "--no-sync",
            "-E",
            "UTF8",
        )
        self._as_postgres(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(self.dir / "log"),
            "-w",
            "-t",
            str(int(START_TIMEOUT)),
            "-o",
            f"-k {self.dir} -h 127.0.0.1 -p {self.port} -c fsync=off -c max_connections=200",
            "start",
        )
        self.pid = int((data / "postmaster.pid").read_text().splitlines()[0])
        self.create_database("paygate")
        return self

    def psql(self, sql: str, database: str = "postgres") -> str:
        psql = require("psql", "postgresql-client")
        result = subprocess.run(
            [
                psql,
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "paygate",
                "-d",
                database,
                "-v",
                "ON_ERROR_STOP=1",
                "-At",
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql failed: {result.stderr.strip()[-400:]}")
        return result.stdout

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its name."""
        name = name or f"t_{uuid.uuid4().hex[:16]}"
        self.psql(f'CREATE DATABASE "{name}"')
        return name

    def url(self, database: str = "paygate") -> str:
        return f"postgresql://paygate@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        """Fast shutdown by the postmaster's PID (SIGINT), SIGKILL if it does not go."""
        pid, self.pid = self.pid, None
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
                deadline = time.monotonic() + STOP_TIMEOUT
                while time.monotonic() < deadline:
                    os.kill(pid, 0)
                    time.sleep(0.05)
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)


class Nginx:
    """nginx on 127.0.0.1:``port`` balancing over ``upstreams`` (``host:port`` each)."""

    def __init__(
        self, upstreams: list[str], work_dir: Path, sticky: dict[str, str] | None = None
    ) -> None:
        self.binary = require("nginx", "nginx")
        self.upstreams = upstreams
        self.sticky = sticky
        self.dir = work_dir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> str:
        if self.sticky is not None:
            return self.sticky_config(self.sticky)
        d = self.dir
        servers = "\n".join(f"    server {u} max_fails=0;" for u in self.upstreams)
        return f"""worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
  log_format upstream '$status $upstream_addr';
  access_log {d}/access.log upstream;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  upstream paygate {{
{servers}
    keepalive 16;
  }}
  server {{
    listen 127.0.0.1:{self.port};
    client_max_body_size 8m;
    location / {{
      proxy_pass http://paygate;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_read_timeout 60s;
      proxy_next_upstream off;  # never replay a paid POST on another replica
    }}
  }}
}}
"""

    def sticky_config(self, replicas: dict[str, str]) -> str:
        """Sticky by key: the key id's replica picks the upstream (docs/SCALING.md)."""
        d = self.dir
        names = sorted(replicas)
        routes = "\n".join(f'    "~@{re.escape(n)}$" paygate_{i};' for i, n in enumerate(names))
        pools = []
        for i, name in enumerate(names):
            backups = "".join(
                f"    server {replicas[o]} backup max_fails=0;\n" for o in names if o != name
            )
            pools.append(
                f"  upstream paygate_{i} {{\n    server {replicas[name]} max_fails=0;\n"
                f"{backups}    keepalive 16;\n  }}"
            )
        anyone = "\n".join(f"    server {replicas[n]} max_fails=0;" for n in names)
        pools_text = "\n".join(pools)
        return f"""worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
  log_format upstream '$status $upstream_addr $http_x_paygate_key_id';
  access_log {d}/access.log upstream;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  map $http_x_paygate_key_id $paygate_pool {{
    default paygate_any;
{routes}
  }}
  upstream paygate_any {{
{anyone}
    keepalive 16;
  }}
{pools_text}
  server {{
    listen 127.0.0.1:{self.port};
    client_max_body_size 8m;
    location / {{
      proxy_pass http://$paygate_pool;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_read_timeout 60s;
      # Only a connection that could not be made moves on (a dead replica); nginx never
      # passes a POST it already sent to another server (no non_idempotent).
      proxy_next_upstream error;
    }}
  }}
}}
"""

    def start(self) -> Nginx:
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "nginx.conf"
        conf.write_text(self.config())
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(conf), "-p", str(self.dir), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT
        import socket

        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.dir / "error.log").read_text(errors="replace")[-400:]
                raise RuntimeError(f"nginx exited: {log}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("nginx did not listen in time")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)  # graceful: finish open requests
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
