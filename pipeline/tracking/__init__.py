"""Tracking: the `Tracker` interface every run logs through, its MLflow implementation (with an outage
journal that `attamba sync` delivers later) and a no-op one, the tracking settings (URI, experiment), and
the parent run that study and search drivers nest their runs under (parent.py)."""

from pipeline.tracking.config import TrackingConfig, resolve_uri
from pipeline.tracking.journal import sync_journal
from pipeline.tracking.parent import ParentRun, parent_run
from pipeline.tracking.tracker import MlflowTracker, NoopTracker, Tracker, flatten_config, log_config, make_tracker

__all__ = ["MlflowTracker", "NoopTracker", "ParentRun", "Tracker", "TrackingConfig", "flatten_config", "log_config",
           "make_tracker", "parent_run", "resolve_uri", "sync_journal"]
