"""What a training run tells the tracker: tags, the config, cost metrics; and the run id kept for resume."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from attamba import costs

from pipeline import schema
from pipeline.config import RunConfig
from pipeline.tracking.tracker import NoopTracker, Tracker, log_config, make_tracker
from pipeline.tracking.version import code_version

RUN_ID_FILE = "mlflow_run_id"


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


def open_tracker(cfg: RunConfig, out_dir: Path, rank: int, resuming: bool, given: Tracker | None,
                 checkpoint_run_id: str | None = None):
    """(tracker, owned). Rank 0 gets `given` or a new MLflow run; a resumed run continues its own run: the
    id stored in the checkpoint, else the one in RUN_ID_FILE (an explicit tracking.resume_run_id wins).
    Other ranks get a NoopTracker."""
    if rank != 0:
        return NoopTracker(), False
    if given is not None:
        given.set_tags(run_tags(cfg))
        return given, False
    id_file = out_dir / RUN_ID_FILE
    tracking = cfg.tracking
    if resuming and tracking.resume_run_id is None:
        if checkpoint_run_id:
            tracking = replace(tracking, resume_run_id=checkpoint_run_id)
        elif id_file.is_file():
            tracking = replace(tracking, resume_run_id=id_file.read_text().strip())
    if tracking.run_name is None:
        tracking = replace(tracking, run_name=cfg.name)
    tracker = make_tracker(tracking, journal_dir=out_dir / "tracking", rank=rank, tags=run_tags(cfg))
    remember_run_id(out_dir, tracker)
    return tracker, True


def remember_run_id(out_dir: Path, tracker: Tracker) -> None:
    """Write the run id to RUN_ID_FILE once the server has created the run (with a slow server that is
    after `open_tracker` returned; checkpoints also store it)."""
    id_file = out_dir / RUN_ID_FILE
    if tracker.run_id and not (id_file.is_file() and id_file.read_text().strip() == tracker.run_id):
        id_file.write_text(tracker.run_id)


def log_run_start(tracker: Tracker, cfg: RunConfig, config_path: Path, world_size: int) -> None:
    """The config (params, and the run directory's config.yaml once) and the run's cost metrics."""
    log_config(tracker, cfg.to_dict(), config_path)
    tracker.log_metrics(cost_metrics(cfg, world_size), step=0)
