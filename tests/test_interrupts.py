"""A study interrupted at each point of a trial's life, then resumed: the record stays whole;
and the same for one `train --checkpoint` run cut off by Ctrl-C.

The driver runs as a real process on its own local Ray, logging over HTTP to a real
`mlflow server` through a small proxy that can hold the upload of a best checkpoint, so that a
test can interrupt the driver exactly while it uploads. Trials are held before their first
epoch or mid-epoch by the test model in tests/factories.py.
"""

import http.server
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml

from guidance_tune.cli.main import main
from guidance_tune.tracking.record import BEST_WEIGHTS_ARTIFACT

from .factories import RELEASE_FILE
from .processes import start, stop, wait_until
from .test_cli import TINY
from .test_study import STEPS, assert_best_checkpoint_is_the_best_epoch, scripted_target, study_dict

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
TRIALS = 2


class UploadGate:
    """An HTTP proxy to the MLflow server that, while closed, holds every upload of a best
    checkpoint: it signals ``held`` and waits, then forwards it (``forward``) or drops it."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.closed = False
        self.held = threading.Event()
        self.opened = threading.Event()
        self.forward = True
        gate = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def relay(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if gate.closed and self.path.endswith(BEST_WEIGHTS_ARTIFACT):
                    gate.held.set()
                    gate.opened.wait()
                    if not gate.forward:
                        self.close_connection = True
                        return
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                request = urllib.request.Request(
                    gate.upstream + self.path, data=body or None, method=self.command
                )
                for key, value in headers.items():
                    request.add_header(key, value)
                try:
                    response = urllib.request.urlopen(request, timeout=60)
                except urllib.error.HTTPError as error:
                    response = error
                payload = response.read()
                self.send_response(response.status)
                for key, value in response.headers.items():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = relay

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.closed, self.forward = True, True
        self.held.clear()
        self.opened.clear()

    def open(self, forward: bool = True) -> None:
        self.closed, self.forward = False, forward
        self.opened.set()


@pytest.fixture(scope="module")
def gate(mlflow_server):
    upload_gate = UploadGate(mlflow_server)
    yield upload_gate
    upload_gate.server.shutdown()


def reap(process: subprocess.Popen) -> None:
    """A SIGKILLed driver's local Ray leaves agents behind in its process group."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


