"""The search's Tune searcher across a pickle: Ray's cloudpickle carries plain data and module-level names
only, the loaded copy asks and tells on the same Optuna study while the driver's own searcher goes on, and
a Tuner holding it is restored from the state Tune saved (`tuner.pkl`) and runs a trial through it."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import ray.cloudpickle
from optuna.trial import TrialState
from ray import tune

from pipeline import schema
from pipeline.ray.searcher import OptunaSearcher
from pipeline.search.driver import _ask_tell, restore_ask_tell, tune_searcher
from pipeline.search.space import STORAGE_ENV, load_search
from pipeline.search.store import normalise_storage_url, open_study
from pipeline.tracking.parent import ParentRun
from tests.helpers import REPO_ROOT as ROOT

SMOKE = ROOT / "configs" / "search" / "smoke.yaml"
# What cloudpickle writes to rebuild a class or function by value (code included) instead of naming it.
BY_VALUE = (b"_make_skeleton_class", b"_make_function", b"_builtin_type")


def fake_ppl(model: dict) -> float:
    return 100.0 / model["chunk_size"] + model["leading_tokens"]


def fake_trial(trial_config: dict, *, workers: int, cpus_per_worker: float, gpus_per_worker: float,
               storage_path: str, placement: str = "PACK") -> None:
    """A search trial's trainable that reports a perplexity computed from its model instead of training."""
    model = trial_config["run_config"]["model"]
    tune.report({schema.M_VAL_PPL: fake_ppl(model), schema.M_VAL_LOSS: 1.0})


def driver_searcher(tmp_path: Path, overrides: list[str]):
    """The searcher `run_search` hands to Tune, built by the driver's own functions (MLflow off)."""
    search = load_search(SMOKE, [f"out_dir={tmp_path}/searches", *overrides])
    url = normalise_storage_url(search.storage_url())
    study = open_study(search, url)
    parent = ParentRun(None, search.name)
    return search, study, tune_searcher(search, url, None, parent, _ask_tell(search, study, None, parent))


@pytest.mark.parametrize("from_env", [False, True], ids=["storage-in-config", "storage-from-env"])
def test_a_pickled_searcher_carries_plain_data_and_asks_on_the_same_study(tmp_path, monkeypatch, from_env):
    url = f"sqlite:///{tmp_path}/optuna.db"
    if from_env:
        monkeypatch.setenv(STORAGE_ENV, url)
    else:
        monkeypatch.delenv(STORAGE_ENV, raising=False)
    search, study, live = driver_searcher(tmp_path, [] if from_env else [f"storage={url}"])
    live_ask_tell = live.ask_tell
    first = live.suggest("tune-a")
    assert first["optuna_trial"] == 0

    data = ray.cloudpickle.dumps(live)
    assert not [marker for marker in BY_VALUE if marker in data], "only names and plain data are pickled"
    assert b"restore_ask_tell" in data and b"OptunaAskTell" not in data
    # A storage from the environment is read from it again: the URL (and any password) stays out of the pickle.
    assert (url.encode() in data) != from_env and live.state["search"]["storage"] == (None if from_env else url)
    assert live.ask_tell is live_ask_tell, "pickling leaves the driver's ask/tell in place"

    copy = ray.cloudpickle.loads(data)
    assert type(copy) is OptunaSearcher and copy.ask_tell is not live_ask_tell
    assert copy.ask_tell.study._study_id == study._study_id and copy.ask_tell.study.study_name == "smoke"
    second = copy.suggest("tune-b")
    assert second["optuna_trial"] == 1, "numbered after the trial the driver's searcher holds"
    run = second["run_config"]
    assert run["train"]["out_dir"] == str((tmp_path / "searches" / "smoke" / "trials" / run["name"]).resolve())

    stored = optuna.load_study(study_name="smoke", storage=url)
    assert [t.state for t in stored.trials] == [TrialState.RUNNING, TrialState.RUNNING]
    assert stored.trials[1].params["chunk_size"] == run["model"]["chunk_size"]
    assert stored.trials[1].params["leading_tokens"] == run["model"]["leading_tokens"]

    # Each tells its own trial: the copy through the storage it reconnected to, the driver's as before.
    copy.on_trial_complete("tune-b", {schema.M_VAL_PPL: 21.0, schema.M_VAL_LOSS: 3.0})
    live.on_trial_complete("tune-a", {schema.M_VAL_PPL: 20.0, schema.M_VAL_LOSS: 3.0})
    stored = optuna.load_study(study_name="smoke", storage=url)
    assert [t.state for t in stored.trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert [t.values[0] for t in stored.trials] == [20.0, 21.0]
    assert all(t.values[1] > 0 for t in stored.trials), "the KV-cache cost is computed at the tell"
    assert live.ask_tell.done == 1 and copy.ask_tell.done == 1


def test_a_searcher_refuses_what_would_pickle_by_value():
    with pytest.raises(ValueError, match="rebuild must be a module-level function .*'test_a_searcher_refuses"):
        OptunaSearcher(None, lambda **state: None, {})
    with pytest.raises(ValueError, match="state must be plain data .*Path is not JSON serializable"):
        OptunaSearcher(None, restore_ask_tell, {"search": {"out_dir": Path("/x")}})


def test_a_tuner_with_the_searcher_is_restored_from_its_saved_state(tmp_path, monkeypatch):
    """What Tune saved when the Tuner was built (`tuner.pkl`, the searcher inside) restores with this Ray,
    and the restored Tuner runs a trial that its rebuilt searcher asks and tells on the same study; a Tuner
    built with the driver's searcher runs its trials through that very object, not through a copy."""
    from pipeline.ray.cluster import ray_session
    from pipeline.ray.tune import TuneRun, bound_trainable, build_tuner

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    url = f"sqlite:///{tmp_path}/optuna.db"
    search, study, live = driver_searcher(tmp_path, [f"storage={url}", "n_trials=2"])
    storage = tmp_path / "_ray"
    build_tuner(TuneRun(fake_trial, search.resources, storage, "tune", search_alg=live, num_samples=-1, slots=1,
                        trial_name=lambda c: c["run_config"]["name"]))
    (experiment,) = storage.iterdir()
    assert tune.Tuner.can_restore(experiment) and not tune.Tuner.can_restore(tmp_path)

    with ray_session(None, search.resources):
        trainable = bound_trainable(TuneRun(fake_trial, search.resources, storage, "tune"))
        restored = tune.Tuner.restore(str(experiment), trainable=trainable)
        results = restored.fit()   # one trial: Tune restores num_samples=1 from an experiment that never ran
        assert [result.error for result in results] == [None]
        assert live.ask_tell.done == 0 and not live.ask_tell.live, "asked and told by the restored copy"
        (trial,) = optuna.load_study(study_name="smoke", storage=url).trials
        run = results[0].config["run_config"]
        assert trial.state == TrialState.COMPLETE and trial.user_attrs["run_name"] == run["name"]
        assert trial.values[0] == fake_ppl(run["model"])

        build_tuner(TuneRun(fake_trial, search.resources, storage, "again", search_alg=live, num_samples=1)).fit()
    # Past the restored copy's trial, every one was told by the driver's object (a revisited point as a copy).
    trials = optuna.load_study(study_name="smoke", storage=url).trials
    assert len(trials) >= 2 and all(t.state == TrialState.COMPLETE for t in trials)
    assert live.ask_tell.done == len(trials) - 1, "Tune called the driver's searcher itself"
