"""What a resume may change and what it may not: a checkpoint's config, data and schedule against this
run's, a fresh start against what the folder's earlier attempt logged, and metrics.jsonl cut back to the
checkpoint resumed from. Every refusal names the field, its old and new value, and how to start over."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import RunConfig
from pipeline import checkpoints
from pipeline.train import checkpoint as ckpt
from pipeline.tracking import identity

METRICS_FILE = "metrics.jsonl"   # in a run's out_dir: one JSON line per step (rank 0)


RESTART_HINT = "start the folder over with `attamba train ... --restart` (its earlier attempts move into restarted/)"


def check_checkpoint(directory: Path, cfg: RunConfig, cfg_dict: dict, data, world: int) -> dict:
    """The manifest of `directory` (already verified) if this run may resume from it; ValueError naming
    what differs (field, old value, new value) and how to start over otherwise."""
    manifest = checkpoints.read_manifest(directory)
    where = f"checkpoint {str(directory)!r}"
    if manifest["config_hash"] != checkpoints.config_hash(cfg_dict):
        made_with = checkpoints.saved_config(directory)
        changes = ckpt.config_changes(made_with, cfg_dict) if made_with is not None else []
        what = "; ".join(changes) if changes else \
            f"config hash {manifest['config_hash']} -> {checkpoints.config_hash(cfg_dict)} (its config.yaml is unreadable)"
        raise ValueError(f"{where} was made with another config than this run's: {what}. Put it back to resume, "
                         f"give this run another train.out_dir, or {RESTART_HINT}")
    if manifest.get("world_size", world) != world:
        raise ValueError(f"{where} was written by {manifest['world_size']} ranks, this run has {world}; exact "
                         f"resume needs the same world size")
    made_on = manifest.get("data")
    if made_on is not None:  # checkpoints made before the data identity was stored are not checked
        now = data_identity(data)
        changed = [f"{what}: {_short(made_on.get(key))} -> {_short(now[key])}"
                   for key, what in (("corpus", "corpus hash"), ("tokenizer", "tokenizer fingerprint"))
                   if made_on.get(key) != now[key]]
        if changed:
            raise ValueError(f"{where} was trained on other data than data.source={cfg.data.source!r} with "
                             f"data.tokenizer={cfg.data.tokenizer!r} gives now: {'; '.join(changed)}. Resuming "
                             f"would continue at the same data position with different tokens; restore the data "
                             f"it was trained on, give this run another train.out_dir, or {RESTART_HINT}")
    made_for = manifest.get("train_steps", cfg.train.steps)
    if made_for != cfg.train.steps and not cfg.train.allow_steps_change:
        raise ValueError(f"{where} was made for train.steps={made_for}, this run has train.steps={cfg.train.steps}: "
                         f"resuming would reshape the LR schedule; set train.allow_steps_change=true to resume with "
                         f"the new schedule length, give this run another train.out_dir, or {RESTART_HINT}")
    return manifest


def _short(value) -> str:
    return f"{value[:12]}.." if isinstance(value, str) and len(value) > 14 else str(value)


def check_fresh_start(out_dir: Path, cfg_dict: dict) -> None:
    """A folder without a checkpoint whose earlier attempt logged steps (to its one MLflow run) may start
    over only with the same model, data, optimizer and batch settings: other ones would mix two runs'
    steps in one MLflow run. ValueError naming what differs otherwise."""
    known = identity.read(identity.path_in(out_dir))
    if known is None or known.config_hash in (None, checkpoints.config_hash(cfg_dict)):
        return
    metrics = out_dir / METRICS_FILE
    if not (metrics.is_file() and metrics.read_text().strip()):
        return   # no step was logged: nothing to mix
    made_with = checkpoints.saved_config(out_dir)
    changes = ckpt.config_changes(made_with, cfg_dict) if made_with is not None else []
    what = "; ".join(changes) if changes else f"config hash {known.config_hash} -> {checkpoints.config_hash(cfg_dict)}"
    raise ValueError(f"run folder {str(out_dir)!r} holds steps of an attempt with another config (no checkpoint "
                     f"yet), and its MLflow run has them: {what}. Put it back to continue, give this run another "
                     f"train.out_dir, or {RESTART_HINT}")


def data_identity(data) -> dict:
    """What the tokens of a run depend on: the corpus content and the tokenizer (the data cache's key)."""
    return {"corpus": data.meta.get("corpus"), "tokenizer": data.meta.get("tokenizer"), "key": data.meta.get("key")}


def trim_metrics(path: Path, step: int) -> None:
    """Keep only the rows of `metrics.jsonl` up to `step` (the checkpoint resumed from): the rows a killed
    attempt wrote after it are trained again. A torn last line goes too."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)
