"""DeepSpeed's C++ op built before any training process needs it, without writing on stdout."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO_ROOT


def test_deepspeed_ops_are_ready_and_stdout_stays_clean():
    """A fresh process (deepspeed not yet imported): the study driver calls this first, and its stdout is
    the study's JSON result."""
    code = ("import json; from pipeline.train.engine import build_deepspeed_ops; "
            "import sys; sys.stderr.write(json.dumps(build_deepspeed_ops()))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == ""
    import torch

    built = done.stderr.rsplit("\n", 1)[-1]
    # the CPU accelerator builds its shared-memory collectives op; CUDA has none to build
    assert built == ('[]' if torch.cuda.is_available() else '["deepspeed_shm_comm"]')
