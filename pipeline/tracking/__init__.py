"""Tracking: the `Tracker` interface every run logs through, its MLflow implementation (with an outage
journal that `attamba sync` delivers later) and a no-op one, and the tracking settings (URI, experiment)."""

from pipeline.tracking.config import TrackingConfig, resolve_uri
from pipeline.tracking.journal import sync_journal
from pipeline.tracking.tracker import MlflowTracker, NoopTracker, Tracker, flatten_config, log_config, make_tracker

__all__ = ["MlflowTracker", "NoopTracker", "Tracker", "TrackingConfig", "flatten_config", "log_config",
           "make_tracker", "resolve_uri", "sync_journal"]
