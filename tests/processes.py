"""Real server and cluster processes for tests, each in its own session so that stopping one
stops its whole process tree and never the tests' own Ray."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(args, log: Path, env) -> subprocess.Popen:
    # own session so teardown stops this process tree only, never the tests' own Ray
    return subprocess.Popen(
        args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


def stop(*processes: subprocess.Popen | None) -> None:
    """SIGTERM to every process group at once, then SIGKILL to those still up after 5 s."""
    running = [p for p in processes if p is not None and p.poll() is None]
    for process in running:
        os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    for process in running:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def wait_until(check, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not come up within {seconds} s")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def serve_mlflow(root: Path, backend_store_uri: str):
    """A real `mlflow server` on a free loopback port, serving artifacts from ``root``."""
    port = free_port()
    command = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--backend-store-uri", backend_store_uri]
    command += ["--artifacts-destination", str(root / "artifacts")]
    server = start(command, root / "server.log", {**os.environ, "RAY_ADDRESS": ""})
    try:
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/health"), 90, "mlflow server")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(server)


def postgres_bin() -> Path | None:
    """Where the server binaries are: on $PATH, or where Debian's `postgresql` puts them."""
    if initdb := shutil.which("initdb"):
        return Path(initdb).resolve().parent
    installed = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=_major_version)
    return installed[-1].parent if installed else None


def _major_version(initdb: Path) -> int:
    return int(initdb.parent.parent.name) if initdb.parent.parent.name.isdigit() else 0


@contextlib.contextmanager
def private_postgres(bin_dir: Path):
    """A throwaway PostgreSQL cluster on a free loopback port, with one database `mlflow`
    (trust auth, loopback only), removed afterwards. Yields the SQLAlchemy URI MLflow takes.

    PostgreSQL refuses to run as root; as root the cluster runs as the `postgres` user the
    Debian package creates, in a directory that user owns.
    """
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="gt-pg-"))  # short: the socket path has a size limit
    if as_user:
        shutil.chown(root, user="postgres")
    data, port = root / "data", free_port()

    def run(tool: str, *args: str) -> None:
        subprocess.run(
            [*as_user, str(bin_dir / tool), *args], check=True, capture_output=True, timeout=120
        )

    run("initdb", "-D", str(data), "-U", "mlflow", "--auth=trust", "-E", "UTF8", "--no-sync")
    started = False
    try:
        log, options = str(root / "postgres.log"), f"-h 127.0.0.1 -p {port} -k {root}"
        run("pg_ctl", "-D", str(data), "-l", log, "-w", "-o", options, "start")
        started = True
        run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow")
        yield f"postgresql+psycopg2://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        if started:
            run("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)
