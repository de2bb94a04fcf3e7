"""Bad input of every kind, through the real command line: one line naming the field, exit code 2, nothing computed.

Each case is a train, study or search file (or a `key.path=value` override) with one thing wrong. It runs
through `pipeline.cli.main` in this process, in an empty folder with its own token cache and Optuna and
MLflow stores: after the error, the folder holds only the file the case wrote (no token cache, no run or
study folder, no database) and no model was constructed.
"""

import copy
import dataclasses
import math
import typing

import pytest
import yaml

from attamba.config import ModelConfig, SSMConfig
from pipeline.cli import main
from pipeline.config import EvalConfig, OptimConfig, RunConfig, TrainConfig, load_run_config
from pipeline.data.prepare import DataConfig
from pipeline.ray.cluster import Resources
from pipeline.search.space import Constraints, IntParam, Objectives, SearchConfig, Space, load_search
from pipeline.study.spec import StudyConfig, TokenBudget, expand, load_study
from pipeline.tracking.config import TrackingConfig

RUN = {"data": {"tokenizer": "byte", "seq_len": 32, "progress": False},
       "model": {"max_seq_len": 32},
       "train": {"steps": 2, "batch_size": 2, "device": "cpu", "progress": False, "out_dir": "runs/bad"}}
BASE = {
    "train": {"name": "bad-input", "size": "micro", **copy.deepcopy(RUN)},
    "study": {"name": "bad-input", "sizes": ["micro"], "tokens": {"tokens": 256}, "out_dir": "studies",
              "run": copy.deepcopy(RUN)},
    "search": {"name": "bad-input", "n_trials": 2, "out_dir": "searches",
               "space": {"chunk_size": {"choices": [2, 4]}, "leading_tokens": {"choices": [0, 4]}},
               "run": {"size": "micro", **copy.deepcopy(RUN)}},
}


