"""The team deployment, for real and on loopback: a 2-node Ray cluster (with the dashboard that
takes `ray job submit`) and `mlflow server` on PostgreSQL or SQLite with served artifacts."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest
import yaml

from guidance_tune.tracking.view import runs_page

from .factories import RELEASE_FILE
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
from .test_study import STEPS, scripted_target, study_dict

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def env():
    # the package's commands on the nodes' $PATH, as on a cluster where it is installed
    path = os.pathsep.join([str(BIN), os.environ.get("PATH", "")])
    return {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1", "PATH": path}


class Cluster:
    """A loopback Ray cluster of a head and worker nodes, one CPU each, each its own temp dir
    (as on separate machines: a shared one lets a node's clean-up of a job's working dir pull
    it from under the other); socket paths must stay under 107 bytes."""

    COMMON = ["--num-gpus", "0", "--node-ip-address", "127.0.0.1", "--block"]

    def __init__(self, logs: Path, env) -> None:
        self.logs, self.env = logs, env
        logs.mkdir(parents=True, exist_ok=True)
        self.address = f"127.0.0.1:{free_port()}"
        self.jobs = f"http://127.0.0.1:{free_port()}"
        self.nodes: list[subprocess.Popen] = []
        self.temps: list[str] = []

    @staticmethod
    def own_ports() -> list[str]:
        """A node's agent, metrics and client ports, free ones instead of Ray's fixed defaults:
        a second copy of the suite on this machine (its own cluster) must not take them."""
        names = ("dashboard-agent-listen", "dashboard-agent-grpc", "metrics-export")
        names += ("runtime-env-agent", "ray-client-server")
        return [item for name in names for item in (f"--{name}-port", str(free_port()))]

    def _start(self, args: list[str], cpus: int = 1) -> Path:
        self.temps.append(tempfile.mkdtemp(prefix="gt-ray-"))
        log = self.logs / f"node-{len(self.nodes)}.log"
        command = [str(BIN / "ray"), "start", *args, "--temp-dir", self.temps[-1]]
        command += ["--num-cpus", str(cpus), *self.COMMON, *self.own_ports()]
        self.nodes.append(start(command, log, self.env))
        return log

    def start_head(self, cpus: int = 1) -> None:
        port = self.address.rpartition(":")[2]
        dashboard_port = self.jobs.rpartition(":")[2]
        dashboard = ["--dashboard-host", "127.0.0.1", "--dashboard-port", dashboard_port]
        log = self._start(["--head", "--port", port, *dashboard], cpus)
        wait_until(lambda: "Ray runtime started" in log.read_text(), 90, "head")

    def add_node(self, alive: int) -> None:
        """One more worker node; returns once the cluster has ``alive`` nodes."""
        self._start(["--address", self.address])
        wait_until(lambda: _node_count(self.address, self.env) == alive, 180, f"node {alive}")

    def processes(self, node: int) -> list[int]:
        """Every process of node ``node``: its raylet's workers are in process groups of their
        own, so the tree."""
        root = self.nodes[node].pid
        return [root, *_descendants(root)]

    def _signal(self, node: int, number: int) -> None:
        for pid in self.processes(node):
            try:
                os.kill(pid, number)
            except ProcessLookupError:  # ended meanwhile
                pass

    def kill(self, node: int) -> None:
        """Node ``node`` lost at once, as a machine is: every process of it, SIGKILL, no
        clean-up; its connections close."""
        self._signal(node, signal.SIGKILL)
        self.nodes[node].wait()

    def freeze(self, node: int) -> None:
        """Node ``node`` gone silent, as a machine cut off the network or powered off is: every
        process of it stopped, its connections left open (kill() ends it)."""
        self._signal(node, signal.SIGSTOP)

    def stop(self) -> None:
        stop(*self.nodes)
        for temp in self.temps:
            shutil.rmtree(temp, ignore_errors=True)


def _descendants(root: int) -> list[int]:
    """Every process below ``root``, from /proc's parent links."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # ended meanwhile
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, queue = [], [root]
    while queue:
        below = children.get(queue.pop(), [])
        found += below
        queue += below
    return found


@contextmanager
def ray_cluster(logs: Path, env) -> Iterator[Cluster]:
    """A head and one worker node, the head's job submission up."""
    cluster = Cluster(logs, env)
    try:
        cluster.start_head()
        cluster.add_node(alive=2)
        wait_until(lambda: http_ok(f"{cluster.jobs}/api/version"), 90, "job submission")
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory, env):
    """Yields (Ray address, job submission address)."""
    with ray_cluster(tmp_path_factory.mktemp("cluster"), env) as cluster:
        yield cluster.address, cluster.jobs


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


