"""The team deployment, for real and on loopback: a 2-node Ray cluster (with the dashboard that
takes `ray job submit`) and `mlflow server` on PostgreSQL or SQLite with served artifacts."""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from guidance_tune.tracking.view import runs_page

from .processes import (
    free_port,
    http_ok,
    postgres_bin,
    private_postgres,
    serve_mlflow,
    start,
    stop,
    wait_until,
)
from .test_study import study_dict

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def env():
    # the package's commands on the nodes' $PATH, as on a cluster where it is installed
    path = os.pathsep.join([str(BIN), os.environ.get("PATH", "")])
    return {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1", "PATH": path}


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory, env):
    """Yields (Ray address, job submission address)."""
    logs = tmp_path_factory.mktemp("cluster")
    port, dashboard_port = free_port(), free_port()
    # socket paths must stay under 107 bytes; one directory per node, as on separate machines
    # (a shared one lets a node's clean-up of a job's working dir pull it from under the other)
    head_temp, worker_temp = tempfile.mkdtemp(prefix="gt-ray-"), tempfile.mkdtemp(prefix="gt-ray-")
    common = ["--num-cpus", "1", "--num-gpus", "0", "--node-ip-address", "127.0.0.1", "--block"]

    def own_ports() -> list[str]:
        """A node's agent, metrics and client ports, free ones instead of Ray's fixed defaults:
        a second copy of the suite on this machine (its own cluster) must not take them."""
        names = ("dashboard-agent-listen", "dashboard-agent-grpc", "metrics-export")
        names += ("runtime-env-agent", "ray-client-server")
        return [item for name in names for item in (f"--{name}-port", str(free_port()))]

    dashboard = ["--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port)]
    head = start(
        [str(BIN / "ray"), "start", "--head", "--port", str(port), "--temp-dir", head_temp]
        + dashboard
        + common
        + own_ports(),
        logs / "head.log",
        env,
    )
    address, jobs = f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}"
    worker = None
    try:
        wait_until(lambda: "Ray runtime started" in (logs / "head.log").read_text(), 90, "head")
        worker = start(
            [str(BIN / "ray"), "start", "--address", address, "--temp-dir", worker_temp]
            + common
            + own_ports(),
            logs / "worker.log",
            env,
        )
        wait_until(lambda: _node_count(address, env) == 2, 180, "second node")
        wait_until(lambda: http_ok(f"{jobs}/api/version"), 90, "job submission")
        yield address, jobs
    finally:
        stop(worker, head)
        for temp in (head_temp, worker_temp):
            shutil.rmtree(temp, ignore_errors=True)


def _node_count(address: str, env) -> int:
    """Alive nodes as a driver sees them; 0 while it can't tell. A probe takes ~2 s here, but on
    a loaded 2-core CI machine one once hung in `ray.init` past 60 s while the second node was
    joining, so a stuck probe counts as "not yet" and the next one asks again."""
    probe = (
        f"import ray; ray.init(address={address!r}, log_to_driver=False); "
        "print(len([n for n in ray.nodes() if n['Alive']]))"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=40
        )
    except subprocess.TimeoutExpired:
        return 0
    return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else 0


@pytest.fixture(scope="module")
def postgres_mlflow_server(tmp_path_factory):
    """`mlflow server` on a private PostgreSQL cluster: the README's team server."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    root = tmp_path_factory.mktemp("mlflow-postgres")
    with private_postgres(bin_dir) as database, serve_mlflow(root, database) as url:
        yield url, root / "artifacts"


def write_study(tmp_path, name, tracking_uri, **study) -> Path:
    """Two trials at once, one per node: the unguided baseline and one guided. Each in a fresh
    process: with worker reuse, a trial this short can end before the other node's worker has
    started, and Tune then runs the second trial in the first one's process, on its node."""
    spec = study_dict(
        name,
        tmp_path,
        num_trials=2,
        max_concurrent_trials=2,
        scheduler={"kind": "fifo"},
        tracking_uri=tracking_uri,
        reuse_actors=False,
        **study,
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def assert_both_nodes_logged_the_study(uri, name):
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    children = client.search_runs([experiment.experiment_id], "tags.`guidance_tune.role` = 'trial'")
    assert len(children) == 2
    assert all(child.info.status == "FINISHED" for child in children)
    assert len({child.data.tags["ray.node_id"] for child in children}) == 2
    assert all(client.list_artifacts(child.info.run_id) for child in children)
    return experiment, children


def test_a_study_on_a_two_node_cluster_logs_to_an_mlflow_server_on_postgresql(
    tmp_path, env, postgres_mlflow_server, two_node_cluster
):
    uri, artifacts_destination = postgres_mlflow_server
    path = write_study(tmp_path, "two-nodes", uri)
    launched = subprocess.run(
        ["guidance-tune", "study", "launch", str(path), "--address", two_node_cluster[0]],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=tmp_path,
    )
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    experiment, children = assert_both_nodes_logged_the_study(uri, "two-nodes")
    # the artifacts went through the server to its destination, nothing to a local store
    assert list(artifacts_destination.glob(f"{experiment.experiment_id}/*/artifacts/*"))
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    (version,) = mlflow.MlflowClient(uri).search_model_versions("name = 'two-nodes'")
    assert version.run_id in {child.info.run_id for child in children}
    console = launched.stdout
    assert "best guided best/loss" in console and "vs best unguided best/loss" in console
    page = runs_page(uri, experiment.experiment_id, "two-nodes")
    assert f"open it in MLflow: {page}" in console
    assert "\x1b" not in console + launched.stderr


def test_ray_job_submit_runs_a_study_on_the_cluster(tmp_path, env, mlflow_server, two_node_cluster):
    write_study(tmp_path, "submitted", mlflow_server, register_model=False)  # tested above
    deadline = time.monotonic() + 120
    while True:  # the head's job agent can come up after its API: Ray says to try again
        submitted = subprocess.run(
            ["ray", "job", "submit", "--address", two_node_cluster[1], "--working-dir", "."]
            + ["--", "guidance-tune", "study", "launch", "submitted.yaml"],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
            cwd=tmp_path,
        )
        if "No available agent" not in submitted.stderr or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    assert_both_nodes_logged_the_study(mlflow_server, "submitted")
    assert "best guided best/loss" in submitted.stdout  # the job's output reaches the submitter