def _merge(base: dict, change: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _c(command, change, words, overrides=()):
    return pytest.param(command, change, list(overrides), words, id=f"{command}-{len(CASES)}")


CASES = []
for _args in [
    # sections that are not mappings, lists where a mapping belongs
    ("train", {"model": 5}, ["model", "mapping"]),
    ("train", {}, ["model", "mapping"], ["model=5"]),
    ("train", {}, ["optim.lr", "number"], ["optim.lr.x=1"]),
    ("train", {"optim": [1, 2]}, ["optim", "mapping"]),
    ("train", {"model": {"ssm": [16]}}, ["model.ssm", "mapping"]),
    ("study", {"run": 5}, ["run", "mapping"]),
    ("study", {"run": [1]}, ["run", "mapping"]),
    ("search", {"run": [1]}, ["run", "mapping"]),
    ("search", {"space": 5}, ["space", "mapping"]),
    ("study", {"sizes": {"micro": 1}}, ["sizes", "list"]),
    # YAML syntax errors: the file and the line
    ("train", "name: x\nmodel: {dim: 64\noptim: [\n", ["config file", "bad.yaml", "line 3"]),
    ("study", "name: x\nsizes: [micro\n", ["study file", "bad.yaml", "line 3"]),
    ("search", "name: x\n  n_trials: 3\n", ["search file", "bad.yaml", "line 2"]),
    # NaN and infinities
    ("train", {"optim": {"lr": math.nan}}, ["optim.lr"]),
    ("train", {"optim": {"lr": math.inf}}, ["optim.lr", "finite"]),
    ("train", {"optim": {"eps": math.inf}}, ["optim.eps", "finite"]),
    ("train", {"optim": {"grad_clip": math.nan}}, ["optim.grad_clip"]),
    ("train", {"optim": {"grad_clip": math.inf}}, ["optim.grad_clip", "finite"]),
    ("train", {"optim": {"weight_decay": math.inf}}, ["optim.weight_decay", "finite"]),
    ("train", {"tracking": {"flush_interval_s": math.inf}}, ["tracking.flush_interval_s"]),
    ("train", {"tracking": {"flush_timeout_s": math.nan}}, ["tracking.flush_timeout_s"]),
    ("train", {}, ["data.val_fraction"], ["data.val_fraction=.nan"]),
    ("study", {"tokens": {"budgets": [math.inf]}}, ["tokens.budgets[0]", "finite"]),
    ("study", {"tokens": {"budgets": [math.nan]}}, ["tokens.budgets"]),
    ("study", {"tokens": {"tokens_per_param": math.inf}}, ["tokens.tokens_per_param", "finite"]),
    ("study", {"resources": {"cpus_per_worker": math.nan}}, ["resources.cpus_per_worker"]),
    ("study", {"resources": {"cpus_per_worker": math.inf}}, ["resources.cpus_per_worker", "finite"]),
    ("study", {}, ["resources.gpus_per_worker", "finite"], ["resources.gpus_per_worker=.inf"]),
    ("search", {"constraints": {"max_ppl_gap": math.inf}}, ["constraints.max_ppl_gap", "finite"]),
    ("search", {}, ["optim.lr"], ["run.optim.lr=.nan"]),
    # out of range, negative
    ("train", {"optim": {"beta1": 1.0}}, ["optim.beta1", "[0.0, 1.0)"]),
    ("train", {}, ["optim.beta2", "[0.0, 1.0)"], ["optim.beta2=-0.5"]),
    ("train", {"optim": {"weight_decay": -0.1}}, ["optim.weight_decay", ">= 0"]),
    ("train", {}, ["train.steps", ">= 1"], ["train.steps=-3"]),
    ("study", {"resources": {"max_failures": -1}}, ["resources.max_failures", ">= 0"]),
    ("search", {"resources": {"max_failures": -1}}, ["resources.max_failures", ">= 0"]),
    ("search", {}, ["optim.beta1"], ["run.optim.beta1=1.0"]),
    # sizes that cannot be allocated: refused from the parameter count, before allocating
    ("train", {"model": {"dim": 100_000_000}}, ["model.dim=100000000", "memory"]),
    ("train", {}, ["model.vocab_size", "memory"], ["model.vocab_size=1000000000000"]),
    ("study", {"run": {"model": {"n_layers": 10_000_000}}}, ["model.n_layers=10000000", "memory"]),
    # names used as folders
    ("train", {"name": "../escape"}, ["name", "'../escape'"]),
    ("train", {"tracking": {"experiment": "a/b"}}, ["tracking.experiment", "'a/b'"]),
    ("train", {}, ["tracking.run_name", "'..'"], ["tracking.run_name=.."]),
    ("study", {"name": ".."}, ["name", "'..'"]),
    ("study", {"name": "runs/x"}, ["name", "'runs/x'"]),
    ("search", {"name": ".."}, ["name", "'..'"]),
    # unknown keys and wrong types
    ("train", {"optim": {"lrr": 0.1}}, ["optim.lrr", "unknown"]),
    ("train", {}, ["unknown", "trian"], ["trian.steps=3"]),
    ("study", {"tokenz": {}}, ["unknown", "tokenz"]),
    ("search", {"objectives": {"qualty": "val_ppl"}}, ["unknown", "objectives.qualty"]),
    ("train", {"train": {"steps": "many"}}, ["train.steps", "'many'"]),
    ("train", {"train": {"batch_size": 1.5}}, ["train.batch_size", "1.5"]),
    ("train", {"train": {"progress": "yes"}}, ["train.progress", "true or false"]),
    ("search", {"n_trials": "ten"}, ["n_trials", "'ten'"]),
    ("search", {"objectives": {"context": math.inf}}, ["objectives.context"]),
]:
    CASES.append(_c(*_args))


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """An empty working folder with its own caches and stores; a tripwire on building any model."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("ATTAMBA_CACHE", str(work / "cache"))
    monkeypatch.setenv("ATTAMBA_OPTUNA_STORAGE", f"sqlite:///{work / 'optuna.db'}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    import attamba.model

    def tripwire(self, *args, **kwargs):
        raise AssertionError("a model was built for a bad config")

    monkeypatch.setattr(attamba.model.AttambaLM, "__init__", tripwire)
    return work


def test_the_table_is_big_enough():
    assert len(CASES) >= 30
    assert {c.values[0] for c in CASES} == {"train", "study", "search"}


@pytest.mark.parametrize("command", ["train", "study", "search"])
def test_the_base_files_are_valid(folder, command):
    path = folder / "base.yaml"
    path.write_text(yaml.safe_dump(BASE[command]))
    if command == "train":
        load_run_config(path)
    elif command == "study":
        expand(load_study(path))
    else:
        load_search(path)


@pytest.mark.parametrize("command, change, overrides, words", CASES)
def test_bad_input_is_one_line_naming_the_field_and_nothing_runs(folder, capsys, command, change, overrides, words):
    path = folder / "bad.yaml"
    path.write_text(change if isinstance(change, str) else yaml.safe_dump(_merge(BASE[command], change)))
    assert main([command, str(path), *overrides]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"attamba {command}: error: ")
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert captured.out == ""
    assert sorted(p.name for p in folder.iterdir()) == ["bad.yaml"]   # no cache, run folder or database


@pytest.mark.parametrize("given", ["optim.lr=1e-3", "optim.lr=1E-3", "optim.lr=+1e-3"])
def test_numbers_in_overrides_are_numbers(folder, given):
    assert load_run_config(None, [given]).optim.lr == 1e-3


@pytest.mark.parametrize("text", ["lr: 1e-3", "lr: '1e-3'", "lr: 1.0e-3", "lr: .001", "lr: '0.001'"])
def test_a_float_field_reads_1e_3_from_a_file(folder, text):
    path = folder / "run.yaml"
    path.write_text(f"optim:\n  {text}\n")
    assert load_run_config(path).optim.lr == 1e-3


def test_text_that_is_not_a_number_stays_refused_in_a_float_field(folder):
    for bad in ("optim.lr=fast", "optim.lr='nan'", "optim.lr='inf'"):
        with pytest.raises(ValueError, match="optim.lr"):
            load_run_config(None, [bad])


# ---- every float field of every config refuses NaN and infinities ------------------------------

CONFIGS = (ModelConfig, SSMConfig, OptimConfig, TrainConfig, EvalConfig, DataConfig, TrackingConfig, RunConfig,
           Resources, TokenBudget, StudyConfig, IntParam, Space, Objectives, Constraints, SearchConfig)
INFINITY_ALLOWED = {("SSMConfig", "dt_limit_max")}   # +inf: no upper limit on dt


def _float_fields():
    for cls in CONFIGS:
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            if hint is float or float in typing.get_args(hint):
                yield pytest.param(cls, f.name, id=f"{cls.__name__}.{f.name}")


FLOAT_FIELDS = list(_float_fields())


def test_the_float_fields_are_found():
    names = {p.id for p in FLOAT_FIELDS}
    assert {"OptimConfig.lr", "OptimConfig.grad_clip", "TrackingConfig.flush_timeout_s", "Resources.cpus_per_worker",
            "Constraints.max_ppl_gap", "TokenBudget.tokens_per_param", "SSMConfig.dt_limit_min"} <= names


@pytest.mark.parametrize("cls, name", FLOAT_FIELDS)
def test_every_float_field_refuses_nan_and_infinities(cls, name):
    for value in (math.nan, math.inf, -math.inf):
        if (cls.__name__, name) in INFINITY_ALLOWED and value == math.inf:
            continue
        listed = typing.get_origin(typing.get_type_hints(cls)[name]) is tuple
        with pytest.raises(ValueError, match=name):
            cls(**{name: (value,) if listed else value})