HOLD_AT = {"before its first epoch": 1, "mid-epoch": STEPS + 2, "during the upload": None}


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGKILL"])
@pytest.mark.parametrize("moment", list(HOLD_AT))
def test_an_interrupted_study_resumes_with_every_trial_recorded_once_and_whole(
    ray_local, gate, tmp_path, moment, signal_name
):
    name = f"cut-{HOLD_AT[moment]}-{signal_name.lower()}"
    markers = tmp_path / "markers"
    markers.mkdir()
    spec = study_dict(
        name,
        tmp_path,
        num_trials=TRIALS,
        max_concurrent_trials=TRIALS,
        scheduler={"kind": "fifo"},
        tracking_uri=gate.url,
    )
    spec["target"] = scripted_target(markers, hold_at=HOLD_AT[moment])
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    if moment == "during the upload":
        gate.close()
    log = tmp_path / "driver.log"
    driver = start(
        [str(BIN / "guidance-tune"), "study", "launch", str(path)],
        log,
        {**os.environ, "RAY_ADDRESS": ""},
    )
    try:
        if moment == "during the upload":
            reached = lambda: gate.held.is_set()  # noqa: E731
        else:
            reached = lambda: any(markers.glob("held-*"))  # noqa: E731
        wait_until(lambda: reached() or driver.poll() is not None, 240, moment)
        assert driver.poll() is None, log.read_text()[-3000:]
        driver.send_signal(getattr(signal, signal_name))
        if signal_name == "SIGINT":
            gate.open(forward=True)  # a Ctrl-C'd driver finishes what it was writing
            (markers / RELEASE_FILE).touch()  # and its trials need not wait to be stopped
            driver.wait(timeout=180)
        else:
            driver.wait(timeout=30)
            gate.open(forward=False)  # the killed driver's upload never arrives
        time.sleep(2)  # what the dead driver's Ray still had in flight
    finally:
        stop(driver)
        reap(driver)
    (markers / RELEASE_FILE).touch()
    assert "\x1b" not in log.read_text()  # output to a file: no colour codes from Ray

    client = mlflow.MlflowClient(gate.url)
    experiment = client.get_experiment_by_name(name).experiment_id
    if signal_name == "SIGINT":  # a graceful stop leaves nothing open
        # 0 where every trial had completed by then (possible during the upload)
        assert driver.returncode in (0, 130), log.read_text()[-3000:]
        if moment != "during the upload":
            assert driver.returncode == 130, log.read_text()[-3000:]
        assert not client.search_runs([experiment], "attributes.status = 'RUNNING'")

    assert main(["study", "launch", str(path), "--resume"]) == 0
    runs = client.search_runs([experiment])
    parents = [run for run in runs if run.data.tags["guidance_tune.role"] == "study"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.metrics["num_trials"] == TRIALS
    children = [run for run in runs if run.data.tags["guidance_tune.role"] == "trial"]
    trial_ids = [child.data.tags["ray.trial_id"] for child in children]
    assert len(children) == len(set(trial_ids)) == TRIALS
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags["status"] == "finished"
        assert "error" not in child.data.tags
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val/loss")]
        assert sorted(steps) == list(range(1, len(steps) + 1))  # each epoch logged once
        assert_best_checkpoint_is_the_best_epoch(gate.url, child, tmp_path / child.info.run_id)


def test_a_trial_lost_with_a_driver_killed_before_tune_saved_it_is_marked_killed(
    ray_local, gate, tmp_path
):
    """Tune saves its trials at its first step, then every 10 s or more: a trial started in
    between and a driver killed then leave a run whose trial the resumed study never knows."""
    name = "lost-trial"
    markers = tmp_path / "markers"
    markers.mkdir()
    spec = study_dict(
        name, tmp_path, num_trials=2, scheduler={"kind": "fifo"}, tracking_uri=gate.url
    )
    spec["target"] = scripted_target(markers, hold_at=1, hold_if="armed")
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    client = mlflow.MlflowClient(gate.url)

    def finished_trials():
        experiment = client.get_experiment_by_name(name)
        query = "tags.`guidance_tune.role` = 'trial' and attributes.status = 'FINISHED'"
        return experiment and client.search_runs([experiment.experiment_id], query)

    env = {**os.environ, "RAY_ADDRESS": "", "TUNE_GLOBAL_CHECKPOINT_S": "3600"}
    driver = start(
        [str(BIN / "guidance-tune"), "study", "launch", str(path)], tmp_path / "log", env
    )
    try:
        wait_until(lambda: finished_trials() or driver.poll() is not None, 240, "first trial")
        (markers / "armed").touch()  # the second trial, made after Tune's only save, holds
        wait_until(lambda: any(markers.glob("held-*")) or driver.poll() is not None, 240, "hold")
        assert driver.poll() is None, (tmp_path / "log").read_text()[-3000:]
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        stop(driver)
        reap(driver)
    (markers / RELEASE_FILE).touch()

    assert main(["study", "launch", str(path), "--resume"]) == 0
    experiment = client.get_experiment_by_name(name).experiment_id
    runs = client.search_runs([experiment], "tags.`guidance_tune.role` = 'trial'")
    lost = [run for run in runs if run.data.tags["status"] == "killed"]
    kept = [run for run in runs if run not in lost]
    assert len(lost) == 1 and "lost with the driver" in lost[0].data.tags["error"]
    assert lost[0].info.status == "KILLED"
    assert len(kept) == len({run.data.tags["ray.trial_id"] for run in kept}) == 2
    assert all(run.data.tags["status"] == "finished" for run in kept)
    (parent,) = client.search_runs([experiment], "tags.`guidance_tune.role` = 'study'")
    assert parent.info.status == "FINISHED" and parent.data.metrics["num_trials"] == 2


def test_a_ctrl_c_train_prints_the_command_that_resumes_it_into_the_same_mlflow_run(tmp_path):
    markers, checkpoint = tmp_path / "markers", tmp_path / "checkpoint"
    markers.mkdir()
    steps = TINY["train"]["max_steps_per_epoch"]
    config = {
        **TINY,
        "target": scripted_target(markers, hold_at=steps + 1),  # epoch 2's first step
        "train": {**TINY["train"], "epochs": 3},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    typed = ["guidance-tune", "train", str(path), "--set", "optim.lr=2e-3", "--quiet"]
    typed += ["--tracking-uri", uri, "--experiment", "ctrl-c", "--checkpoint", str(checkpoint)]
    # the printed command is run as the user would run it: from $PATH
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": "",
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }
    log = tmp_path / "train.log"
    process = start(typed, log, env)
    try:
        wait_until(lambda: any(markers.glob("held-*")) or process.poll() is not None, 240, "hold")
        assert process.poll() is None, log.read_text()[-3000:]
        assert (checkpoint / "state.pt").is_file()  # epoch 1 is saved
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
    finally:
        stop(process)
    output = log.read_text()
    assert process.returncode == 130, output[-3000:]
    (line,) = [line for line in output.splitlines() if line.startswith("interrupted:")]
    command = line.split("`")[1]
    assert command == f"{shlex.join(typed)} --resume {checkpoint}"

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("ctrl-c").experiment_id
    (killed,) = client.search_runs([experiment])
    assert killed.info.status == "KILLED" and killed.data.tags["status"] == "killed"

    (markers / RELEASE_FILE).touch()  # the resumed run's scripted model holds no more
    resumed = subprocess.run(
        shlex.split(command), env=env, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (run,) = client.search_runs([experiment])
    assert run.info.run_id == killed.info.run_id
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "finished"
    assert "error" not in run.data.tags
    steps_logged = [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")]
    assert sorted(steps_logged) == [1, 2, 3]


def _ctrl_c_once_held(path: Path, markers: Path) -> str:
    """``study launch path`` in a driver process, Ctrl-C'd once a trial holds (its scripted
    target's ``held-*`` marker), then released; the driver's output, its exit code 130."""
    log = path.with_suffix(".log")
    command = [str(BIN / "guidance-tune"), "study", "launch", str(path)]
    driver = start(command, log, {**os.environ, "RAY_ADDRESS": ""})
    try:
        wait_until(lambda: any(markers.glob("held-*")) or driver.poll() is not None, 240, "held")
        assert driver.poll() is None, log.read_text()[-3000:]
        driver.send_signal(signal.SIGINT)
        (markers / RELEASE_FILE).touch()
        driver.wait(timeout=180)
    finally:
        stop(driver)
        reap(driver)
    output = log.read_text()
    assert driver.returncode == 130, output[-3000:]
    return output


def test_a_ctrl_c_two_worker_study_resumes_its_trial_with_both_workers_into_its_run(
    ray_local, tmp_path
):
    markers = tmp_path / "markers"
    markers.mkdir()
    spec = study_dict(
        "cut-workers",
        tmp_path,
        num_trials=1,
        scheduler={"kind": "fifo"},
        resources={"cpus": 1, "workers": 2},
    )
    spec["target"] = scripted_target(markers, hold_at=STEPS + 2)  # mid-epoch 2
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    _ctrl_c_once_held(path, markers)
    assert main(["study", "launch", str(path), "--resume"]) == 0
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("cut-workers").experiment_id
    (child,) = client.search_runs([experiment], "tags.`guidance_tune.role` = 'trial'")
    assert child.info.status == "FINISHED" and child.data.tags["status"] == "finished"
    assert len(child.data.tags["replicas"].split(",")) == 1  # its other worker, resumed too
    history = client.get_metric_history(child.info.run_id, "val/loss")
    assert sorted(m.step for m in history) == [1, 2, 3]  # epoch 1 kept, none run twice


def test_a_ctrl_c_arms_study_counts_its_cut_seeds_as_killed_not_failed(ray_local, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    spec = study_dict("cut-arms", tmp_path, space="arms", metric="best/top1")
    spec["study"].pop("space_options")
    spec["study"]["arms"] = {"seeds": 2, "arms": [{"name": "base", "set": {}}]}
    spec["target"] = scripted_target(markers, hold_at=STEPS + 2)  # mid-epoch 2 of each seed
    spec["guidance"] = {"kind": "none"}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    output = _ctrl_c_once_held(path, markers)
    # one seed at a time (max_concurrent_trials 1): the first, cut off, is not a failure
    assert "study cut-arms: 1 trials, 0 failed" in output
    assert "interrupted: continue with" in output
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("cut-arms").experiment_id
    seeds = client.search_runs([experiment], "tags.`guidance_tune.role` = 'trial'")
    assert [run.data.tags["status"] for run in seeds] == ["killed"]
