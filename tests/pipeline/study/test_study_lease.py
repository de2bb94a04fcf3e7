"""One driver per study folder: a second `run_study` on a folder a live driver holds fails at once."""

import os
import socket
import subprocess
import sys
import time

import pytest

from pipeline.study.driver import run_study
from tests.helpers import REPO_ROOT as REPO

SMOKE = REPO / "configs" / "studies" / "smoke.yaml"


def test_a_second_study_driver_on_the_same_folder_refuses_to_start(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    folder = tmp_path / "studies" / "smoke"
    script = ("import sys, time; from pipeline.runs import lease\n"
              "with lease.study_lease(sys.argv[1]):\n    print('ready', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", script, str(folder)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "ready"
        start = time.perf_counter()
        with pytest.raises(ValueError, match=rf"study folder .*smoke' is in use by process {holder.pid} on host "
                                             rf"{socket.gethostname()}"):
            run_study(SMOKE, [f"out_dir={tmp_path / 'studies'}"])
        assert time.perf_counter() - start < 10, "refused before Ray or MLflow start"
        assert sorted(p.name for p in folder.iterdir()) == ["driver.lock"]
        assert not (tmp_path / "mlflow.db").exists()
    finally:
        holder.kill()
        holder.wait()
