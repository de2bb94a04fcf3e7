"""`run_study`: a study file -> Ray Tune trials (one DeepSpeed run each) -> MLflow tree -> report.

Everything that can be wrong with the study (presets, P, resources against the cluster) fails before the
first trial. Runs that finished earlier (marker in their out_dir, or a FINISHED MLflow child run) are
skipped, so running the same command after an interruption trains only what is missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

from attamba import costs

from pipeline import schema
from pipeline.ray.trainer import ATTEMPTS_FILE, DONE_FILE, run_trial
from pipeline.study.spec import Resources, RunSpec, StudyConfig, expand, load_study

log = logging.getLogger(__name__)

TRIAL_CPU = 0.01          # the Tune trainable only waits on its TorchTrainer; zero is refused by Tune
OBJECT_STORE_BYTES = 100 * 2**20
ROLE_TAG = schema.TAG_ROLE   # "parent" on the run that a study's trials nest under


def check_resources(resources: Resources, cluster: dict) -> None:
    """ValueError when one trial asks for more than the whole cluster has."""
    need = {"CPU": resources.workers * resources.cpus_per_worker + TRIAL_CPU,
            "GPU": resources.workers * resources.gpus_per_worker}
    for key, field in (("CPU", "cpus_per_worker"), ("GPU", "gpus_per_worker")):
        have = float(cluster.get(key, 0.0))
        if need[key] > have + 1e-9:
            raise ValueError(
                f"resources.{field}={getattr(resources, field):g} x resources.workers={resources.workers} asks "
                f"{need[key]:g} {key} per trial but the Ray cluster has {have:g} {key}; lower resources.workers or "
                f"resources.{field}, or connect to a bigger cluster (--address)")


def trial_slots(resources: Resources, cluster: dict) -> int:
    """How many trials run at once: max_concurrent, capped by what the cluster fits."""
    per_trial = resources.workers * resources.cpus_per_worker + TRIAL_CPU
    fits = int(float(cluster.get("CPU", 0.0)) // per_trial)
    if resources.gpus_per_worker > 0:
        fits = min(fits, int(float(cluster.get("GPU", 0.0)) // (resources.workers * resources.gpus_per_worker)))
    fits = max(1, fits)
    return min(fits, resources.max_concurrent) if resources.max_concurrent else fits


def _absolute(spec: RunSpec, uri: str, parent_run_id: str | None) -> RunSpec:
    """Paths made absolute and the parent run filled in: Ray workers do not share the driver's cwd."""
    from pipeline.data.prepare import cache_root

    cfg = spec.config
    data = dataclasses.replace(cfg.data, cache_dir=str(Path(cache_root(cfg.data)).resolve()))
    train = dataclasses.replace(cfg.train, out_dir=str(Path(cfg.train.out_dir).resolve()),
                                study=cfg.tracking.experiment, trial=spec.name)
    tracking = dataclasses.replace(cfg.tracking, uri=uri, parent_run_id=parent_run_id)
    return dataclasses.replace(spec, config=dataclasses.replace(cfg, data=data, train=train, tracking=tracking))


