"""What a training run tells the tracker: tags, the config, cost metrics; and the folder's one MLflow run."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from pathlib import Path

from attamba import costs

from pipeline import schema
from pipeline.config import RunConfig
from pipeline.tracking import identity
from pipeline.tracking.config import resolve_uri
from pipeline.tracking.tracker import NoopTracker, Tracker, log_config, make_tracker
from pipeline.tracking.version import code_version

log = logging.getLogger(__name__)

RESTARTED_DIR = "restarted"   # in a run folder: earlier attempts set aside by `attamba train --restart`


def run_tags(cfg: RunConfig) -> dict[str, str]:
    m = cfg.model
    attamba = m.attention == "attamba"
    tags = {
        schema.TAG_SIZE: cfg.size, schema.TAG_ATTENTION: m.attention, schema.TAG_KIND: m.kind,
        schema.TAG_VARIANT: m.variant(),
        schema.TAG_CHUNK: str(m.chunk_size) if attamba else "",
        schema.TAG_LEADING: str(m.leading_tokens) if attamba else "",
        schema.TAG_BOUNDARIES: m.boundaries if attamba else "",
        schema.TAG_SEGMENTATION: m.ssm_segmentation if attamba else "",
        schema.TAG_SEED: str(cfg.train.seed), schema.TAG_STATUS: "running",
        schema.TAG_CODE_VERSION: code_version(),
    }
    if attamba:
        for kind, solver in (("iso_kv", costs.iso_kv_config), ("iso_flop", costs.iso_flop_config)):
            tags[schema.TAG_MATCH[kind]] = solver(m, cfg.data.seq_len).variant()
    if cfg.train.study:
        tags[schema.TAG_STUDY] = cfg.train.study
    if cfg.train.trial:
        tags[schema.TAG_TRIAL] = cfg.train.trial
    return tags


def cost_metrics(cfg: RunConfig, world_size: int) -> dict[str, float]:
    tokens = cfg.train.steps * cfg.tokens_per_step(world_size)
    return {f"cost/{k}": float(v) for k, v in costs.summary(cfg.model, cfg.data.seq_len, tokens).items()}


def claim_folder(cfg: RunConfig, out_dir: Path, config_hash: str, state: dict) -> identity.RunFile:
    """The run folder's run file (identity.py), written before the first step: kept when it exists, else
    made from what the resumed checkpoint kept (`state`: its run key and MLflow run id), else new. An
    explicit tracking.resume_run_id is recorded in it."""
    explicit = cfg.tracking.resume_run_id
    run_id = explicit or state.get("mlflow_run_id")
    uri = resolve_uri(cfg.tracking.uri) if run_id else None
    if not explicit and identity.read(identity.path_in(out_dir)) is not None:
        run_id = None   # the file is what names the run; a checkpoint's copy only restores a lost file
    return identity.ensure(out_dir, key=state.get("run_key"), run_id=run_id, config_hash=config_hash, uri=uri)


def open_tracker(cfg: RunConfig, out_dir: Path, rank: int, given: Tracker | None):
    """(tracker, owned). Rank 0 gets `given` or a tracker logging into the folder's one MLflow run (its
    run.json, which `claim_folder` wrote); other ranks get a NoopTracker."""
    if rank != 0:
        return NoopTracker(), False
    if given is not None:
        given.set_tags(run_tags(cfg))
        return given, False
    tracking = cfg.tracking
    if tracking.run_name is None:
        tracking = replace(tracking, run_name=cfg.name)
    tracker = make_tracker(tracking, journal_dir=out_dir / "tracking", rank=rank, tags=run_tags(cfg),
                           run_file=identity.path_in(out_dir))
    return tracker, True


def set_aside(out_dir: Path, keep: tuple[str, ...]) -> Path | None:
    """Move everything in `out_dir` but `keep` into `out_dir/restarted/<time>/` (`attamba train --restart`):
    the checkpoints, metrics, run file and journals of the earlier attempts. Their journals still deliver
    into the earlier MLflow run, which a sync of the moved folder ends KILLED if it was left RUNNING.
    Returns the folder they went to (None when there was nothing)."""
    entries = [p for p in out_dir.iterdir() if p.name not in (*keep, RESTARTED_DIR)] if out_dir.is_dir() else []
    if not entries:
        return None
    target = out_dir / RESTARTED_DIR / time.strftime("%Y%m%d-%H%M%S")
    while target.exists():
        target = target.with_name(target.name + "+")
    target.mkdir(parents=True)
    for path in entries:
        os.replace(path, target / path.name)
    log.warning("restarting %s: its earlier attempts (%s) moved to %s", out_dir,
                ", ".join(sorted(p.name for p in entries)), target)
    if (target / "tracking").is_dir():
        from pipeline.tracking.journal import sync_journal

        try:   # deliver what they left and end their run if it was left RUNNING; an outage waits for a sync
            sync_journal(target, stop_at_outage=True)
        except Exception as error:
            log.warning("the earlier attempts' journals in %s wait for `attamba sync %s`: %s", target, target, error)
    return target


def log_run_start(tracker: Tracker, cfg: RunConfig, config_path: Path, world_size: int) -> None:
    """The config (params, and the run directory's config.yaml once) and the run's cost metrics."""
    log_config(tracker, cfg.to_dict(), config_path)
    tracker.log_metrics(cost_metrics(cfg, world_size), step=0)
