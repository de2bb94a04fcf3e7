"""A checkpoint that does not fit: `attamba train` (a real run in its own process) warns as soon as it knows
the next save will not fit, fails it in one line naming the folder and the bytes needed and free, deletes
the partial checkpoint, and resumes from the last sealed one once there is room.

The disk is a real one: a 2 MiB tmpfs mounted for the test (root can mount here). Where mounting is not
allowed, the process gets a file size limit instead (RLIMIT_FSIZE: writes past it fail with EFBIG)."""

import os
import resource
import signal
import subprocess
import sys

from pipeline import checkpoints
from tests.pipeline.tracking.mlflow_runs import assert_one_run_per_folder
from tests.pipeline.train.runs import child_env, rows, tiny

DISK = 2 * 2**20   # a micro run's checkpoint takes about 1.36 MB: the first fits, the second does not


def _mount(folder, size: int) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def _train(config, out, limit: int | None = None) -> subprocess.CompletedProcess:
    def cap():   # a file size limit, with SIGXFSZ ignored so that a write past it fails (EFBIG) instead
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    command = [sys.executable, "-m", "pipeline.cli", "train", str(config),
               *tiny(out, "train.steps=4", "train.ckpt_every=2", "train.eval_every=2", "tracking.enabled=true")]
    return subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=600,
                          preexec_fn=cap if limit else None)


def test_a_checkpoint_that_does_not_fit_is_one_clear_line_and_the_run_resumes_once_there_is_room(env):
    disk = env / "disk"
    config = env / "run.yaml"
    config.write_text("name: run\n")
    out = disk / "run"
    mounted = _mount(disk, DISK)
    try:
        done = _train(config, out, limit=None if mounted else 600_000)
        assert done.returncode == 1, done.stderr[-3000:]
        errors = [line for line in done.stderr.splitlines() if line.startswith("attamba train: error")]
        assert len(errors) == 1 and "Traceback" not in done.stderr and "[rank0]" not in done.stderr, done.stderr[-3000:]
        (error,) = errors
        if mounted:
            # warned after the first save, before the second failed
            warning = next(line for line in done.stderr.splitlines() if "will not fit" in line)
            assert "the checkpoint of step 4 will not fit" in warning and str(disk) in warning
            assert f"checkpoint step 4 could not be written: no space left in {disk / 'run' / 'checkpoints'}" in error
            assert "MiB, the size of step_00000002), " in error and "were free" in error
            assert "it resumes from step_00000002" in error
            assert not (out / "checkpoints" / "step_00000004").exists()   # the partial save is gone
            assert checkpoints.verify(out / "checkpoints" / "step_00000002")["step"] == 2
            subprocess.run(["mount", "-o", f"remount,size={8 * DISK}", str(disk)], check=True)
            resumed_from = 2
        else:
            assert "checkpoint step 2 could not be written: a file of it reached this process's file size limit" in error
            assert "it starts over (no checkpoint was sealed)" in error
            assert not (out / "checkpoints" / "step_00000002").exists()
            resumed_from = 0
        again = _train(config, out)
        assert again.returncode == 0, again.stderr[-3000:]
        assert f'"start_step": {resumed_from}' in again.stdout and [r["step"] for r in rows(out)] == [1, 2, 3, 4]
        assert_one_run_per_folder(os.environ["MLFLOW_TRACKING_URI"], "attamba", [out])
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=True)
