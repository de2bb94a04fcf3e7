"""What the training tests share: a tiny run's overrides, metrics.jsonl readers and a clean environment for
a training subprocess (the `cache` and `env` fixtures are in tests/pipeline/conftest.py)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline import schema
from tests.helpers import REPO_ROOT


def tiny(out_dir, *overrides):
    return ["size=micro", "model.max_seq_len=64", "model.chunk_size=4", "model.leading_tokens=4",
            "data.vocab_size=512", "data.seq_len=64", "data.progress=false", "optim.lr=0.005",
            "optim.warmup_steps=10", "train.batch_size=8", "train.progress=false", "train.log_every=1",
            f"train.out_dir={out_dir}", "eval.batches=4", "tracking.enabled=false", *overrides]


# `python -c TRAIN_CHILD overrides...`: one `train` in a process of its own (logging at INFO on stderr, the
# result's JSON on the last stdout line), for tests that kill it at a chosen moment
TRAIN_CHILD = ("import json, logging, sys, torch; torch.set_num_threads(1); "
               "logging.basicConfig(level=logging.INFO, stream=sys.stderr); "
               "from pipeline.config import load_run_config; from pipeline.train.loop import train; "
               "print(json.dumps(train(load_run_config(None, sys.argv[1:]))))")


def rows(out_dir) -> list[dict]:
    """metrics.jsonl, one dict per line."""
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(out_dir) -> dict[int, float]:
    return {r["step"]: r[schema.M_LOSS] for r in rows(out_dir)}


def child_env() -> dict:
    """The environment for a training subprocess: one thread, this checkout importable, and none of the
    rendezvous variables an in-process run left behind (the child makes its own single-rank group)."""
    launcher = {"MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"}
    out = {k: v for k, v in os.environ.items() if k not in launcher}
    out.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    return out


KILLABLE_CHILD = ("import sys, torch; torch.set_num_threads(1); from pipeline.config import load_run_config; "
                  "from pipeline.train.loop import train; train(load_run_config(None, sys.argv[1:]))")


def kill_after_first_checkpoint(out, overrides: list[str]) -> list[str]:
    """Train `overrides` (out_dir `out`) in a child process, SIGKILL it once a checkpoint is sealed; returns the
    command, to run again for the resume."""
    command = [sys.executable, "-c", KILLABLE_CHILD, *overrides]
    proc = subprocess.Popen(command, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list(out.glob("checkpoints/*/manifest.json")):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL
    return command
