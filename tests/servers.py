"""Real servers for tests and benchmarks: a private PostgreSQL and an ``mlflow server`` on loopback ports.

Plain context managers (no pytest) so that ``benchmarks/bench_study_scaleout.py`` starts the
same servers as the tests; ``tests/conftest.py`` wraps them as fixtures. Each server is
stopped on the way out, whatever happened inside.
"""

from __future__ import annotations

import os
import secrets
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
_PG_CTL: dict[str, tuple[list[str], list[str]]] = {}  # URL of a running postgres_server -> (stop, start) commands


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
def postgres_server(*databases: str, password: str | None = None) -> Iterator[str]:
    """A private PostgreSQL server (initdb in a temporary folder, loopback only) holding ``databases``;
    yields ``postgresql://zoo@127.0.0.1:PORT`` (append ``/DB``).

    Without ``password`` every connection is trusted; with it, user ``zoo`` must give that password
    (``scram-sha-256``, as a locked production server does): in the URL, PGPASSWORD or ~/.pgpass.
    """
    bin_dir = postgres_bin()
    if bin_dir is None:
        raise FileNotFoundError("PostgreSQL server binaries not found (initdb, pg_ctl); install them with "
                                "`apt-get install -y postgresql`")
    # initdb refuses to run as root: run the server as the postgres user then.
    as_server = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="zoo-pg-"))
    folder.chmod(0o777)  # the server user writes its data, socket and log here
    port = free_port()
    env = {**os.environ, "PGPASSWORD": password} if password else None  # createdb's password
    run = lambda *cmd: subprocess.run([*as_server, *map(str, cmd)], check=True, capture_output=True,  # noqa: E731
                                      timeout=SERVER_START_S, env=env)
    auth = ["-A", "trust"]
    if password:
        (folder / "pwfile").write_text(password + "\n")
        (folder / "pwfile").chmod(0o644)  # readable by the server user; the folder goes at the end
        auth = ["--auth-host", "scram-sha-256", "--auth-local", "scram-sha-256", "--pwfile", folder / "pwfile"]
    pg_ctl = [bin_dir / "pg_ctl", "-D", folder / "data", "-w", "-t", SERVER_START_S]
    url = f"postgresql://zoo@127.0.0.1:{port}"
    try:
        run(bin_dir / "initdb", "-D", folder / "data", *auth, "-U", "zoo")
        start = [*pg_ctl, "-l", folder / "log", "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start"]
        run(*start)
        for name in databases:
            run(bin_dir / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "zoo", name)
        _PG_CTL[url] = ([*as_server, *map(str, pg_ctl), "-m", "fast", "stop"], [*as_server, *map(str, start)])
        yield url
    finally:
        _PG_CTL.pop(url, None)
        subprocess.run([*as_server, str(bin_dir / "pg_ctl"), "-D", str(folder / "data"), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def restart_postgres(url: str, down_s: float = 0.0) -> None:
    """Restart the :func:`postgres_server` at ``url`` as ``pg_ctl restart`` does (fast shutdown: open
    sessions are ended), staying down ``down_s`` seconds in between; same port, same data."""
    stop, start = _PG_CTL[url]
    subprocess.run(stop, check=True, capture_output=True, timeout=SERVER_START_S)
    time.sleep(down_s)
    subprocess.run(start, check=True, capture_output=True, timeout=SERVER_START_S)


@contextmanager
def mlflow_server(backend_store_uri: str, artifacts: Path, auth_config: Path | None = None,
                  env: dict[str, str] | None = None, port: int | None = None) -> Iterator[str]:
    """``mlflow server`` with ``backend_store_uri`` and artifacts served from ``artifacts``
    (MLflow 3 serves them through the server by default); yields ``http://127.0.0.1:PORT``.

    ``auth_config``: MLflow's basic-auth ini (see :func:`write_auth_config`); the server then
    runs ``--app-name basic-auth`` and answers 401 to a request without valid credentials.
    ``env``: extra variables for the server (e.g. PGPASSWORD for its backend store).
    ``port``: start there (a server restarted on the same address); default a free one.
    """
    port = port or free_port()
    artifacts.mkdir(parents=True, exist_ok=True)
    log = open(artifacts.parent / f"mlflow-server-{port}.log", "a")  # a restart adds to its log
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri,
               "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
    server_env = {**os.environ, **(env or {})}
    if auth_config is not None:
        command += ["--app-name", "basic-auth"]
        server_env["MLFLOW_AUTH_CONFIG_PATH"] = str(auth_config)
        # The login's CSRF protection needs a fixed key (the server refuses to start without one).
        server_env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(16))
    # Its own process group: stopping it stops the workers it forks too.
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=server_env)
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


def write_auth_config(folder: Path, admin_password: str, default_permission: str = "NO_PERMISSIONS") -> Path:
    """MLflow's basic-auth ini: its user database (SQLite) in ``folder``, admin ``admin`` with
    ``admin_password``, and ``default_permission`` for what a user was not granted."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "basic_auth.ini"
    path.write_text(f"[mlflow]\ndefault_permission = {default_permission}\n"
                    f"database_uri = sqlite:///{folder / 'basic_auth.db'}\n"
                    f"admin_username = admin\nadmin_password = {admin_password}\n"
                    "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    path.chmod(0o600)  # it holds the admin password
    return path


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False
