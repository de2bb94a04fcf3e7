"""Read every run of an MLflow experiment into one table: tags plus the last value of each metric.

A run that failed, was killed, is still running or never logged a validation loss is kept in the table
with a `state` saying why, so the report can list it instead of silently losing it.

A report saves that table as runs.csv; `load_runs_file` reads it back as the same DataFrame (column by column:
metrics as floats, NaN where a run did not log one; tags and params as strings, "" where a run has none and NaN
for an eval_variant.<label> tag it lacks; the numeric tags as numbers; any other column, such as a JSON cell of
an older report, as the text it holds), so a report can be rebuilt where the MLflow store is gone.

A study over several sequence lengths (its `seq_lens`) runs each size at each length as its own setting: where
the runs hold more than one data.seq_len, each run's size reads "<size> T=<seq_len>" (`fold_seq_len`), so every
comparison, fit and figure keeps the settings apart.

Beside tags and metrics, the table holds the tracked config params the report states what was measured
with (PARAMS: corpus, tokenizer, sequence length, evaluation batches, MQAR pairs) and, per evaluation variant of a
run, its overrides in the column eval_variant.<label> (the tag, as logged).
"""
from __future__ import annotations

from dataclasses import dataclass, field


import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import ViewType

from pipeline import schema
from pipeline.tracking.mlflow_client import search_all

TAGS = [
    schema.TAG_STUDY, schema.TAG_TRIAL, schema.TAG_SIZE, schema.TAG_ATTENTION, schema.TAG_VARIANT,
    schema.TAG_CHUNK, schema.TAG_LEADING, schema.TAG_BOUNDARIES, schema.TAG_SEED,
    schema.TAG_OPTUNA_TRIAL, schema.TAG_STATUS, schema.TAG_KIND, schema.TAG_SEGMENTATION, schema.TAG_CODE_VERSION,
    *schema.TAG_MATCH.values(),
]
# Config params (flattened `section.key`, as pipeline.tracking logs them); "" where a run did not log one.
# data.dataset is read where a config has it (a hub dataset named apart from data.source).
PARAMS = ["data.source", "data.dataset", "data.tokenizer", "model.vocab_size", "data.seq_len", "eval.batches",
          "data.mqar.pairs"]
NUMERIC_TAGS = [schema.TAG_CHUNK, schema.TAG_LEADING, schema.TAG_SEED, schema.TAG_OPTUNA_TRIAL]
STATE_OK = "ok"
PAGE_SIZE = 500


@dataclass
class RunTable:
    """All runs of one experiment. `runs` has one row per MLflow run; `missing` lists planned trials with no run;
    `source` says where the runs were read: "MLflow", or the runs file a report saved (load_runs_file)."""

    experiment: str
    runs: pd.DataFrame
    missing: list[str] = field(default_factory=list)
    source: str = "MLflow"

    @property
    def ok(self) -> pd.DataFrame:
        return self.runs[self.runs["state"] == STATE_OK]

    @property
    def not_ok(self) -> pd.DataFrame:
        return self.runs[self.runs["state"] != STATE_OK]

    @property
    def metric_columns(self) -> list[str]:
        return [c for c in self.runs.columns if "/" in c]


def _run_state(mlflow_status: str, run_status_tag: str, metrics: dict[str, float]) -> str:
    """Why a run is (un)usable: ok | failed | killed | running | no_val_metrics | non_finite_val."""
    if mlflow_status == "FAILED" or run_status_tag == "failed":
        return "failed"
    if mlflow_status == "KILLED":
        return "killed"
    if mlflow_status in ("RUNNING", "SCHEDULED") or run_status_tag == "running":
        return "running"
    if schema.M_VAL_LOSS not in metrics:
        return "no_val_metrics"
    if not np.isfinite(metrics[schema.M_VAL_LOSS]):
        return "non_finite_val"
    return STATE_OK


def runs_to_frame(mlflow_runs: list) -> pd.DataFrame:
    """One row per run. `run.data.metrics` already holds the last logged value (highest step) of each metric."""
    rows = []
    for run in mlflow_runs:
        tags, metrics = run.data.tags, dict(run.data.metrics)
        row = {
            "run_id": run.info.run_id,
            "run_name": run.info.run_name or "",
            "mlflow_status": run.info.status,
            "start_time": run.info.start_time,
        }
        row.update({t: tags.get(t, "") for t in TAGS})
        # Evaluation variants: eval_variant.<label> = the overrides the run's weights were evaluated with.
        row.update({t: v for t, v in tags.items() if t.startswith(schema.TAG_EVAL_VARIANT_PREFIX)})
        # Runs logged before the kind tag existed: their attention module is their kind.
        row[schema.TAG_KIND] = tags.get(schema.TAG_KIND) or tags.get(schema.TAG_ATTENTION, "")
        row.update({p: run.data.params.get(p, "") for p in PARAMS})
        # The trial name identifies a planned run; a lone run is known by its MLflow name.
        row["trial"] = tags.get(schema.TAG_TRIAL) or row["run_name"]
        row["variant"] = tags.get(schema.TAG_VARIANT) or tags.get(schema.TAG_ATTENTION, "") or "unknown"
        row["state"] = _run_state(run.info.status, tags.get(schema.TAG_STATUS, ""), metrics)
        row.update(metrics)
        rows.append(row)
    frame = pd.DataFrame(rows, columns=None if rows else ["run_id", "run_name", "mlflow_status", "start_time",
                                                          *TAGS, *PARAMS, "state"])
    for col in NUMERIC_TAGS:
        if col in frame:
            frame[col] = pd.to_numeric(frame[col].replace("", np.nan), errors="coerce")
    if schema.M_VAL_LOSS not in frame:
        frame[schema.M_VAL_LOSS] = np.nan
    return frame.sort_values(["variant", "trial"], kind="stable").reset_index(drop=True)


