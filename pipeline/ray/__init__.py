"""Ray: the only package that imports `ray`. Connecting to (or starting) a cluster and checking a trial's
resources against it (cluster.py), running `pipeline.train.train` inside Ray Train workers (trainer.py),
and the one Tuner builder with its trainables, progress callback and Optuna searcher adapter (tune.py).

`ray` itself is imported inside the functions that need it, so importing this package stays cheap.
"""

from pipeline.ray.cluster import Resources, check_resources, ray_session, resolve_address, trial_slots
from pipeline.ray.trainer import ATTEMPTS_FILE, DONE_FILE, is_done, read_attempts, run_trial, worker_config

__all__ = ["ATTEMPTS_FILE", "DONE_FILE", "Resources", "check_resources", "is_done", "ray_session", "read_attempts",
           "resolve_address", "run_trial", "trial_slots", "worker_config"]
