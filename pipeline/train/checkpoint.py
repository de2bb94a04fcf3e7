"""Checkpoints: DeepSpeed's files plus consolidated weights, sealed by a manifest written last.

Layout of `<out_dir>/checkpoints/step_00000100/`: DeepSpeed's model/optimizer shards (with the data
position, RNG states, MLflow run id and the step's metrics in its client_state), `model.pt` (the full
fp32 state dict, for eval and generation), `config.yaml`, the tokenizer, and `manifest.json` = {step,
config_hash, world_size, train_steps, data identity, sha256 of every other file}. A checkpoint is used
only after every hash matched, because DeepSpeed's files are pickles: unpickling a tampered file can run
code. Our own loads use `torch.load(weights_only=True)`.

A save is sealed in order: every file and the folder are fsynced, then the manifest is written to a
temporary name, fsynced and renamed into place; only then are older checkpoints beyond `keep_last` (and
not milestones) deleted. So a power loss leaves either the previous checkpoints or the new sealed one,
and `latest_checkpoint` passes over a damaged newest checkpoint to the newest valid one, with a warning.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from pipeline.data.cache import file_sha256, fsync_path
from pipeline.train import storage

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
WEIGHTS = "model.pt"
CONFIG = "config.yaml"
TOKENIZER = "tokenizer.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


# Model fields added after checkpoints existed, with their defaults: hashed only when set otherwise, so a
# checkpoint made before a field existed still resumes.
LATER_MODEL_FIELDS = {"iso": None, "sliding_window": False}


def resume_key(cfg_dict: dict) -> dict:
    """What must not change across a resume: model, data, optimizer and batch geometry. Steps, logging,
    eval and tracking may change (e.g. extending a run)."""
    t = cfg_dict["train"]
    model = {k: v for k, v in cfg_dict["model"].items()
             if not (k in LATER_MODEL_FIELDS and v == LATER_MODEL_FIELDS[k])}
    key = {"model": model, "data": cfg_dict["data"], "optim": cfg_dict["optim"],
           "train": {k: t[k] for k in ("batch_size", "grad_accum", "seed", "precision", "zero_stage")}}
    key["data"] = {k: v for k, v in key["data"].items() if k not in ("cache_dir", "progress")}
    return key


def config_hash(cfg_dict: dict) -> str:
    """Hash of `resume_key(cfg_dict)`, stored in every checkpoint's manifest."""
    return hashlib.sha256(json.dumps(resume_key(cfg_dict), sort_keys=True, default=str).encode()).hexdigest()[:16]


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


def saved_config(directory: Path) -> dict | None:
    """The config dict a checkpoint (or a run folder) was made with: its config.yaml, None if unreadable."""
    try:
        data = yaml.safe_load((Path(directory) / CONFIG).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


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


def read_manifest(directory: str | Path) -> dict:
    """The manifest of a checkpoint `verify` already accepted (no hashing)."""
    return json.loads((Path(directory) / MANIFEST).read_text())


def verify(directory: str | Path) -> dict:
    """The manifest of a checkpoint whose every file matches it; ValueError naming the problem otherwise."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"checkpoint {str(directory)!r} does not exist; give a step_XXXXXXXX directory "
                         f"under <out_dir>/checkpoints")
    path = directory / MANIFEST
    if not path.is_file():
        raise ValueError(f"checkpoint {str(directory)!r} has no {MANIFEST}: it is incomplete (the save was "
                         f"interrupted) or not made by this pipeline; refusing to load it")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as exc:
        raise ValueError(f"checkpoint {str(directory)!r} has an unreadable {MANIFEST} ({exc}); refusing it") from None
    present = {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST}
    if present != set(files):
        raise ValueError(f"checkpoint {str(directory)!r} does not match its manifest: files "
                         f"{sorted(present ^ set(files))} are extra or missing; refusing it")
    for name, digest in files.items():
        if file_sha256(directory / name) != digest:
            raise ValueError(f"checkpoint {str(directory)!r}: {name} does not match its sha256 in {MANIFEST} "
                             f"(corrupted or modified); refusing it")
    return manifest


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every step_XXXXXXXX folder under `root`, oldest first."""
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest valid checkpoint (see `verify`). Newer ones are passed over with a warning naming them:
    one without a manifest was cut off mid-save; one that fails verification is damaged (a truncated or
    changed file). When checkpoints exist but none is valid, ValueError: starting over silently would
    throw their training away."""
    damaged = []
    for _, path in reversed(_step_dirs(checkpoint_root(out_dir))):
        if not (path / MANIFEST).is_file():
            log.warning("checkpoint %s has no manifest (interrupted save); ignoring it", path)
            continue
        try:
            verify(path)
        except ValueError as exc:
            log.warning("passing over damaged checkpoint %s: %s", path, exc)
            damaged.append(str(exc))
            continue
        if damaged:
            log.warning("resuming from %s, the newest valid checkpoint", path)
        return path
    if damaged:
        raise ValueError(f"no valid checkpoint under {str(checkpoint_root(out_dir))!r}: {'; '.join(damaged)}. "
                         f"Delete the damaged folders to start over, or use a new train.out_dir")
    return None


def prune(out_dir: str | Path, newest: int, keep_last: int, keep_steps=()) -> list[Path]:
    """Delete checkpoint folders at or below step `newest` (just sealed) except the `keep_last` newest sealed
    ones and the milestone `keep_steps`; unsealed leftovers of interrupted saves go too. Folders above
    `newest` are left alone. keep_last=0 keeps everything. Returns the deleted folders."""
    if keep_last == 0:
        return []
    candidates = [(step, path) for step, path in _step_dirs(checkpoint_root(out_dir)) if step <= newest]
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
    for _, path in reversed(_step_dirs(checkpoint_root(out_dir))):
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


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run's output folder (then its latest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint {str(path)!r} does not exist; pass a run folder or one of its checkpoints")
    latest = latest_checkpoint(path) if not (path / MANIFEST).is_file() else None
    return latest if latest is not None else path


def load_config(checkpoint_dir: str | Path):
    """The RunConfig a checkpoint was trained with."""
    from pipeline.config import run_config_from_dict

    return run_config_from_dict(yaml.safe_load((Path(checkpoint_dir) / CONFIG).read_text()))


def load_model(checkpoint_dir: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, RunConfig, tokenizer) from a verified checkpoint directory; the tokenizer is None
    for a model trained on data.source=mqar (its ids are the task's, not text)."""
    from attamba.model import AttambaLM

    from pipeline.data.mqar_source import SOURCE as MQAR
    from pipeline.data.tokenizer import ByteTokenizer, HFTokenizer

    directory = Path(checkpoint_dir)
    verify(directory)
    cfg = load_config(directory)
    tok_path = directory / TOKENIZER
    tokenizer = HFTokenizer.from_file(str(tok_path)) if tok_path.is_file() else ByteTokenizer()
    if cfg.data.source == MQAR:
        tokenizer = None
    elif tokenizer.vocab_size != cfg.model.vocab_size:
        raise ValueError(f"checkpoint {str(directory)!r}: tokenizer has {tokenizer.vocab_size} tokens but "
                         f"model.vocab_size={cfg.model.vocab_size}")
    model = AttambaLM(cfg.model)
    state = torch.load(directory / WEIGHTS, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval(), cfg, tokenizer