SEQ_LEN = "data.seq_len"


def fold_seq_len(frame: pd.DataFrame) -> pd.DataFrame:
    """The runs with their sequence length in the size ("tiny T=64") where they hold more than one data.seq_len
    (module docstring); as they are otherwise. Idempotent: a size that already ends in its T is kept."""
    if SEQ_LEN not in frame or schema.TAG_SIZE not in frame:
        return frame
    lengths = frame[SEQ_LEN].astype(str)
    if lengths[lengths != ""].nunique() < 2:
        return frame
    frame = frame.copy()
    sizes = frame[schema.TAG_SIZE].astype(str)
    frame[schema.TAG_SIZE] = [size if not T or size.endswith(f" T={T}") else f"{size} T={T}"
                              for size, T in zip(sizes, lengths)]
    return frame


def load_runs(experiment: str, tracking_uri: str | None = None,
              expected_runs: list[str] | None = None) -> RunTable:
    """Load every active run of `experiment`; `expected_runs` are planned trial names, used to list missing ones."""
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        known = [e.name for e in client.search_experiments(max_results=50)]
        raise ValueError(f"experiment must name an existing MLflow experiment, got {experiment!r}; "
                         f"known experiments: {known}")
    # The runs a study or search nests its trials under hold no results of their own.
    runs = [r for r in search_all(client, exp.experiment_id, page_size=PAGE_SIZE, run_view_type=ViewType.ACTIVE_ONLY,
                                  order_by=["attributes.start_time ASC"])
            if r.data.tags.get(schema.TAG_ROLE) not in schema.CONTAINER_ROLES]
    frame = fold_seq_len(runs_to_frame(runs))
    present = set(frame["trial"]) if len(frame) else set()
    missing = [name for name in (expected_runs or []) if name not in present]
    return RunTable(experiment=experiment, runs=frame, missing=missing)


def _float(text: str) -> float:
    return float(text) if text != "" else np.nan


def read_runs_file(path) -> pd.DataFrame:
    """The runs DataFrame of `runs_to_frame`, read from the runs.csv a report wrote (see the module docstring).
    Every cell is read as text first, then each column converted as runs_to_frame builds it; floats through
    Python's float(), which reads back exactly the digits pandas wrote."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    if "run_id" not in frame or schema.M_VAL_LOSS not in frame:
        raise ValueError(f"runs file {str(path)!r} must be a runs.csv written by `attamba report` (columns run_id, "
                         f"{schema.M_VAL_LOSS}, ...); it has {', '.join(frame.columns[:8])}")
    for col in frame.columns:
        if "/" in col:   # a metric
            frame[col] = frame[col].map(_float).astype(float)
        elif col.startswith(schema.TAG_EVAL_VARIANT_PREFIX):   # a tag only the runs of that variant carry
            frame[col] = frame[col].replace("", np.nan)
    if "start_time" in frame and (frame["start_time"] != "").all():
        frame["start_time"] = frame["start_time"].astype("int64")
    for col in NUMERIC_TAGS:
        if col in frame:
            frame[col] = pd.to_numeric(frame[col].replace("", np.nan), errors="coerce")
    return frame


def load_runs_file(path, expected_runs: list[str] | None = None) -> RunTable:
    """A RunTable from a saved runs.csv (read_runs_file); its experiment is the runs' study tag (the file's
    folder name where the runs carry none or several)."""
    from pathlib import Path

    path = Path(path)
    frame = fold_seq_len(read_runs_file(path))
    studies = set(frame[schema.TAG_STUDY]) - {""} if schema.TAG_STUDY in frame else set()
    experiment = studies.pop() if len(studies) == 1 else path.resolve().parent.name
    present = set(frame["trial"]) if "trial" in frame else set()
    missing = [name for name in (expected_runs or []) if name not in present]
    return RunTable(experiment=experiment, runs=frame, missing=missing, source=path.name)
