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
from pipeline.search_results import non_dominated, pareto_trials
from pipeline.search_space import load_search
from pipeline.search_store import (CONSTRAINTS_ATTR, RETRY_OF_ATTR, RUN_NAME_ATTR, normalise_storage_url,
                                   open_study, recover_stale_trials, redact)

ROOT = Path(__file__).resolve().parent.parent
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
    from pipeline.search import run_search

    db = tmp_path / "optuna.db"
    with pytest.raises(ValueError) as err:
        run_search(SMOKE, [*overrides, f"storage=sqlite:///{db}", f"out_dir={tmp_path}"])
    assert message in str(err.value)
    assert not db.exists(), "validation must fail before the study is even created"


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


# ---- the study: creation, resume, stale trials ---------------------------------------------------------

def test_study_resume_marks_stale_trials_failed_and_queues_them_again(tmp_path):
    search = load_search(SMOKE, [f"storage=sqlite:///{tmp_path}/o.db", f"out_dir={tmp_path}"])
    study = open_study(search)
    done = study.ask({"chunk_size": optuna.distributions.CategoricalDistribution([2, 4, 8]),
                      "leading_tokens": optuna.distributions.CategoricalDistribution([0, 8]),
                      "boundaries": optuna.distributions.CategoricalDistribution(["cyclic"])})
    study.tell(done, [10.0, 1000.0])
    stale = study.ask()
    from pipeline.search_space import suggest

    params = suggest(stale, search.space)
    stale.set_user_attr(RUN_NAME_ATTR, "smoke-t0001")
    # a new driver: the same study comes back, the RUNNING trial is failed and its params queued again
    again = open_study(search)
    assert again._study_id == study._study_id
    assert recover_stale_trials(again) == [stale.number]
    states = [t.state for t in again.get_trials()]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    retry = again.ask()
    assert retry.number == 2 and suggest(retry, search.space) == params
    assert retry.user_attrs[RETRY_OF_ATTR] == stale.number and retry.user_attrs[RUN_NAME_ATTR] == "smoke-t0001"


def test_study_with_other_objectives_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path}/o.db"
    open_study(load_search(SMOKE, [f"storage={url}"]))
    with pytest.raises(ValueError, match="give the search another name"):
        open_study(load_search(SMOKE, [f"storage={url}", "objectives.costs=[attn_flops_per_token]"]))
