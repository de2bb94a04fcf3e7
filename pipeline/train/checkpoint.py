"""Checkpoints: DeepSpeed's files plus consolidated weights, sealed by a manifest written last.

Layout of `<out_dir>/checkpoints/step_00000100/`: DeepSpeed's model/optimizer shards (with the data
position, RNG states, MLflow run id and the step's metrics in its client_state), `model.pt` (the full
fp32 state dict, for eval and generation), `config.yaml`, the tokenizer, and `manifest.json` = {step,
config_hash, world_size, train_steps, data identity, sha256 of every other file}. Reading one (verify,
the newest valid one, its config and model) is `pipeline/checkpoints.py`, shared with evaluation.

A save is sealed in order: every file and the folder are fsynced, then the manifest is written to a
temporary name, fsynced and renamed into place; only then are older checkpoints beyond `keep_last` (and
not milestones) deleted. So a power loss leaves either the previous checkpoints or the new sealed one,
and `latest_checkpoint` passes over a damaged newest checkpoint to the newest valid one, with a warning.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from pipeline.checkpoints import (CONFIG, MANIFEST, TOKENIZER, WEIGHTS, checkpoint_root, config_hash,
                                  latest_checkpoint, resume_key, step_dirs, step_tag, verify)
from pipeline.data.cache import file_sha256, fsync_path
from pipeline.train import storage

log = logging.getLogger(__name__)


def _leaves(value, prefix: str = "") -> dict:
    if isinstance(value, dict) and value:
        out = {}
        for key, inner in value.items():
            out.update(_leaves(inner, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def _shown(value) -> str:
    return repr(value) if isinstance(value, str) else json.dumps(value, default=str)


def config_changes(before: dict, after: dict) -> list[str]:
    """The fields of `resume_key` that differ between two config dicts, as 'path: old -> new'
    (e.g. "data.source: 'bundled' -> 'corpus.txt'"); a field only one side has shows as <unset>."""
    old, new = _leaves(resume_key(before)), _leaves(resume_key(after))
    missing = object()
    changes = []
    for path in sorted(set(old) | set(new)):
        a, b = old.get(path, missing), new.get(path, missing)
        if a != b:
            changes.append(f"{path}: {'<unset>' if a is missing else _shown(a)} -> "
                           f"{'<unset>' if b is missing else _shown(b)}")
    return changes


def write_manifest(directory: Path, step: int, cfg_hash: str, world_size: int = 1, about: dict | None = None) -> None:
    """Seal `directory`: fsync its files and folders, then write the manifest (with `about`'s extra fields)
    under a temporary name, fsync it and rename it into place, and fsync the folder and its parent."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {"step": step, "config_hash": cfg_hash, "world_size": world_size, **(about or {}),
                "files": {str(p.relative_to(directory)): file_sha256(p) for p in files}}
    for path in files:
        fsync_path(path)
    for folder in sorted({p.parent for p in files}, key=lambda p: len(p.parts), reverse=True):
        fsync_path(folder)
    tmp = directory / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(manifest, indent=1))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(directory / MANIFEST)
    fsync_path(directory)
    fsync_path(directory.parent)


def prune(out_dir: str | Path, newest: int, keep_last: int, keep_steps=()) -> list[Path]:
    """Delete checkpoint folders at or below step `newest` (just sealed) except the `keep_last` newest sealed
    ones and the milestone `keep_steps`; unsealed leftovers of interrupted saves go too. Folders above
    `newest` are left alone. keep_last=0 keeps everything. Returns the deleted folders."""
    if keep_last == 0:
        return []
    candidates = [(step, path) for step, path in step_dirs(checkpoint_root(out_dir)) if step <= newest]
    sealed = [step for step, path in candidates if (path / MANIFEST).is_file()]
    keep = set(sealed[-keep_last:]) | set(keep_steps) | {newest}
    removed = []
    for step, path in candidates:
        if step not in keep:
            shutil.rmtree(path)
            removed.append(path)
    if removed:
        log.info("deleted %d old checkpoint(s): %s", len(removed), ", ".join(p.name for p in removed))
    return removed


def choose_checkpoint(out_dir: str | Path, rank: int) -> Path | None:
    """Collective: rank 0 picks `latest_checkpoint(out_dir)` and broadcasts it, so every rank resumes from
    the same one (each rank choosing on its own could see a save in progress differently). An error on
    rank 0 is raised there and reported on the others."""
    choice = [None, None]  # (path, error)
    if rank == 0:
        try:
            found = latest_checkpoint(out_dir)
            choice = [None if found is None else str(found), None]
        except ValueError as exc:
            choice = [None, exc]
    dist.broadcast_object_list(choice, src=0)
    if choice[1] is not None:
        if rank == 0:
            raise choice[1]
        raise ValueError(f"rank 0 could not choose a checkpoint to resume: {choice[1]}")
    return None if choice[0] is None else Path(choice[0])


