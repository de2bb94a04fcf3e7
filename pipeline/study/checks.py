"""A study's pre-flight, after its expansion and before its folder, Ray or MLflow exist: the base run's
fields that the study itself sets per run, the folders and stores it writes, every run's device, data and
tokenizer, the resources against this machine (when the study starts its own Ray) and the time its runs
would take here."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.preflight import check_places, ignored_fields, machine, paths
from pipeline.data.checks import check_data, check_vocab
from pipeline.runs.resources import check_placement, check_resources
from pipeline.runs.outputs import output_root
from pipeline.study.spec import RunSpec, StudyConfig

# Fields of a study's `run` that the study sets for each run itself, and what sets them instead.
SET_PER_RUN = {
    ("name",): "each run is named from its size, variant, seed and tokens",
    ("size",): "the study's `sizes` set each run's size",
    ("train", "out_dir"): "each run writes to {folder}/<run name>; the study's `out_dir` moves them",
    ("train", "steps"): "the study's `tokens` set each run's steps (tokens / tokens per step, or tokens.steps)",
    ("train", "seed"): "the study's `seeds` set each run's seeds",
    ("model", "seed"): "the study's `seeds` set each run's seeds",
    ("train", "study"): "the study's `name` is every run's study",
    ("train", "trial"): "each run's trial is its name",
    ("tracking", "experiment"): "the study's `name` is the MLflow experiment",
    ("tracking", "run_name"): "each run's MLflow name is derived from its parameters",
    ("tracking", "parent_run_id"): "the study's parent run is every run's parent",
    ("tracking", "resume_run_id"): "each run resumes its own MLflow run",
}


def check_study(study: StudyConfig, specs: list[RunSpec], *, uri: str | None, report_dir: Path | None,
                local: bool, yes: bool) -> None:
    """Refuse the study before anything is written or started (see the module docstring). `local`: the study
    starts its own Ray on this machine."""
    root = output_root()   # a relative out_dir lies under it, as a relative SQLite path of the tracking store
    folder = paths.output_dir("out_dir", study.out_dir, root) / study.name
    ignored_fields(study.run, SET_PER_RUN, folder, "a study")
    if study.seq_lens:
        ignored_fields(study.run, {("data", "seq_len"): "the study's `seq_lens` set each run's sequence length"},
                       folder, "a study")
    if uri is not None:   # the URI as given: a relative SQLite path must stay under the root, like out_dir
        given, env = specs[0].config.tracking.uri, os.environ.get("MLFLOW_TRACKING_URI")
        field = "run.tracking.uri" if given else ("MLFLOW_TRACKING_URI" if env else "the tracking store")
        paths.database_url(field, given or env or uri, root)
    if report_dir is not None:
        paths.output_dir("the report folder", str(report_dir))
    devices = {spec.config.train.device for spec in specs}
    if "cuda" in devices and study.resources.gpus_per_worker == 0:
        raise ValueError("run.train.device=cuda but resources.gpus_per_worker=0: Ray would give the runs no GPU; "
                         "set resources.gpus_per_worker (e.g. 1, or 0.5 for two runs per GPU), or run.train.device=cpu")
    if local:
        for device in sorted(devices):
            machine.check_device("run.train.device", device)
        check_resources(study.resources, machine.local_resources())
        check_placement(study.resources, [machine.local_resources()])   # a local Ray is one node
    for data in dict.fromkeys(spec.config.data for spec in specs):
        try:
            check_data(data)
        except ValueError as exc:
            raise ValueError(f"run.{exc}") from None
    check_vocab((study.run.get("model") if isinstance(study.run, dict) else None), specs[0].config.data, "run.")
    for i, spec in enumerate(specs):   # lengths and files in the way; the first also tries a write
        check_places(spec.config, where="run.", probe=i == 0, tracking=False)
    if local:
        gpu = study.resources.gpus_per_worker > 0
        machine.check_duration(sum(s.flops for s in specs), sum(s.tokens for s in specs), gpu=gpu, yes=yes,
                               what=f"the study's {len(specs)} runs", fix="lower tokens.tokens, sizes or seeds")
