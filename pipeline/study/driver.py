"""`run_study`: a study file -> Ray Tune trials (one DeepSpeed run each) -> MLflow tree -> report.

Everything that can be wrong with the study (presets, P, resources against the cluster) fails before the
first trial. Runs that finished earlier (marker in their out_dir, or a FINISHED MLflow child run) are
skipped, so running the same command after an interruption trains only what is missing. The parent run
holds the study's key parameters (`study_params`), its resolved config (study.yaml) and the report.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path

from pipeline import schema
from pipeline.loader import dump_yaml
from pipeline.data.prepare import cache_root
from pipeline.ray import cluster
from pipeline.runs import lease
from pipeline.runs.outputs import durable_path, output_folders, output_root, tracking_uri
from pipeline.ray.trainer import run_trial, worker_config
from pipeline.runs.markers import is_done, placements
from pipeline.runs.progress import ProgressBoard
from pipeline.runs.timing import timing_line, timing_summary
from pipeline.preflight import validating
from pipeline.study.checks import check_study
from pipeline.study.spec import RunSpec, StudyConfig, expand, load_study
from pipeline.tracking.parent import is_outage, parent_run, run_journals

log = logging.getLogger(__name__)

PARENT_ROLE = "parent"   # value of schema.TAG_ROLE on the run a study's trials nest under
JOURNAL_DIR = "tracking"  # in the study folder: the driver's MLflow calls that waited out an outage
STUDY_FILE = "study.yaml"  # in the study folder and on the parent run: the study as resolved


def study_params(study: StudyConfig, specs: list[RunSpec]) -> dict:
    """The parent run's params: what the study varies and what each run gets."""
    tokens = study.tokens
    params = {"runs": len(specs), "sizes": ",".join(study.sizes),
              "variants": ",".join(dict.fromkeys(s.variant for s in specs)),
              "seeds": ",".join(map(str, study.seeds)), "tokens.rule": tokens.rule,
              "tokens.budgets": ",".join(map(str, tokens.budgets)),
              "tokens.per_run_min": min(s.tokens for s in specs), "tokens.per_run_max": max(s.tokens for s in specs)}
    params.update({"tokens.tokens": tokens.tokens} if tokens.rule == "fixed" else
                  {"tokens.tokens_per_param": tokens.tokens_per_param})
    params.update({f"resources.{k}": v for k, v in dataclasses.asdict(study.resources).items()})
    return params


def run_study(config_path: str | Path, overrides: list[str] | None = None, address: str | None = None,
              yes: bool = False) -> dict:
    """Train every missing run of the study on Ray Tune, track it in MLflow, write the report. Everything
    about the input is checked first (pipeline/study/checks.py); `yes` starts a study that needs more than a
    day here."""
    wall_start = time.perf_counter()
    with validating(f"study file {str(config_path)!r}"):
        study = load_study(config_path, overrides)
        # Relative folders under $ATTAMBA_HOME (or the working directory), never a Ray job's temporary folder.
        runs_dir = study.folder            # out_dir/name, as the runs' configs name it
        folder = runs_dir.resolve()
        specs = expand(study)
        tracking = specs[0].config.tracking
        uri = tracking_uri(tracking.uri) if tracking.enabled else None
        report_dir = durable_path(Path("reports") / study.name, "the report folder") if study.report and uri else None
        # every node reads and writes these: checked on a multi-node cluster before anything is trained
        shared = output_folders(folder, cache_root(specs[0].config.data).resolve(), uri)
        address = cluster.resolve_address(address, study.address)
        check_study(study, specs, uri=uri, report_dir=report_dir, local=not address, yes=yes)
    tags = {schema.TAG_STUDY: study.name, schema.TAG_ROLE: PARENT_ROLE}
    # One driver per study folder (a second would train the same runs into the same folders).
    with (lease.study_lease(folder), run_journals(folder, uri),
          cluster.ray_session(address, study.resources, shared) as session,
          parent_run(uri, study.name, tags, journal_dir=folder / JOURNAL_DIR) as parent):
        slots = session.slots
        # as resolved: out_dir where the runs are (the folder's parent), not as the file wrote it
        (folder / STUDY_FILE).write_text(dump_yaml(dataclasses.replace(study, out_dir=str(runs_dir.parent))))
        parent.log_params(study_params(study, specs))
        parent.log_artifacts([folder / STUDY_FILE], "study")
        specs = [dataclasses.replace(s, config=worker_config(s.config, uri, parent.run_id)) for s in specs]
        finished = parent.finished_trials()
        todo = [s for s in specs if not is_done(s.out_dir) and s.name not in finished]
        # Longest runs first: the last round then holds the short ones, and slots idle less at the end.
        work = {s.name: s.flops for s in specs}
        todo.sort(key=lambda s: -work[s.name])
        log.warning("study %s: %d runs, %d already finished, %d to train, %d at a time", study.name,
                    len(specs), len(specs) - len(todo), len(todo), slots)
        failed = []
        if todo:
            from pipeline.data.prepare import prepare

            prepare(todo[0].config.data, todo[0].config.model.max_seq_len)  # once, not once per trial
            from pipeline.ray.tune import TuneRun, fit

            # on stderr: a line per running trial (step, tokens/s, val/loss, ETA) under one for the study
            board = ProgressBoard(study.name, {s.name: (s.config.train.steps, work[s.name]) for s in todo})
            failures = fit(TuneRun(run_trial, study.resources, folder / "_ray", "tune",
                                   grid={"run": [s.name for s in todo]}, slots=slots, trial_name=lambda c: c["run"],
                                   progress=board, params={"runs": {s.name: s.config for s in todo}}))
            failed = sorted(c["run"] for c in failures)
            parent.failed = bool(failed)
    train_wall = time.perf_counter() - wall_start
    if report_dir is not None:
        from pipeline.report import make_report

        try:
            report = make_report(study.name, report_dir, tracking_uri=uri, expected_runs=[s.name for s in specs],
                                 attempts={s.name: placements(s.out_dir) for s in specs})
            parent.log_artifacts(list(report.files.values()), "report")  # beside the runs, in the MLflow UI
            parent.describe(report.description)                           # the answer on the run's page
            print(f"report written to {report_dir / 'report.html'}", file=sys.stderr)
        except Exception as error:  # the runs are trained and kept; only the report waits for MLflow
            if not is_outage(error):
                raise
            log.warning("report not written, MLflow unreachable (%s): once it is back, run `attamba sync "
                        "%s/...` for each run's journal and `attamba report --experiment %s --out %s`",
                        error, folder, study.name, report_dir)
            report_dir = None
    wall = time.perf_counter() - wall_start
    trained = {s.name for s in todo}
    timing = timing_summary({s.name: s.out_dir for s in specs if s.name in trained}, wall, slots)
    timing["report_s"] = wall - train_wall
    log.warning("study %s: %s", study.name, timing_line(timing, len(specs)))
    return {"study": study.name, "runs": len(specs), "skipped": len(specs) - len(todo), "trained": len(todo),
            "failed": failed, "parent_run_id": parent.run_id, "tracking_uri": uri,
            "report": str(report_dir) if report_dir else None, "timing": timing,
            "mlflow_ui": parent.ui_links(),
            "outputs": {"home": str(output_root() or ""), "runs": str(runs_dir),
                        "report": str(report_dir) if report_dir else None, "tracking_uri": uri}}