def _held_two_worker_study(name: str, tmp_path: Path, tracking_uri: str) -> tuple[Path, Path]:
    """One trial of 2 workers of one node's CPU each (a worker on each node), each replica
    holding mid-epoch 2 until ``markers/release``: the study file and the markers' folder."""
    markers = tmp_path / "markers"
    markers.mkdir()
    spec = study_dict(
        name,
        tmp_path,
        num_trials=1,
        scheduler={"kind": "fifo"},
        tracking_uri=tracking_uri,
        register_model=False,
        resources={"cpus": 1, "workers": 2},
    )
    spec["target"] = scripted_target(markers, hold_at=STEPS + 2)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path, markers


def test_a_two_worker_trial_that_loses_a_node_goes_on_from_its_checkpoint_in_its_run(
    tmp_path, env, mlflow_server
):
    path, markers = _held_two_worker_study("node-loss", tmp_path, mlflow_server)
    with ray_cluster(tmp_path / "cluster", env) as cluster:
        launch = ["study", "launch", str(path), "--address", cluster.address]
        launched = start([str(BIN / "guidance-tune"), *launch], tmp_path / "launch.log", env)
        try:
            # a replica held in epoch 2's 2nd step: epoch 1 is logged, its checkpoint reported
            wait_until(lambda: any(markers.glob("held-*")), 300, "a held replica")
            cluster.kill(1)  # the worker node, and the replica (or the trial's process) on it
            lost_ms = int(time.time() * 1000)
            (markers / RELEASE_FILE).touch()
            cluster.add_node(alive=2)  # the retry's second worker goes there
            launched.wait(timeout=600)
        finally:
            stop(launched)
    console = (tmp_path / "launch.log").read_text()
    assert launched.returncode == 0, console[-3000:]
    assert "1 trials, 0 failed" in console
    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("node-loss")
    (child,) = client.search_runs([experiment.experiment_id], "tags.`guidance_tune.role` = 'trial'")
    assert child.info.status == "FINISHED" and child.data.tags["status"] == "finished"
    assert "error" not in child.data.tags  # the node it lost is not how it ended
    history = client.get_metric_history(child.info.run_id, "val/loss")
    assert sorted(m.step for m in history) == [1, 2, 3]  # no epoch lost, none logged twice
    assert all(m.timestamp > lost_ms for m in history if m.step > 1)  # went on after the loss
    nodes = {child.data.tags["ray.node_id"]} | {
        other.split("@")[1] for other in child.data.tags["replicas"].split(",")
    }
    assert len(nodes) == 2  # the retry ran on the head and the new node, a worker on each


def test_a_two_worker_trial_whose_replica_node_goes_silent_is_retried_in_seconds(
    tmp_path, env, mlflow_server
):
    # a frozen node closes no connection: without the trial's watch, its process would wait in
    # a collective for the group's 30-minute timeout. Ray declares the node dead by its health
    # checks (made quick here: about 3 s) and the trial is retried on a new node.
    quick = {
        "RAY_health_check_initial_delay_ms": "1000",
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_timeout_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
    }
    path, markers = _held_two_worker_study("node-silent", tmp_path, mlflow_server)
    cluster = Cluster(tmp_path / "cluster", {**env, **quick})
    launched = silent = None
    try:
        cluster.start_head(cpus=0)  # the two workers go to nodes 1 and 2, one each
        cluster.add_node(alive=2)
        cluster.add_node(alive=3)
        launch = ["study", "launch", str(path), "--address", cluster.address]
        launched = start([str(BIN / "guidance-tune"), *launch], tmp_path / "launch.log", env)
        wait_until(lambda: any(markers.glob("held-*")), 300, "a held replica")
        client = mlflow.MlflowClient(mlflow_server)
        experiment = client.get_experiment_by_name("node-silent")
        (child,) = client.search_runs(
            [experiment.experiment_id], "tags.`guidance_tune.role` = 'trial'"
        )
        replica = int(child.data.tags["replicas"].split("@")[0])
        silent = next(node for node in (1, 2) if replica in cluster.processes(node))
        cluster.freeze(silent)  # the node of the replica, not of the trial's process
        lost_ms = int(time.time() * 1000)
        (markers / RELEASE_FILE).touch()
        cluster.add_node(alive=3)  # the retry's second worker goes there
        launched.wait(timeout=300)  # not the 30 minutes of the collective's timeout
    finally:
        if launched is not None:
            stop(launched)
        if silent is not None:  # stopped processes take no SIGTERM
            cluster.kill(silent)
        cluster.stop()
    console = (tmp_path / "launch.log").read_text()
    assert launched.returncode == 0, console[-3000:]
    assert "1 trials, 0 failed" in console
    (child,) = client.search_runs([experiment.experiment_id], "tags.`guidance_tune.role` = 'trial'")
    assert child.info.status == "FINISHED" and child.data.tags["status"] == "finished"
    history = client.get_metric_history(child.info.run_id, "val/loss")
    assert sorted(m.step for m in history) == [1, 2, 3]  # no epoch lost, none logged twice
    assert all(m.timestamp > lost_ms for m in history if m.step > 1)
