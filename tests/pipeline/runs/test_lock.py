"""One writer per run folder: `train()` holds an flock on out_dir/train.lock; a second writer fails at once."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import load_run_config
from pipeline.runs import lock
from pipeline.train.loop import train
from tests.helpers import REPO_ROOT as REPO


def tiny(out_dir, *overrides):
    return ["size=micro", "model.max_seq_len=64", "model.chunk_size=4", "model.leading_tokens=4",
            "data.vocab_size=512", "data.seq_len=64", "data.progress=false", "optim.lr=0.005",
            "train.batch_size=8", "train.progress=false", "train.log_every=1", f"train.out_dir={out_dir}",
            "eval.batches=2", "tracking.enabled=false", *overrides]


def _holder(path: Path) -> subprocess.Popen:
    """A separate process that takes `lock.exclusive(path)` and waits; returns once it holds it."""
    script = ("import sys, time; from pipeline.runs import lock\n"
              "with lock.exclusive(sys.argv[1], 'x', 'y'):\n    print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_exclusive_refuses_a_second_holder_and_names_the_first(tmp_path):
    proc = _holder(tmp_path / "x.lock")
    try:
        with pytest.raises(ValueError, match=rf"in use by process {proc.pid} on host {socket.gethostname()}"):
            with lock.exclusive(tmp_path / "x.lock", "the thing", "try later"):
                pytest.fail("two holders at once")
    finally:
        proc.kill()
        proc.wait()
    with lock.exclusive(tmp_path / "x.lock", "the thing", "try later"):  # a killed holder leaves no stale lock
        assert json.loads((tmp_path / "x.lock").read_text())["pid"] == os.getpid()


def test_train_on_a_folder_another_process_writes_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTAMBA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    proc = _holder(out / lock.RUN_LOCK_FILE)
    try:
        start = time.perf_counter()
        with pytest.raises(ValueError, match=rf"run folder .*run' is in use by process {proc.pid} on host "
                                             rf"{socket.gethostname()}.*another train.out_dir"):
            train(load_run_config(None, tiny(out, "train.steps=2")))
        assert time.perf_counter() - start < 5, "the second writer must fail at once"
        assert sorted(p.name for p in out.iterdir()) == [lock.RUN_LOCK_FILE], "nothing prepared or written"
        assert not (tmp_path / "cache").exists()
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_two_attamba_train_on_one_folder_second_fails_first_unharmed(tmp_path):
    out = tmp_path / "run"
    launcher = {"MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"}
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), ATTAMBA_CACHE=str(tmp_path / "cache"))
    steps = 150
    command = [sys.executable, "-m", "pipeline.cli", "train", str(REPO / "configs" / "train_tiny.yaml"),
               *tiny(out, f"train.steps={steps}", "train.eval_every=0", "train.ckpt_every=50")]
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
            assert first.poll() is None, first.stderr.read()[-2000:]
            assert time.time() < deadline, "the first run never started training"
            time.sleep(0.1)
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert first.poll() is None, "the second must fail while the first still trains"
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"is in use by process {first.pid} on host {socket.gethostname()}" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1, second.stderr  # one line, no traceback
        stdout, stderr = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGKILL)
    assert first.returncode == 0, stderr[-2000:]
    assert f'"step": {steps},' in stdout  # the result JSON (DeepSpeed prints lines of its own before it)
    rows = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, steps + 1)), "each step once: nobody else wrote the run's metrics"
