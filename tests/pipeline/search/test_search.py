"""The P/L search: validation before any trial, the Optuna study and its recovery, real searches on Ray
(SQLite and a throwaway PostgreSQL), and kill-and-resume of the `attamba search` command."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from pipeline import schema
from pipeline.search.results import non_dominated, pareto_trials
from pipeline.search.space import load_search, param_names
from pipeline.search.store import (CONSTRAINTS_ATTR, RETRY_OF_ATTR, RUN_NAME_ATTR, normalise_storage_url,
                                   open_study, recover_stale_trials, redact)
from tests.helpers import REPO_ROOT as ROOT

SMOKE = ROOT / "configs" / "search" / "smoke.yaml"


# ---- validation -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["space.chunk_size={low: 16, high: 4}"], "space.chunk_size: empty range, low (16) > high (4)"),
    (["space.leading_tokens={low: -1, high: 8}"], "space.leading_tokens.low must be >= 0, got -1"),
    (["space.leading_tokens={choices: [8, -4]}"], "space.leading_tokens.choices values must be >= 0, got -4"),
    (["objectives.quality=accuracy"], "objectives.quality: unknown objective 'accuracy'"),
    (["objectives.costs=[kv_cache_bytes, latency]"], "objectives.costs: unknown objective 'latency'"),
    (["space.chunk=4"], "unknown config key(s) space.chunk"),
    (["space.boundaries=[diagonal]"], "space.boundaries: unknown strategy 'diagonal'"),
    (["sampler=random"], "sampler must be one of nsga2, tpe"),
    (["run.model.attention=full"], "run.model.attention must be attamba"),
])
def test_bad_search_fails_before_any_trial(tmp_path, overrides, message):
    from pipeline.search.driver import run_search

    db = tmp_path / "optuna.db"
    with pytest.raises(ValueError) as err:
        run_search(SMOKE, [*overrides, f"storage=sqlite:///{db}", f"out_dir={tmp_path}"])
    assert message in str(err.value)
    assert not db.exists(), "validation must fail before the study is even created"


@pytest.mark.parametrize(("overrides", "message"), [
    (["storage=sqlite:///{tmp}/o.db"], "out_dir='searches' is a relative path and this runs as a Ray job"),
    (["out_dir={tmp}"], "storage='optuna.db' is a relative path and this runs as a Ray job"),
])
def test_a_ray_job_without_attamba_home_refuses_relative_outputs_before_any_trial(tmp_path, monkeypatch,
                                                                                  overrides, message):
    """Submitted with `ray job submit`, a search's relative folder and SQLite study would live in the job's
    temporary working directory: refused, naming the option and ATTAMBA_HOME, before the study exists."""
    from pipeline.runs.outputs import HOME_ENV, RAY_JOB_ENV
    from pipeline.search.driver import run_search
    from pipeline.search.space import STORAGE_ENV

    for name in (HOME_ENV, STORAGE_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(RAY_JOB_ENV, "{}")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="set ATTAMBA_HOME to an absolute folder") as err:
        run_search(SMOKE, [o.format(tmp=tmp_path) for o in overrides], address="127.0.0.1:1")
    assert message in str(err.value)
    assert list(tmp_path.iterdir()) == [], "nothing written before the refusal"


def test_cli_reports_a_bad_space_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "search", str(SMOKE),
                             "space.chunk_size={low: 9, high: 3}", f"storage=sqlite:///{tmp_path}/o.db"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "attamba search: error: space.chunk_size: empty range" in result.stderr
    assert "Traceback" not in result.stderr


def test_storage_urls():
    assert normalise_storage_url("postgresql://u:p@h:5/db") == "postgresql+psycopg2://u:p@h:5/db"
    assert normalise_storage_url("postgres://u@h/db") == "postgresql+psycopg2://u@h/db"
    assert normalise_storage_url("sqlite:///x.db") == "sqlite:///x.db"
    assert redact("postgresql+psycopg2://u:secret@h:5/db") == "postgresql+psycopg2://u:***@h:5/db"
    with pytest.raises(ValueError, match="storage must be a database URL"):
        normalise_storage_url("optuna.db")


# ---- Pareto front --------------------------------------------------------------------------------------

def test_non_dominated_against_pairwise_definition():
    rng = np.random.default_rng(0)
    values = np.round(rng.random((60, 3)) * 5) / 5  # ties on purpose
    mask = non_dominated(values)
    for i in range(len(values)):
        dominated = any(all(values[j] <= values[i]) and any(values[j] < values[i]) for j in range(len(values)))
        assert mask[i] == (not dominated)


def test_front_matches_optuna_and_skips_infeasible(tmp_path):
    study = optuna.create_study(directions=["minimize", "minimize"], storage=f"sqlite:///{tmp_path}/o.db")
    rng = np.random.default_rng(1)
    for k in range(30):
        t = study.ask()
        t.set_user_attr(CONSTRAINTS_ATTR, [-1.0])
        study.tell(t, list(rng.random(2)))
    ours = {t.number for t in pareto_trials(study.get_trials(states=(TrialState.COMPLETE,)))}
    assert ours == {t.number for t in study.best_trials}
    best = min(study.trials, key=lambda t: t.values[0])
    bad = study.ask()
    bad.set_user_attr(CONSTRAINTS_ATTR, [0.5])  # infeasible but dominating everything
    study.tell(bad, [best.values[0] - 1, -1.0])
    front = {t.number for t in pareto_trials(study.get_trials(states=(TrialState.COMPLETE,)))}
    assert bad.number not in front and front == ours


def test_pareto_export_lists_a_revisited_configuration_once(tmp_path):
    """A point told again as a copy (by the real searcher) or trained again with equal params is one
    configuration in pareto.json/csv: its values the mean over its trials, its trials counted once."""
    from pipeline.search.results import export_front
    from pipeline.search.searcher import OptunaAskTell
    from pipeline.search.space import suggest

    search = load_search(SMOKE, [f"storage=sqlite:///{tmp_path}/o.db", f"out_dir={tmp_path}", "n_trials=6"])
    study = open_study(search)
    a, b, d = ({"chunk_size": 4, "leading_tokens": 8, "boundaries": "cyclic"},
               {"chunk_size": 8, "leading_tokens": 8, "boundaries": "cyclic"},
               {"chunk_size": 2, "leading_tokens": 0, "boundaries": "cyclic"})

    def tell(params, values):
        study.enqueue_trial(params)
        trial = study.ask()
        assert suggest(trial, search.space) == params
        trial.set_user_attr(RUN_NAME_ATTR, f"run-{trial.number}")
        study.tell(trial, values)

    tell(a, [10.0, 400.0])
    tell(b, [12.0, 200.0])
    tell(a, [11.0, 400.0])        # equal params, trained again (e.g. by another driver): not a copy
    tell(d, [10.1, 500.0])
    study.enqueue_trial(a)
    study.enqueue_trial(a)
    searcher = OptunaAskTell(search, study, make_config=lambda *args: pytest.fail("nothing should be trained"))
    assert searcher.suggest("tune-1") == OptunaAskTell.FINISHED
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert [t.user_attrs.get("copy_of") for t in trials] == [None, None, None, None, 0, 0]

    record = export_front(search, study, trials, f"sqlite:///{tmp_path}/o.db", tmp_path / "front")
    # Independent: group by params, mean the values, brute-force the front.
    groups = {}
    for t in trials:
        groups.setdefault(tuple(sorted(t.params.items())), []).append(t)
    means = {min(t.number for t in g): tuple(np.mean([t.values for t in g], axis=0)) for g in groups.values()}

    def dominates(x, y):
        return all(p <= q for p, q in zip(x, y)) and any(p < q for p, q in zip(x, y))

    expected = {n for n, v in means.items() if not any(dominates(w, v) for w in means.values())}
    assert record["n_complete"] == 6 and record["n_distinct"] == 3
    assert {p["number"] for p in record["front"]} == expected == {0, 1, 3}
    numbers = [n for p in record["front"] for n in p["numbers"]]
    assert sorted(numbers) == [0, 1, 2, 3, 4, 5], "every trial in exactly one point"
    merged = next(p for p in record["front"] if p["number"] == 0)
    assert merged["count"] == 4 and merged["numbers"] == [0, 2, 4, 5] and merged["run_name"] == "run-0"
    assert merged["values"] == {schema.M_VAL_PPL: pytest.approx(10.25), schema.M_KV_BYTES: pytest.approx(400.0)}
    for p in record["front"]:
        assert tuple(p["values"].values()) == pytest.approx(means[p["number"]])
    rows = (tmp_path / "front" / "pareto.csv").read_text().splitlines()
    assert rows[0] == "number,chunk_size,leading_tokens,boundaries,val/ppl,cost/kv_cache_bytes,count,run_name"
    assert len(rows) == 1 + 3 and sum(r.startswith("0,4,8,cyclic,10.25,400.0,4,") for r in rows) == 1
    assert json.loads((tmp_path / "front" / "pareto.json").read_text())["front"] == record["front"]


# ---- the study: creation, resume, stale trials ---------------------------------------------------------

def test_revisited_points_count_toward_n_trials(tmp_path):
    """A sampler revisiting a completed point gets its values without training, and that trial counts."""
    from pipeline.search.searcher import OptunaAskTell

    search = load_search(SMOKE, [f"storage=sqlite:///{tmp_path}/o.db", f"out_dir={tmp_path}",
                                 "space.chunk_size={choices: [4]}", "space.leading_tokens={choices: [8]}"])
    study = open_study(search)
    first = study.ask()
    from pipeline.search.space import suggest

    suggest(first, search.space)
    study.tell(first, [10.0, 1000.0])
    searcher = OptunaAskTell(search, study, make_config=lambda *a: pytest.fail("nothing should be trained"))
    assert searcher.suggest("tune-1") == OptunaAskTell.FINISHED  # the space has one point: all copies
    complete = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    assert len(complete) == search.n_trials == 4, "copies fill the study up to n_trials, not beyond"


def test_study_resume_marks_stale_trials_failed_and_queues_them_again(tmp_path):
    search = load_search(SMOKE, [f"storage=sqlite:///{tmp_path}/o.db", f"out_dir={tmp_path}"])
    study = open_study(search)
    done = study.ask({"chunk_size": optuna.distributions.CategoricalDistribution([2, 4, 8]),
                      "leading_tokens": optuna.distributions.CategoricalDistribution([0, 8]),
                      "boundaries": optuna.distributions.CategoricalDistribution(["cyclic"])})
    study.tell(done, [10.0, 1000.0])
    stale = study.ask()
    from pipeline.search.space import suggest

    params = suggest(stale, search.space)
    stale.set_user_attr(RUN_NAME_ATTR, "smoke-t0001")
    # a new driver: the same study comes back, the RUNNING trial is failed and its params queued again
    again = open_study(search)
    assert again._study_id == study._study_id
    assert recover_stale_trials(again, param_names(search.space)) == [stale.number]
    states = [t.state for t in again.get_trials()]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    retry = again.ask()
    assert retry.number == 2 and suggest(retry, search.space) == params
    assert retry.user_attrs[RETRY_OF_ATTR] == stale.number and retry.user_attrs[RUN_NAME_ATTR] == "smoke-t0001"
    # a trial killed between ask and its suggestions, or between two of them, is failed and not queued:
    # nothing of it was trained (training starts from a whole point)
    bare = again.ask()
    partial = again.ask()
    partial.suggest_categorical("chunk_size", [2, 4, 8])
    third = open_study(search)
    assert recover_stale_trials(third, param_names(search.space)) == [retry.number, bare.number, partial.number]
    queued = third.get_trials(states=(TrialState.WAITING,))
    assert [t.user_attrs[RETRY_OF_ATTR] for t in queued] == [stale.number]


def test_study_with_other_objectives_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path}/o.db"
    open_study(load_search(SMOKE, [f"storage={url}"]))
    with pytest.raises(ValueError, match="give the search another name"):
        open_study(load_search(SMOKE, [f"storage={url}", "objectives.costs=[attn_flops_per_token]"]))


# ---- real searches: tiny models trained on Ray ---------------------------------------------------------

def _complete(study) -> dict[int, tuple]:
    return {t.number: tuple(t.values) for t in study.get_trials(states=(TrialState.COMPLETE,))}


def check_front_from_storage(url: str, name: str, folder: Path, n_trials: int) -> optuna.Study:
    """The study as stored: n_trials complete, and pareto.json's points mutually non-dominated and
    dominating every other feasible complete trial."""
    study = optuna.load_study(study_name=name, storage=url)
    done = _complete(study)
    assert len(done) == n_trials
    record = json.loads((folder / "pareto.json").read_text())
    front = [p["number"] for p in record["front"]]
    assert front, "the Pareto front must not be empty"
    assert record["objectives"] == [schema.M_VAL_PPL, schema.M_KV_BYTES]
    for p in record["front"]:
        assert tuple(p["values"][m] for m in record["objectives"]) == done[p["number"]]

    def dominates(a, b):
        return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))

    for i in front:
        assert not any(dominates(done[j], done[i]) for j in done), f"front trial {i} is dominated"
    for j in set(done) - set(front):
        assert any(dominates(done[i], done[j]) or done[i] == done[j] for i in front), f"trial {j} missed"
    rows = (folder / "pareto.csv").read_text().splitlines()
    assert rows[0].startswith("number,chunk_size,leading_tokens,boundaries,val/ppl,cost/kv_cache_bytes")
    assert len(rows) == 1 + len(front)
    assert (folder / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return study


def test_small_search_on_ray_gives_a_non_dominated_front(search_env):
    from mlflow import MlflowClient

    from pipeline.search.driver import run_search

    url = f"sqlite:///{search_env}/optuna.db"
    out = run_search(SMOKE, [f"storage={url}", f"out_dir={search_env}/searches", "n_trials=3"])
    folder = search_env / "searches" / "smoke"
    study = check_front_from_storage(url, "smoke", folder, 3)
    assert out["complete"] == 3 and not out["failed"]
    # each trained trial is an MLflow child of the search's run, tagged with its Optuna number
    client = MlflowClient(tracking_uri=f"sqlite:///{search_env}/mlflow.db")
    exp = client.get_experiment_by_name("smoke")
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{out['parent_run_id']}'")
    tagged = {int(r.data.tags[schema.TAG_OPTUNA_TRIAL]) for r in children if schema.TAG_OPTUNA_TRIAL in r.data.tags}
    trained = {t.number for t in study.get_trials(states=(TrialState.COMPLETE,)) if "copy_of" not in t.user_attrs}
    assert trained and tagged == trained
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        if t.number in trained:
            assert t.user_attrs["mlflow_run_id"] in {r.info.run_id for r in children}
    # a second call with everything done trains nothing and keeps the study as it is
    again = run_search(SMOKE, [f"storage={url}", f"out_dir={search_env}/searches", "n_trials=3"])
    assert again["complete_before"] == 3 and again["parent_run_id"] is None
    # Both calls say where MLflow's UI shows the search: its parent run, in the model-training view.
    for result in (out, again):
        assert result["mlflow_ui"]["run"].endswith(f"/#/experiments/{exp.experiment_id}/runs/{out['parent_run_id']}"
                                                   "?workflowType=machine_learning")
    assert _complete(optuna.load_study(study_name="smoke", storage=url)) == _complete(study)


def _count(db: Path, state: str) -> int:
    import sqlite3

    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return con.execute("SELECT count(*) FROM trials WHERE state = ?", (state,)).fetchone()[0]
    except sqlite3.OperationalError:  # tables not created yet
        return 0


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    pids.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


@pytest.mark.slow
def test_killed_search_resumes_without_losing_or_duplicating_trials(search_env):
    db = search_env / "optuna.db"
    args = [sys.executable, "-m", "pipeline.cli", "search", str(SMOKE), f"storage=sqlite:///{db}",
            f"out_dir={search_env}/searches", "n_trials=4",
            # Trials long enough that the kill lands while some are still training: one-worker trials start
            # in their Tune process within a second, and 6 steps of the smoke search end in about as long.
            "run.train.steps=1500"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(args, cwd=search_env, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=open(search_env / "first.log", "w"))
    try:
        deadline = time.time() + 480
        while _count(db, "COMPLETE") < 1:
            assert proc.poll() is None, (search_env / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "no trial completed in time"
            time.sleep(1)
    finally:
        for pid in _session_pids(proc.pid):  # the driver and the Ray processes it started
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(30)
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{db}")
    before = _complete(study)
    running = [t.number for t in study.get_trials(states=(TrialState.RUNNING,))]
    assert 1 <= len(before) < 4

    result = subprocess.run(args, cwd=search_env, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{db}")
    after = _complete(study)
    assert len(after) == 4, "the total must reach n_trials, no more"
    assert all(after[n] == v for n, v in before.items()), "completed trials are kept as they were"
    failed = [t.number for t in study.get_trials(states=(TrialState.FAIL,))]
    # A trial left RUNNING whose run had finished (killed between its end and its tell) is told that run's
    # result, not trained again; every other one left RUNNING is failed.
    told = [n for n in running if study.trials[n].state == TrialState.COMPLETE]
    for n in told:
        run = search_env / "searches" / "smoke" / "trials" / study.trials[n].user_attrs["run_name"]
        assert (run / "study_done.json").is_file()
        assert [json.loads(line)["event"] for line in (run / "study_attempts.jsonl").read_text().splitlines()
                ].count("train") == 1, "trained once"
    assert sorted(failed + told) == sorted(running), "only the trials the killed driver left RUNNING are failed"
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    retries = {t.user_attrs["retry_of"]: t for t in study.get_trials() if "retry_of" in t.user_attrs}
    # A trial killed before all its parameters were drawn trained nothing: it is failed, not retried.
    names = param_names(load_search(SMOKE).space)
    assert set(retries) == {n for n in failed if names <= set(study.trials[n].params)}
    for number, retry in retries.items():
        assert retry.params == study.trials[number].params
    trained = [t.user_attrs["run_name"] for t in study.get_trials(states=(TrialState.COMPLETE,))
               if "copy_of" not in t.user_attrs]
    assert len(trained) == len(set(trained)), "no run trained twice to completion"
    check_front_from_storage(f"sqlite:///{db}", "smoke", search_env / "searches" / "smoke", 4)


# ---- PostgreSQL ----------------------------------------------------------------------------------------

def _pg_bin(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    path = shutil.which(name) or (str(found[-1]) if found else None)
    if path is None:
        pytest.fail(f"PostgreSQL's {name} is not installed (looked on PATH and in /usr/lib/postgresql/*/bin); "
                    "install Debian's postgresql package: apt-get install -y postgresql")
    return path


@pytest.fixture
def postgres_url(tmp_path):
    """A throwaway PostgreSQL cluster on 127.0.0.1 and a free port; the test fails if it cannot start."""
    initdb, pg_ctl, createdb = _pg_bin("initdb"), _pg_bin("pg_ctl"), _pg_bin("createdb")
    import tempfile

    # Not under tmp_path: pytest keeps its base folder 0700, which the postgres user cannot enter.
    base = Path(tempfile.mkdtemp(prefix="attamba-search-pg-"))
    as_user = []
    if os.geteuid() == 0:  # the server refuses to run as root
        user = pwd.getpwnam("postgres")
        os.chown(base, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def run(*cmd):
        result = subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120)
        if result.returncode:
            log = (base / "log").read_text() if (base / "log").exists() else ""
            pytest.fail(f"PostgreSQL command {cmd[0]} failed: {result.stderr}\n{log}")

    run(initdb, "-D", str(base / "data"), "-U", "postgres", "--auth=trust")
    run(pg_ctl, "-D", str(base / "data"), "-l", str(base / "log"), "-w", "-t", "60", "start",
        "-o", f"-k {base} -p {port} -c listen_addresses=127.0.0.1")
    try:
        run(createdb, "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "optuna")
        yield f"postgresql://postgres@127.0.0.1:{port}/optuna"  # plain: the search must pick psycopg2
    finally:
        run(pg_ctl, "-D", str(base / "data"), "-m", "fast", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


def test_search_stored_in_postgresql(search_env, postgres_url, monkeypatch):
    from pipeline.search.driver import run_search

    monkeypatch.setenv("ATTAMBA_OPTUNA_STORAGE", postgres_url)  # storage: null -> the environment
    out = run_search(SMOKE, [f"out_dir={search_env}/searches", "n_trials=2"])
    assert out["storage"].startswith("postgresql+psycopg2://") and out["complete"] == 2
    check_front_from_storage(normalise_storage_url(postgres_url), "smoke", search_env / "searches" / "smoke", 2)
    assert not (search_env / "optuna.db").exists() and not Path("optuna.db").exists()
