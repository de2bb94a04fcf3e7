"""The pre-flight of one run config: everything `train` would find wrong later, found before it starts."""

from __future__ import annotations

import os
from pathlib import Path

from attamba.checks import shown

from pipeline.config import RunConfig
from pipeline.data.prepare import CACHE_ENV
from pipeline.data import checks as data_checks
from pipeline.preflight import machine, paths
from pipeline.tracking.config import DEFAULT_DB_NAME


def _prefixed(where: str, exc: ValueError) -> ValueError:
    message = str(exc)
    return ValueError(f"{where}{message}" if where and message.startswith(("data.", "train.", "tracking."))
                      else message)


def check_places(cfg: RunConfig, *, where: str = "", root: Path | None = None, probe: bool = True,
                 out_dir: bool = True, tracking: bool = True) -> None:
    """The folders and databases `cfg` writes: train.out_dir (relative: under `root`, default the working
    directory), the token cache, and (`tracking`) the tracking journal and a SQLite tracking store."""
    if out_dir:
        paths.output_dir(f"{where}train.out_dir", cfg.train.out_dir, root, probe=probe)
    if cfg.data.cache_dir is not None:
        paths.output_dir(f"{where}data.cache_dir", cfg.data.cache_dir, probe=probe)
    elif os.environ.get(CACHE_ENV):
        paths.output_dir(CACHE_ENV, os.environ[CACHE_ENV], probe=probe)
    else:
        paths.output_dir(f"{where}data.cache_dir (default .cache/attamba)", ".cache/attamba", probe=probe)
    if not (tracking and cfg.tracking.enabled):
        return
    if cfg.tracking.journal_dir is not None:
        paths.output_dir(f"{where}tracking.journal_dir", cfg.tracking.journal_dir, probe=probe)
    if cfg.tracking.uri is not None:
        paths.database_url(f"{where}tracking.uri", cfg.tracking.uri)
    elif os.environ.get("MLFLOW_TRACKING_URI"):
        paths.database_url("MLFLOW_TRACKING_URI", os.environ["MLFLOW_TRACKING_URI"])
    else:
        paths.database_url(f"{where}tracking.uri (default sqlite:///{DEFAULT_DB_NAME})", f"sqlite:///{DEFAULT_DB_NAME}")


def check_run(cfg: RunConfig, *, given: dict | None = None, yes: bool = False, where: str = "",
              root: Path | None = None, local: bool = True, world: int = 1) -> None:
    """Refuse `cfg` before anything is written if its device is not here (`local`: it runs on this
    machine), its data source or tokenizer is missing or malformed, an explicit model.vocab_size in `given`
    (the run mapping as written) disagrees with the tokenizer, a place it writes is unusable, or its training
    would take more than a day here without `yes`. `where` prefixes field names ("run." in a study)."""
    try:
        if local:
            machine.check_device(f"{where}train.device", cfg.train.device)
        data_checks.check_data(cfg.data)
        if given is not None:
            data_checks.check_vocab(given.get("model"), cfg.data, where)
        check_places(cfg, where=where, root=root)
        if local:
            tokens, flops = machine.training_flops(cfg, world)
            gpu = cfg.train.device == "cuda" or (cfg.train.device == "auto" and machine.cuda_devices() > 0)
            machine.check_duration(flops, tokens, gpu=gpu, yes=yes, what=f"{where}train.steps={cfg.train.steps}",
                                   fix=f"lower {where}train.steps")
    except ValueError as exc:
        raise _prefixed(where, exc) from None


def ignored_fields(run, fields: dict, folder: Path, what: str) -> None:
    """Refuse a field of a study's or search's base `run` that would be ignored because the driver sets it
    for each run; `fields` maps a field's path to what sets it instead ("{folder}" is filled in)."""
    for path, why in fields.items():
        node = run
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None:
            raise ValueError(f"run.{'.'.join(path)}={shown(node)} would be ignored in {what}: "
                             f"{why.format(folder=folder)}; remove it")
