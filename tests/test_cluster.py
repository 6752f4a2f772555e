"""A study on a real 2-node Ray cluster logging to a real `mlflow server`, all on loopback."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import pytest
import yaml

from .processes import free_port, start, stop, wait_until
from .test_study import study_dict

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


@pytest.fixture
def env():
    return {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def two_node_cluster(tmp_path, env):
    port = free_port()
    ray_temp = tempfile.mkdtemp(prefix="gt-ray-")  # socket paths must stay under 107 bytes
    common = ["--num-cpus", "1", "--num-gpus", "0", "--node-ip-address", "127.0.0.1", "--block"]
    head = start(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--port",
            str(port),
            "--include-dashboard",
            "false",
            "--temp-dir",
            ray_temp,
            *common,
        ],
        tmp_path / "head.log",
        env,
    )
    address = f"127.0.0.1:{port}"
    worker = None
    try:
        wait_until(lambda: "Ray runtime started" in (tmp_path / "head.log").read_text(), 90, "head")
        worker = start(
            [str(BIN / "ray"), "start", "--address", address, *common],
            tmp_path / "worker.log",
            env,
        )
        wait_until(lambda: _node_count(address, env) == 2, 90, "second node")
        yield address
    finally:
        stop(worker, head)
        shutil.rmtree(ray_temp, ignore_errors=True)


def _node_count(address: str, env) -> int:
    probe = (
        f"import ray; ray.init(address={address!r}, log_to_driver=False); "
        "print(len([n for n in ray.nodes() if n['Alive']]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60
    )
    return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else 0


def test_a_study_on_a_two_node_cluster_logs_over_http_to_an_mlflow_server(
    tmp_path, env, mlflow_server, two_node_cluster
):
    spec = study_dict(
        "two-nodes",
        tmp_path,
        num_trials=2,
        max_concurrent_trials=2,
        scheduler={"kind": "fifo"},
        tracking_uri=mlflow_server,
        baseline_first=False,
    )
    path = tmp_path / "two-nodes.yaml"
    path.write_text(yaml.safe_dump(spec))
    launched = subprocess.run(
        [str(BIN / "guidance-tune"), "study", "launch", str(path), "--address", two_node_cluster],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=tmp_path,
    )
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("two-nodes")
    children = client.search_runs([experiment.experiment_id], "tags.`guidance_tune.role` = 'trial'")
    assert len(children) == 2
    assert all(child.info.status == "FINISHED" for child in children)
    assert len({child.data.tags["ray.node_id"] for child in children}) == 2
    assert all(client.list_artifacts(child.info.run_id) for child in children)
    assert not (tmp_path / "mlflow.db").exists()  # nothing went to a local store instead