def _connect(address: str | None) -> bool:
    """Connect to `address` or start a local Ray; True when this process started (and must stop) it."""
    import ray

    common = dict(logging_level=logging.WARNING, log_to_driver=False)
    if address:
        # On a cluster the package comes with the job's runtime env (or is installed on every node); a
        # second runtime env here would conflict with the job's.
        ray.init(address=address, **common)
        return False
    # Workers of a local Ray import this package from the same checkout, wherever Ray starts them.
    root = str(Path(__file__).resolve().parent.parent)
    env = {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    ray.init(address="local", include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES,
             _node_ip_address="127.0.0.1", runtime_env={"env_vars": env}, **common)
    return True


@dataclasses.dataclass
class RaySession:
    slots: int                  # trials that fit at once
    parent: str | None          # the MLflow run the trials nest under (None without tracking)
    failed: list = dataclasses.field(default_factory=list)  # set by the body; marks the parent FAILED


@contextlib.contextmanager
def ray_session(address: str | None, resources: Resources, uri: str | None, open_parent):
    """Ray connected (a local one started when `address` is empty), the cluster checked against
    `resources`, and the parent MLflow run opened by `open_parent()`. On exit the parent is marked
    FINISHED, FAILED (an error, or `session.failed` set) or KILLED (Ctrl-C), and a Ray started here stops."""
    import ray

    # Tune's own SIGINT handler would stop trials and return normally; a KeyboardInterrupt is what the CLI
    # turns into "interrupted; run the same command again".
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    started = _connect(address)
    session, status = None, "FAILED"
    try:
        cluster = ray.cluster_resources()
        check_resources(resources, cluster)
        session = RaySession(trial_slots(resources, cluster), open_parent() if uri else None)
        yield session
        status = "FAILED" if session.failed else "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if session is not None and session.parent is not None:
            from pipeline.tracking.mlflow_client import end_run

            end_run(session.parent, status, uri=uri)
        if started:
            ray.shutdown()


def _parent_run(study: StudyConfig, uri: str) -> str:
    """The study's parent MLflow run, found again by name on resume (and marked RUNNING again)."""
    from pipeline.tracking.mlflow_client import client, find_runs, start_parent_run

    found = find_runs(study.name, tags={schema.TAG_STUDY: study.name, ROLE_TAG: "parent"}, uri=uri)
    if found:
        run_id = found[-1].info.run_id  # the oldest, should there ever be two
        client(uri).update_run(run_id, status="RUNNING")
        return run_id
    return start_parent_run(study.name, study.name, tags={schema.TAG_STUDY: study.name, ROLE_TAG: "parent"},
                            uri=uri)


def _finished_in_mlflow(study: StudyConfig, uri: str, parent: str | None) -> set[str]:
    if parent is None:
        return set()
    from pipeline.tracking.mlflow_client import find_runs

    return {r.data.tags.get(schema.TAG_TRIAL) for r in find_runs(study.name, uri=uri, parent_run_id=parent)
            if r.info.status == "FINISHED"}


def is_done(spec: RunSpec) -> bool:
    return (spec.out_dir / DONE_FILE).is_file()


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def timing_summary(specs: list[RunSpec], wall_s: float, slots: int) -> dict:
    """Where the wall time went: training steps vs start-up, evaluation and scheduling, per trial and in all.

    step_fraction = sum over trials of time inside training steps / (wall time x concurrent trial slots)."""
    per_run = {}
    for spec in specs:
        done = spec.out_dir / DONE_FILE
        attempts = _read_jsonl(spec.out_dir / ATTEMPTS_FILE)
        if not done.is_file() or not attempts:
            continue
        marker = json.loads(done.read_text())
        steps_s = float(marker["steps_s"])
        first_step = marker.get("first_step_start")
        last = attempts[-1]
        per_run[spec.name] = {
            "trial_s": sum(a["end"] - a["start"] for a in attempts if "end" in a),
            "steps_s": steps_s,
            # from the trainable's start to its first training step: workers, process group, DeepSpeed
            "startup_s": (first_step - last["start"]) if first_step else float("nan"),
            "attempts": len(attempts),
        }
    steps = [r["steps_s"] for r in per_run.values() if math.isfinite(r["steps_s"])]
    startups = [r["startup_s"] for r in per_run.values() if math.isfinite(r["startup_s"])]
    total_steps = sum(steps)
    return {
        "wall_s": wall_s,
        "slots": slots,
        "trials_timed": len(per_run),
        "steps_s": total_steps,
        "step_fraction": total_steps / (wall_s * slots) if wall_s > 0 else float("nan"),
        "startup_s_mean": sum(startups) / len(startups) if startups else float("nan"),
        "startup_s_max": max(startups) if startups else float("nan"),
        "per_run": per_run,
    }


class Progress:
    """One tqdm bar over the study's trials, with the latest evaluation; one line per finished trial."""

    def __new__(cls, study: str, total: int):
        from ray import tune
        from tqdm.auto import tqdm

        class _Progress(tune.Callback):
            def __init__(self):
                self.bar = tqdm(total=total, desc=f"study {study}", unit="run", file=sys.stderr,
                                dynamic_ncols=True)

            def on_trial_result(self, iteration, trials, trial, result, **info):
                if schema.M_VAL_LOSS in result:
                    self.bar.set_postfix_str(f"{trial.config['run']} step {result.get('step', '?')} "
                                             f"val/loss {result[schema.M_VAL_LOSS]:.3f}")

            def on_trial_complete(self, iteration, trials, trial, **info):
                last = trial.last_result or {}
                loss = last.get(schema.M_VAL_LOSS, float("nan"))
                self.bar.write(f"  done   {trial.config['run']}: val/loss {loss:.3f}", file=sys.stderr)
                self.bar.update(1)

            def on_trial_recover(self, iteration, trials, trial, **info):
                self.bar.write(f"  retry  {trial.config['run']} (resumes from its last checkpoint)",
                               file=sys.stderr)

            def on_trial_error(self, iteration, trials, trial, **info):
                self.bar.write(f"  FAILED {trial.config['run']}", file=sys.stderr)
                self.bar.update(1)

            def on_experiment_end(self, trials, **info):
                self.bar.close()

        return _Progress()


def _tune(study: StudyConfig, todo: list[RunSpec], slots: int, storage: Path) -> list[str]:
    """Run `todo` as Tune trials; returns the names of runs that failed after all retries."""
    from ray import tune

    res = study.resources
    trainable = tune.with_parameters(
        run_trial, runs={s.name: s.config for s in todo}, workers=res.workers,
        cpus_per_worker=res.cpus_per_worker, gpus_per_worker=res.gpus_per_worker, storage_path=str(storage))
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"CPU": TRIAL_CPU}),
        param_space={"run": tune.grid_search([s.name for s in todo])},
        tune_config=tune.TuneConfig(max_concurrent_trials=slots,
                                    trial_name_creator=lambda t: t.config["run"],
                                    trial_dirname_creator=lambda t: t.config["run"]),
        run_config=tune.RunConfig(
            name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=str(storage), verbose=0,
            failure_config=tune.FailureConfig(max_failures=res.max_failures),
            callbacks=[Progress(study.name, len(todo))]),
    )
    grid = tuner.fit()
    return sorted(r.config["run"] for r in grid if r.error is not None)


