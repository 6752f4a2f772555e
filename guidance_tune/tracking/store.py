"""Where MLflow keeps its record, checked before anything runs and created exactly once.

MLflow's own client retries an unreachable server for minutes and creates a missing SQLite file
on any query; two processes that open a new SQLite file at once race in its schema migration.
So every command first asks :func:`check_store` (seconds, not minutes; a query never creates a
store) and creates a new store through :func:`prepare_store`, under a lock.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from guidance_tune.config import ConfigError

PROBE_SECONDS = 5
SQL_SCHEMES = ("postgresql", "mysql", "mssql")


def resolve_tracking_uri(uri: str | None) -> str:
    """An absolute URI that means the same in every process (trial processes run elsewhere).

    None falls back to ``MLFLOW_TRACKING_URI`` and then to ``mlflow.db`` in the working dir;
    a bare path or a relative ``sqlite:///`` path is made absolute.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if "://" not in uri:
        return "sqlite:///" + str(Path(uri).resolve())
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def check_store(uri: str, *, create: bool) -> None:
    """Refuse, with the fix, a store this process can't use: a missing SQLite file when only
    reading (``create=False``), an unwritable one, a server that doesn't answer in seconds."""
    scheme = uri.split("://", 1)[0].split("+", 1)[0]
    if (path := sqlite_path(uri)) is not None:
        _check_sqlite(path, create)
    elif scheme in ("http", "https"):
        _probe_server(uri)
    elif scheme in SQL_SCHEMES:
        _probe_database(uri)
    elif scheme == "file":
        raise ConfigError(
            f"tracking URI {uri}: MLflow no longer writes file stores; use "
            "sqlite:///PATH/mlflow.db or an http:// server (`mlflow migrate-filestore` converts "
            "an old one)"
        )


def _check_sqlite(path: Path, create: bool) -> None:
    if path.is_file():
        if not os.access(path, os.R_OK | os.W_OK) or not os.access(path.parent, os.W_OK):
            raise ConfigError(
                f"MLflow store {path} is not writable by this user: fix its permissions or pass "
                "another --tracking-uri"
            )
        return
    if path.exists():
        raise ConfigError(f"MLflow store {path} exists but is not a file: pass a .db file path")
    if not create:
        raise ConfigError(
            f"no MLflow store at {path}: nothing has been recorded there; pass the store a run "
            "or study logged to with --tracking-uri (or set MLFLOW_TRACKING_URI)"
        )
    folder = _existing_ancestor(path.parent)
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise ConfigError(
            f"cannot create MLflow store {path}: {folder} is not writable; pass another "
            "--tracking-uri"
        )


def _existing_ancestor(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _port(uri: str) -> int:
    """The port a server URI names, or its scheme's (MLflow's own 5000 is no default here)."""
    parsed = urlparse(uri)
    return parsed.port or (443 if parsed.scheme == "https" else 80)


def _probe_server(uri: str) -> None:
    """One request, no retries, a short timeout, with the credentials MLflow itself would use."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        response = http_request(
            get_default_host_creds(uri),
            "/api/2.0/mlflow/experiments/search",
            "POST",
            max_retries=0,
            timeout=PROBE_SECONDS,
            raise_on_status=False,
            json={"max_results": 1},
        )
    except Exception as error:  # noqa: BLE001 - any failure to connect means the same to the user
        raise ConfigError(
            f"MLflow server {uri} did not answer within {PROBE_SECONDS} s ({type(error).__name__}):"
            f" start it (`mlflow server --host 127.0.0.1 --port {_port(uri)}`) or fix "
            "--tracking-uri"
        ) from None
    if response.status_code in (401, 403):
        raise ConfigError(
            f"MLflow server {uri} refused the request (HTTP {response.status_code}): set "
            "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN"
        )
    if response.status_code != 200:
        raise ConfigError(
            f"{uri} answered HTTP {response.status_code} to an MLflow API request: is it an "
            "MLflow tracking server?"
        )


def _probe_database(uri: str) -> None:
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": PROBE_SECONDS})
        with engine.connect():
            pass
    except (ImportError, sqlalchemy.exc.NoSuchModuleError) as error:
        raise ConfigError(
            f"tracking URI {uri}: its database driver is not installed ({error}); install it (for "
            "PostgreSQL: pip install 'guidance-tune[server]', with a postgresql+psycopg2:// URI)"
        ) from None
    except sqlalchemy.exc.SQLAlchemyError as error:
        reason = str(error).strip().splitlines()[0]
        raise ConfigError(f"tracking database {uri} is not reachable: {reason}") from None


@contextmanager
def _store_lock(uri: str):
    """An exclusive lock on the SQLite file's folder for the length of a schema migration."""
    path = sqlite_path(uri)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        yield
    finally:
        os.close(folder)


def prepare_store(uri: str) -> None:
    """Create (and migrate) the store once, before any run: opening it under the lock means a
    second process finds the schema complete instead of migrating it a second time."""
    import mlflow

    with _store_lock(uri):
        mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
