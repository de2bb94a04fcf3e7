"""jobs/submit.sh against a real local Ray started as jobs/README.md says (`ray start --head`): Ray 2.60 turns
token authentication on for it when a token exists, and the script finds the token, so a job goes through
without the user exporting RAY_AUTH_MODE."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT as ROOT
from tests.pipeline.search.test_search import _session_pids

pytestmark = pytest.mark.slow   # a Ray head, then a job that imports torch and DeepSpeed: 1-3 minutes here

BIN = Path(sys.executable).parent   # the environment's `ray`, `attamba` and python3
RAY_AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")
PORT_OPTIONS = ("--port", "--dashboard-port", "--ray-client-server-port", "--node-manager-port",
                "--object-manager-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                "--metrics-export-port", "--runtime-env-agent-port")


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.fixture(scope="module")
def local_head():
    """`ray start --head --block` with its own temp dir, ports, one CPU and HOME, where `ray get-auth-token
    --generate` wrote the token (as any first local Ray does in ~/.ray/auth_token); yields (env, job server
    address). Stopped afterwards: SIGTERM to `ray start`, which stops its processes, then SIGKILL to any left."""
    from torch.utils.cpp_extension import get_default_build_root

    base = Path(tempfile.mkdtemp(prefix="attamba-ray-"))   # short: Ray's socket paths must stay under 108 bytes
    (base / "home").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in RAY_AUTH_VARS}
    env.update(HOME=str(base / "home"), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
               # DeepSpeed's C++ op, built once per machine, stays where this user's build is
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    generated = subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, capture_output=True,
                               text=True, timeout=120)
    assert generated.returncode == 0 and (base / "home" / ".ray" / "auth_token").is_file(), generated.stderr
    ports = dict(zip(PORT_OPTIONS, _free_ports(len(PORT_OPTIONS))))
    log = open(base / "ray_start.log", "w")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "1", "--temp-dir", str(base / "t"),
         "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1", "--object-store-memory", str(100 * 2**20),
         "--disable-usage-stats", *[str(a) for option, port in ports.items() for a in (option, port)]],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{ports['--dashboard-port']}"
    try:
        deadline = time.time() + 180
        while "will now block forever" not in (base / "ray_start.log").read_text():
            assert head.poll() is None, f"ray start exited:\n{(base / 'ray_start.log').read_text()[-3000:]}"
            assert time.time() < deadline, f"ray start not ready:\n{(base / 'ray_start.log').read_text()[-3000:]}"
            time.sleep(1)
        yield env, address, base
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            pass
        for pid in _session_pids(head.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        head.wait(30)
        log.close()
        shutil.rmtree(base, ignore_errors=True)


def _submit_and_follow(command: list[str], env: dict, base: Path, job: str, timeout: int) -> str:
    """Run `command` (a jobs/ script and its arguments) as jobs/README.md does, then the follow command it
    prints until the job ends; asserts the script found the head's token and the job succeeded, returns the
    job's logs."""
    result = subprocess.run([str(ROOT / "jobs" / command[0]), *command[1:]], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"RAY_AUTH_MODE=token (token from {base}/home/.ray/auth_token)" in result.stderr
    follow = re.search(rf"^follow: (RAY_AUTH_MODE=token ray job logs -f --address \S+ ({job}-\S+))$", result.stdout,
                       re.M)
    assert follow, result.stdout[-2000:]
    logs = subprocess.run(["bash", "-c", follow.group(1)], env=env, capture_output=True, text=True, timeout=timeout)
    assert logs.returncode == 0 and f"Job '{follow.group(2)}' succeeded" in logs.stdout + logs.stderr, (
        logs.stdout[-3000:] + logs.stderr[-3000:])
    return logs.stdout


def test_the_head_needs_the_token_that_plain_ray_job_submit_does_not_send(local_head):
    """Why the scripts set RAY_AUTH_MODE: with the token in ~/.ray/auth_token, `ray start --head` turned
    authentication on, and `ray job submit` without RAY_AUTH_MODE=token is refused."""
    env, address, base = local_head
    assert "Token authentication is enabled" in (base / "ray_start.log").read_text()
    result = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--no-wait", "--", "true"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Missing authentication token" in result.stderr, result.stderr[-2000:]


def test_a_job_submitted_with_the_script_runs_to_success(local_head):
    """`jobs/submit.sh train configs/train_smoke.yaml` the way jobs/README.md says, no RAY_AUTH_MODE exported;
    the follow command it prints shows the job's logs until it succeeds."""
    env, address, base = local_head
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{base}/mlflow.db"}   # forwarded into the job
    logs = _submit_and_follow(["submit.sh", "train", "configs/train_smoke.yaml", address], env, base,
                              "attamba-train-train_smoke", 600)
    assert '"val/ppl"' in logs, "the run's result JSON is in the job's logs"

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("attamba").experiment_id])
    assert [(r.info.run_name, r.info.status) for r in runs] == [("train-smoke", "FINISHED")]


def test_a_study_submitted_with_submit_study_runs_every_run_once(local_head):
    """`jobs/submit_study.sh configs/studies/smoke.yaml` against the same token-authenticated head, with the
    shared ATTAMBA_HOME and the tracking URI forwarded as jobs/README.md says: the study's job succeeds and its
    two runs are each once in MLflow, FINISHED, under the study's parent run."""
    env, address, base = local_head
    home = base / "home_attamba"
    home.mkdir()
    env = {**env, "ATTAMBA_HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{base}/study_mlflow.db"}
    _submit_and_follow(["submit_study.sh", "configs/studies/smoke.yaml", address], env, base, "attamba-study-smoke", 900)

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    children = sorted((r.data.tags.get("trial"), r.info.status) for r in runs if r.data.tags.get("trial"))
    assert children == [("micro__attamba-P4-L4-cyclic__s0__D7680", "FINISHED"), ("micro__full__s0__D7680", "FINISHED")]
    assert (home / "studies" / "smoke").is_dir()   # the job's outputs went to the shared folder
