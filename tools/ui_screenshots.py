"""Screenshots of what a new user sees in the MLflow UI after a study: its runs, the study's
report, the winner's run and its registered model (README, "The study in MLflow").

    python tools/ui_screenshots.py                          # runs the quickstart study first
    python tools/ui_screenshots.py --workdir DIR --existing # the study already in DIR/mlflow.db

Needs Debian's `chromium` (`apt-get install chromium`); not part of CI. The study and the
`mlflow ui` server run in their own processes, the server on a free loopback port, stopped by
its process group at the end. Each page is a fresh headless browser, as a first visit is.
"""

from __future__ import annotations

import argparse
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

import mlflow

from guidance_tune.tracking.record import ROLE_TAG, STUDY_TAG
from guidance_tune.tracking.view import runs_page

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
WINDOW = "1920,1080"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="quickstart", help="a study file under studies/")
    parser.add_argument("--workdir", type=Path, help="where the study runs (default: a new one)")
    parser.add_argument("--existing", action="store_true", help="the study ran there already")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "ui")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or sys.exit("chromium not found: apt-get install chromium")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gt-ui-"))
    if not args.existing:
        launch = [BIN / "guidance-tune", "study", "launch", ROOT / "studies" / f"{args.study}.yaml"]
        subprocess.run(launch, cwd=workdir, check=True)
    uri = f"sqlite:///{(workdir / 'mlflow.db').resolve()}"
    pages = study_pages(uri, args.study)
    args.out.mkdir(parents=True, exist_ok=True)
    with mlflow_ui(uri, workdir / "ui.log") as url:
        for name, page in pages.items():
            screenshot(chromium, page(url), args.out / f"{name}.png")
            print(f"{args.out / name}.png  <-  {page(url)}")


def study_pages(uri: str, study: str) -> dict:
    """name -> page under a UI base URL: the runs, the report, the winner, its model."""
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(study)
    if experiment is None:
        sys.exit(f"no experiment {study!r} in {uri}: run the study first")
    eid = experiment.experiment_id
    is_parent = f"tags.{STUDY_TAG} = '{study}' and tags.`{ROLE_TAG}` = 'study'"
    (parent,) = client.search_runs([eid], is_parent, max_results=1)
    winner = parent.data.tags["best_run_id"]
    version = max(client.search_model_versions(f"name = '{study}'"), key=lambda v: int(v.version))
    training = "?workflowType=machine_learning"
    return {
        "runs": lambda url: runs_page(url, eid, study),
        "report": lambda url: (
            f"{url}/#/experiments/{eid}/runs/{parent.info.run_id}/artifacts/report/val_curves.png"
            + training
        ),
        "winner": lambda url: f"{url}/#/experiments/{eid}/runs/{winner}{training}",
        "model": lambda url: f"{url}/#/models/{study}/versions/{version.version}{training}",
    }


class mlflow_ui:
    """`mlflow ui` on a free loopback port, in its own process group."""

    def __init__(self, uri: str, log: Path):
        self.uri, self.log = uri, log

    def __enter__(self) -> str:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [BIN / "mlflow", "ui", "--backend-store-uri", self.uri]
        command += ["--host", "127.0.0.1", "--port", str(port)]
        self.server = subprocess.Popen(
            command, stdout=self.log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while not _answers(f"{url}/health"):
            if time.monotonic() > deadline or self.server.poll() is not None:
                self.__exit__()
                sys.exit(f"mlflow ui did not come up: see {self.log}")
            time.sleep(0.5)
        return url

    def __exit__(self, *_) -> None:
        if self.server.poll() is None:
            os.killpg(self.server.pid, signal.SIGTERM)
            self.server.wait(timeout=10)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def screenshot(chromium: str, url: str, path: Path) -> None:
    """A first visit: a fresh profile, 20 s of page time for the single-page app to settle."""
    with tempfile.TemporaryDirectory(prefix="gt-chromium-") as profile:
        command = [chromium, "--headless=new", "--disable-gpu", "--hide-scrollbars"]
        command += [f"--user-data-dir={profile}", f"--window-size={WINDOW}"]
        command += ["--virtual-time-budget=20000", f"--screenshot={path}", url]
        if os.geteuid() == 0:
            command.insert(1, "--no-sandbox")  # Chromium's sandbox refuses root
        subprocess.run(command, check=True, capture_output=True, timeout=120)


if __name__ == "__main__":
    main()