def confirm_step(directory: Path, step: int, device) -> None:
    """Collective: every rank loaded `directory` at the same `step`; ValueError on every rank otherwise
    (e.g. a rank that reads another copy of the folder)."""
    bounds = torch.tensor([step, -step], dtype=torch.int64, device=device)
    dist.all_reduce(bounds, op=dist.ReduceOp.MAX)
    low, high = -int(bounds[1]), int(bounds[0])
    if low != high:
        raise ValueError(f"ranks loaded checkpoint {str(directory)!r} at different steps ({low} to {high}); "
                         f"every rank must see the same train.out_dir (a shared file system)")


def full_weights(engine) -> dict:
    """The model's whole state dict on rank 0. Collective under ZeRO-3 (every rank calls it), whose ranks
    hold only their partitions of each weight."""
    if engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict()  # full tensors on rank 0
    return engine.module.state_dict()


def estimate_bytes(engine, out_dir: Path, tokenizer_path: str | None) -> tuple[int, str]:
    """(bytes, basis): what the next checkpoint of this run takes on disk (`storage.estimate_bytes`): the
    newest sealed checkpoint's size, else from the parameter count."""
    for _, path in reversed(step_dirs(checkpoint_root(out_dir))):
        if (path / MANIFEST).is_file():
            return storage.folder_bytes(path), f"the size of {path.name}"
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    return storage.estimate_bytes(n_params, bool(engine.bfloat16_enabled()), tokenizer_path)


def _failed_anywhere(failed: bool) -> bool:
    flag = torch.tensor([1.0 if failed else 0.0])
    dist.all_reduce(flag)
    return flag.item() > 0


def save(engine, out_dir: Path, step: int, client_state: dict, cfg_dict: dict, tokenizer_path: str | None,
         rank: int, *, about: dict | None = None, keep_last: int = 0, keep_steps=()) -> Path:
    """Collective: every rank calls it. Writes and seals the checkpoint (`about`: extra manifest fields),
    then deletes what `prune` allows. Returns the checkpoint directory. A save that does not fit raises
    `StorageFull` on every rank, with the folder's unsealed files deleted."""
    root = checkpoint_root(out_dir)
    tag = step_tag(step)
    directory = root / tag
    if rank == 0 and directory.exists():
        shutil.rmtree(directory)  # a leftover of an interrupted save at the same step
    need, basis = estimate_bytes(engine, out_dir, tokenizer_path)
    free_before = storage.free_bytes(root)
    dist.barrier()

    def stage(write) -> None:
        """`write` on this rank, then every rank learns whether any failed (the all-reduce is also the barrier
        between the ranks' shards and rank 0's manifest)."""
        error = None
        try:
            write()
        except Exception as exc:   # on a full disk torch says "unexpected pos" or "iostream error", without errno
            error = exc
        if not _failed_anywhere(error is not None):
            return
        if rank != 0:
            raise error or RuntimeError(f"rank 0 could not write checkpoint {directory}; see its error")
        full = storage.save_failure(error, directory, step, need, basis, free_before)  # deletes the folder
        if full is None:
            raise error or RuntimeError(f"another rank could not write checkpoint {directory}; see its error")
        newest = latest_checkpoint(out_dir)
        raise storage.StorageFull(errno.ENOSPC, f"{full}, then run the same command again: " + (
            f"it resumes from {newest.name}" if newest is not None else "it starts over (no checkpoint was sealed)")
        ) from None

    def shards() -> None:
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state)
        weights = full_weights(engine)
        if rank == 0:
            write_model_files(directory, weights, cfg_dict, tokenizer_path)

    def seal() -> None:
        if rank == 0:
            (root / "latest").unlink(missing_ok=True)  # DeepSpeed's pointer; we pick by manifest instead
            write_manifest(directory, step, config_hash(cfg_dict), dist.get_world_size(), about)

    stage(shards)
    stage(seal)
    if rank == 0:
        prune(out_dir, step, keep_last, keep_steps)  # only now: the new checkpoint is sealed
    dist.barrier()
    return directory


def write_model_files(directory: Path, state_dict: dict, cfg_dict: dict, tokenizer_path: str | None) -> None:
    """What `load_model` needs: fp32 weights, the resolved config and the tokenizer (if not bytes)."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().float().cpu() for k, v in state_dict.items()}, directory / WEIGHTS)
    (directory / CONFIG).write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
    if tokenizer_path:
        shutil.copyfile(tokenizer_path, directory / TOKENIZER)


def load(engine, directory: Path) -> dict:
    """Verify, then restore engine state (model, optimizer, scheduler); returns the client_state."""
    verify(directory)
    _, client_state = engine.load_checkpoint(str(directory.parent), tag=directory.name,
                                             load_optimizer_states=True, load_lr_scheduler_states=True)
    if client_state is None:
        raise ValueError(f"DeepSpeed could not load checkpoint {str(directory)!r}")
    return client_state


