"""Real servers for tests and benchmarks: a private PostgreSQL and an ``mlflow server`` on loopback ports.

Plain context managers (no pytest) so that ``benchmarks/bench_study_scaleout.py`` starts the
same servers as the tests; ``tests/conftest.py`` wraps them as fixtures. Each server is
stopped on the way out, whatever happened inside.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

SERVER_START_S = 300  # generous: a 2-core machine shared with other jobs starts servers slowly


def postgres_bin() -> Path | None:
    """The folder holding initdb and pg_ctl (Debian: /usr/lib/postgresql/VERSION/bin), or None."""
    root = Path("/usr/lib/postgresql")
    found = sorted(root.glob("*/bin/initdb")) if root.is_dir() else []
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def postgres_server(*databases: str) -> Iterator[str]:
    """A private PostgreSQL server (initdb in a temporary folder, trust auth, loopback only) holding
    ``databases``; yields ``postgresql://zoo@127.0.0.1:PORT`` (append ``/DB``)."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        raise FileNotFoundError("PostgreSQL server binaries not found (initdb, pg_ctl); install them with "
                                "`apt-get install -y postgresql`")
    # initdb refuses to run as root: run the server as the postgres user then.
    as_server = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="zoo-pg-"))
    folder.chmod(0o777)  # the server user writes its data, socket and log here
    port = free_port()
    run = lambda *cmd: subprocess.run([*as_server, *map(str, cmd)], check=True, capture_output=True, timeout=SERVER_START_S)  # noqa: E731
    try:
        run(bin_dir / "initdb", "-D", folder / "data", "-A", "trust", "-U", "zoo")
        run(bin_dir / "pg_ctl", "-D", folder / "data", "-w", "-t", SERVER_START_S, "-l", folder / "log", "-o",
            f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start")
        for name in databases:
            run(bin_dir / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "zoo", name)
        yield f"postgresql://zoo@127.0.0.1:{port}"
    finally:
        subprocess.run([*as_server, str(bin_dir / "pg_ctl"), "-D", str(folder / "data"), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def mlflow_server(backend_store_uri: str, artifacts: Path, port: int | None = None) -> Iterator[str]:
    """``mlflow server`` with ``backend_store_uri`` and artifacts served from ``artifacts``
    (MLflow 3 serves them through the server by default); yields ``http://127.0.0.1:PORT``.
    Given a ``port`` (a server restarted on the same address), it starts there."""
    port = port or free_port()
    artifacts.mkdir(parents=True, exist_ok=True)
    log = open(artifacts.parent / f"mlflow-server-{port}.log", "a")  # a restart adds to its log
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri,
               "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
    # Its own process group: stopping it stops the workers it forks too.
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while not _answers(f"{url}/health"):
            if server.poll() is not None or time.monotonic() > deadline:
                log.flush()
                raise RuntimeError(f"mlflow server did not start: {Path(log.name).read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, 9)
                server.wait()
        log.close()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False
