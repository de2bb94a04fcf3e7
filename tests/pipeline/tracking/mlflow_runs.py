"""What the kill-timeline tests check in MLflow after every timeline: one run per run folder (the one its
run.json names, and the only one carrying its key), no run left RUNNING, no metric with two points at one step."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from pipeline import schema
from pipeline.tracking import identity


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def duplicate_steps(mlflow, run_id: str) -> dict[str, list[int]]:
    """{metric: [steps holding more than one point]} of a run (system metrics excluded: a sample index)."""
    found = {}
    for key in mlflow.get_run(run_id).data.metrics:
        if key.startswith("system/"):
            continue
        counts = Counter(m.step for m in mlflow.get_metric_history(run_id, key))
        twice = sorted(step for step, n in counts.items() if n > 1)
        if twice:
            found[key] = twice
    return found


def steps(mlflow, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in mlflow.get_metric_history(run_id, key))


def assert_one_run_per_folder(uri: str, experiment: str, folders: list[Path], status: str = "FINISHED",
                              roles_running=()) -> dict[Path, object]:
    """Every folder's run.json names a run of `experiment` that carries the folder's key; no other run of
    the experiment carries it or has no key (an orphan); every such run has `status` (a folder may map to a
    status of its own: pass a dict), none is RUNNING, none has a metric twice at one step. Runs whose
    schema.TAG_ROLE is in `roles_running` (a driver's parent) are not checked. Returns folder -> run."""
    mlflow = client(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} in {uri}"
    runs = [r for r in mlflow.search_runs([exp.experiment_id])
            if r.data.tags.get(schema.TAG_ROLE) not in (*roles_running, "parent", "search")]
    by_key = Counter(r.data.tags.get(schema.TAG_RUN_KEY) for r in runs)
    assert None not in by_key, f"runs without a run key (orphans): {[r.info.run_id for r in runs if not r.data.tags.get(schema.TAG_RUN_KEY)]}"
    assert len(runs) == len(folders), f"{len(runs)} runs for {len(folders)} run folders: " \
        f"{[(r.info.run_name, r.info.status) for r in runs]}"
    found = {}
    for folder in folders:
        known = identity.read(identity.path_in(folder))
        assert known is not None and known.mlflow_run_id, f"{folder} names no MLflow run"
        assert by_key[known.key] == 1, f"{by_key[known.key]} runs carry the key of {folder}"
        run = mlflow.get_run(known.mlflow_run_id)
        assert run.data.tags[schema.TAG_RUN_KEY] == known.key
        wanted = status[folder] if isinstance(status, dict) else status
        assert run.info.status == wanted, f"{folder}: run {run.info.run_id} is {run.info.status}, not {wanted}"
        assert duplicate_steps(mlflow, run.info.run_id) == {}, f"{folder}: {duplicate_steps(mlflow, run.info.run_id)}"
        found[folder] = run
    assert not [r for r in runs if r.info.status == "RUNNING"]
    return found