def run_study(config_path: str | Path, overrides: list[str] | None = None, address: str | None = None) -> dict:
    """Train every missing run of the study on Ray Tune, track it in MLflow, write the report."""
    wall_start = time.perf_counter()
    study = load_study(config_path, overrides)
    specs = expand(study)
    from pipeline.tracking.config import resolve_uri

    tracking = specs[0].config.tracking
    uri = resolve_uri(tracking.uri) if tracking.enabled else None
    address = address or os.environ.get("RAY_ADDRESS") or study.address
    with ray_session(address, study.resources, uri, lambda: _parent_run(study, uri)) as session:
        parent, slots = session.parent, session.slots
        specs = [_absolute(s, uri, parent) for s in specs]
        finished = _finished_in_mlflow(study, uri, parent)
        todo = [s for s in specs if not is_done(s) and s.name not in finished]
        # Longest runs first: the last round then holds the short ones, and slots idle less at the end.
        todo.sort(key=lambda s: -costs.training_flops_per_token(s.config.model, s.config.data.seq_len)
                  * s.tokens)
        log.warning("study %s: %d runs, %d already finished, %d to train, %d at a time", study.name,
                    len(specs), len(specs) - len(todo), len(todo), slots)
        if todo:
            from pipeline.data.prepare import prepare

            prepare(todo[0].config.data, todo[0].config.model.max_seq_len)  # once, not once per trial
            storage = Path(study.out_dir).resolve() / study.name / "_ray"
            session.failed = _tune(study, todo, slots, storage)
    failed = session.failed
    train_wall = time.perf_counter() - wall_start
    report_dir = None
    if study.report and uri:
        from pipeline.report import make_report

        report_dir = Path("reports") / study.name
        make_report(study.name, report_dir, tracking_uri=uri, expected_runs=[s.name for s in specs])
        print(f"report written to {report_dir / 'report.html'}", file=sys.stderr)
    wall = time.perf_counter() - wall_start
    trained = {s.name for s in todo}
    timing = timing_summary([s for s in specs if s.name in trained], wall, slots)
    timing["report_s"] = wall - train_wall
    log.warning("study %s: wall %.0f s, %.0f%% of %d slot(s) in training steps, start-up %.1f s per trial",
                study.name, wall, 100 * timing["step_fraction"], slots, timing["startup_s_mean"])
    return {"study": study.name, "runs": len(specs), "skipped": len(specs) - len(todo), "trained": len(todo),
            "failed": failed, "parent_run_id": parent, "tracking_uri": uri,
            "report": str(report_dir) if report_dir else None, "timing": timing}
