"""The read side of checkpoints, shared by training (resume) and evaluation: the layout, the manifest and
its verification, the newest valid checkpoint, and a checkpoint's config and model.

A checkpoint is used only after every file matched its manifest's sha256, because DeepSpeed's files are
pickles: unpickling a tampered file can run code. Our own loads use `torch.load(weights_only=True)`.
Writing, sealing and pruning checkpoints is training's (`pipeline/train/checkpoint.py`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import torch
import yaml

from attamba.model import AttambaLM
from pipeline.config import run_config_from_dict
from pipeline.data.cache import file_sha256
from pipeline.data.mqar_source import SOURCE as MQAR
from pipeline.data.tokenizer import ByteTokenizer, HFTokenizer

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


def saved_config(directory: Path) -> dict | None:
    """The config dict a checkpoint (or a run folder) was made with: its config.yaml, None if unreadable."""
    try:
        data = yaml.safe_load((Path(directory) / CONFIG).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


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


def step_dirs(root: Path) -> list[tuple[int, Path]]:
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
    for _, path in reversed(step_dirs(checkpoint_root(out_dir))):
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


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run's output folder (then its latest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint {str(path)!r} does not exist; pass a run folder or one of its checkpoints")
    latest = latest_checkpoint(path) if not (path / MANIFEST).is_file() else None
    return latest if latest is not None else path


def load_config(checkpoint_dir: str | Path):
    """The RunConfig a checkpoint was trained with."""
    return run_config_from_dict(yaml.safe_load((Path(checkpoint_dir) / CONFIG).read_text()))


def load_model(checkpoint_dir: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, RunConfig, tokenizer) from a verified checkpoint directory; the tokenizer is None
    for a model trained on data.source=mqar (its ids are the task's, not text)."""
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
