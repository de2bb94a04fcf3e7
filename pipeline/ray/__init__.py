"""Ray: the only package that imports `ray`. Connecting to (or starting) a cluster, checking resources,
running `pipeline.train.train` inside Ray Train workers, and building the Tune runs of studies and searches.

`ray` itself is imported inside the functions that need it, so importing this package stays cheap.
"""

from pipeline.ray.trainer import ATTEMPTS_FILE, DONE_FILE, run_trial

__all__ = ["ATTEMPTS_FILE", "DONE_FILE", "run_trial"]
