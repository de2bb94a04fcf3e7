"""Studies on Ray: expansion, validation before any trial, job submission, retries and resumption.

The Ray tests start real (local) Ray clusters and train real micro models; each stops its Ray in teardown.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from pipeline import schema
from pipeline.ray_adapter import DONE_FILE, STARTED_LOG, pid_file
from pipeline.study import check_resources, trial_slots
from pipeline.study_spec import Resources, expand, load_study

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "configs" / "studies" / "smoke.yaml"
STUDIES = REPO / "configs" / "studies"


def _study_file(tmp_path: Path, **changes) -> Path:
    """The smoke study with `changes` merged at the top level, writing into tmp_path."""
    data = yaml.safe_load(SMOKE.read_text())
    data["out_dir"] = str(tmp_path / "studies")
    data["run"]["data"]["cache_dir"] = str(tmp_path / "cache")
    data["run"]["tracking"] = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# ---- expansion ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["smoke", "quickstart", "paper_60m"])
def test_expand_is_pure_deterministic_and_names_are_unique(name):
    study = load_study(STUDIES / f"{name}.yaml")
    before = repr(study)
    first, second = expand(study), expand(study)
    assert [s.name for s in first] == [s.name for s in second]
    assert [s.config for s in first] == [s.config for s in second]
    assert repr(study) == before
    names = [s.name for s in first]
    assert len(names) == len(set(names))
    for spec in first:
        # the name is derived from the parameters, and so is the output folder
        assert spec.name.startswith(f"{spec.size}__") and f"__s{spec.seed}__" in spec.name
        assert spec.name.endswith(f"__D{spec.tokens}")
        assert spec.out_dir == Path(study.out_dir) / study.name / spec.name
        assert spec.config.tracking.run_name == spec.name and spec.config.tracking.experiment == study.name
        if spec.config.model.attention == "attamba":
            assert f"P{spec.config.model.chunk_size}-L{spec.config.model.leading_tokens}" in spec.name


def test_quickstart_is_three_sizes_by_three_variants():
    specs = expand(load_study(STUDIES / "quickstart.yaml"))
    assert len({s.size for s in specs}) >= 3
    variants = {(s.config.model.attention, s.config.model.chunk_size if s.config.model.attention == "attamba"
                 else None) for s in specs}
    assert variants == {("full", None), ("attamba", 4), ("attamba", 8)}


def test_names_stay_unique_across_boundaries_and_iso_baselines(tmp_path):
    path = _study_file(tmp_path, attamba={"chunk_size": [4, 8], "leading_tokens": [4],
                                          "boundaries": ["cyclic", "uniform"]},
                       baselines=["full", "iso_kv", "iso_flop"])
    specs = expand(load_study(path))
    assert len(specs) == 1 + 4 + 4 + 4
    assert len({s.name for s in specs}) == len(specs)


def test_changing_a_parameter_changes_only_that_runs_name(tmp_path):
    a = {s.name for s in expand(load_study(_study_file(tmp_path)))}
    b = {s.name for s in expand(load_study(_study_file(tmp_path), ["attamba.chunk_size=[4, 8]"]))}
    assert a < b and len(b - a) == 1


# ---- validation before any trial -------------------------------------------------------------------------

@pytest.mark.parametrize("change, words", [
    ({"sizes": ["micro", "huge"]}, ["sizes", "'huge'", "micro"]),
    ({"attamba": {"chunk_size": [0]}}, ["chunk_size", "0", ">= 1"]),
    ({"resources": {"workers": 0}}, ["resources.workers", "0"]),
    ({"seeds": [0, 0]}, ["seeds", "distinct"]),
])
def test_bad_study_files_fail_before_ray_starts(tmp_path, change, words):
    from pipeline.study import run_study

    with pytest.raises(ValueError) as info:
        run_study(_study_file(tmp_path, **change), address="127.0.0.1:1")  # would fail to connect
    for word in words:
        assert word in str(info.value)
    assert not (tmp_path / "studies").exists()


def test_check_resources_names_the_field_and_the_cluster():
    check_resources(Resources(workers=1, cpus_per_worker=1), {"CPU": 2.0})
    with pytest.raises(ValueError, match=r"resources.cpus_per_worker=1 x resources.workers=3 asks 3.01 CPU"):
        check_resources(Resources(workers=3), {"CPU": 2.0})
    with pytest.raises(ValueError, match=r"resources.gpus_per_worker=1 .* has 0 GPU"):
        check_resources(Resources(gpus_per_worker=1), {"CPU": 8.0})
    assert trial_slots(Resources(max_concurrent=0), {"CPU": 2.0}) == 1   # 1.01 CPU per trial
    assert trial_slots(Resources(max_concurrent=2, cpus_per_worker=0.5), {"CPU": 2.0}) == 2
    assert trial_slots(Resources(max_concurrent=8, cpus_per_worker=0.5), {"CPU": 2.0}) == 3


def test_resources_beyond_the_cluster_fail_before_any_trial(tmp_path, monkeypatch):
    """A real local Ray with 2 CPUs refuses a study that wants 4 workers per trial."""
    from pipeline.study import run_study

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    path = _study_file(tmp_path, resources={"workers": 4})
    with pytest.raises(ValueError, match=r"resources.workers=4 asks 4.01 CPU per trial but the Ray cluster has"):
        run_study(path)
    import ray

    assert not ray.is_initialized()
    assert not (tmp_path / "studies" / "smoke" / STARTED_LOG).exists()
