"""Bad input of every kind, through the real command line: one line naming the field, exit code 2, nothing computed.

Each case is a train, study or search file (or a `key.path=value` override) with one thing wrong. It runs
through `pipeline.cli.main` in this process, in an empty folder with its own token cache and Optuna and
MLflow stores: after the error, the folder holds only the file the case wrote (no token cache, no run or
study folder, no database) and no model was constructed.
"""

import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import yaml

from attamba.config import ModelConfig, SSMConfig
from pipeline.cli import main
from pipeline.config import EvalConfig, OptimConfig, RunConfig, TrainConfig, load_run_config
from pipeline.data.prepare import DataConfig
from pipeline.runs.resources import Resources
from pipeline.search.space import Constraints, IntParam, Objectives, SearchConfig, Space, load_search
from pipeline.study.spec import StudyConfig, TokenBudget, expand, load_study
from pipeline.tracking.config import TrackingConfig
from tests.helpers import REPO_ROOT

RUN = {"data": {"tokenizer": "byte", "seq_len": 32, "progress": False},
       "model": {"max_seq_len": 32},
       "train": {"steps": 2, "batch_size": 2, "device": "cpu", "progress": False, "out_dir": "runs/bad"}}
# a study or search sets each run's out_dir itself, a study also its steps (and refuses them in its `run`)
SEARCH_RUN = {**RUN, "train": {k: v for k, v in RUN["train"].items() if k != "out_dir"}}
STUDY_RUN = {**RUN, "train": {k: v for k, v in RUN["train"].items() if k not in ("out_dir", "steps")}}
BASE = {
    "train": {"name": "bad-input", "size": "micro", **copy.deepcopy(RUN)},
    "study": {"name": "bad-input", "sizes": ["micro"], "tokens": {"tokens": 256}, "out_dir": "studies",
              "run": copy.deepcopy(STUDY_RUN)},
    "search": {"name": "bad-input", "n_trials": 2, "out_dir": "searches",
               "space": {"chunk_size": {"choices": [2, 4]}, "leading_tokens": {"choices": [0, 4]}},
               "run": {"size": "micro", **copy.deepcopy(SEARCH_RUN)}},
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
    """Each base file passes its command's whole pre-flight, so a case fails only for what it changes."""
    from pipeline.preflight import check_run
    from pipeline.search.checks import check_search
    from pipeline.study.checks import check_study

    path = folder / "base.yaml"
    path.write_text(yaml.safe_dump(BASE[command]))
    if command == "train":
        checked = [load_run_config(path)]
        check_run(checked[0], given=BASE[command])
    elif command == "study":
        study = load_study(path)
        checked = expand(study)
        check_study(study, checked, uri=None, report_dir=None, local=True, yes=False)
    else:
        search = load_search(path)
        checked = [search]
        check_search(search, local=True, yes=False)
    assert checked, f"the base {command} file holds nothing to check"
    left = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
    assert left == ["base.yaml"], f"the pre-flight left {left} behind"


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


# ==== Pre-flight (issue 22): every bad input one line, before anything is written or started =================
#
# Each case runs one command through `pipeline.cli.main` in an empty working folder (with a few input files
# made first) and asserts: exit code 2, one line on stderr naming the field and the value, no traceback,
# nothing on stdout, the folder unchanged file for file, and nothing started: training, data preparation, Ray,
# the MLflow parent run, evaluation, generation, the report and sync are tripwires. Grouped by the themes of
# the issue; `argv` cases are other commands' arguments, `{file}` cases a train, study or search file.

BOMB = "".join(f"{c}: &{c} [{', '.join([f'*{p}' if p else 'x'] * 9)}]\n"
               for p, c in zip(["", *"abcdef"], "abcdefg")) + "name: *g\n"   # 9**7 values from ~550 bytes
ALIAS_CHAIN = "a0: &a0 [1]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 40))
CUDA = pytest.mark.skipif("__import__('torch').cuda.is_available()", reason="a GPU is visible here")


def _p(theme: str, command: str, change=None, args=(), words=(), marks=()):
    """A case: `change` merged into the command's base file (a str or bytes: the whole file); for commands
    that take no config file, `args` are the arguments after the command."""
    return pytest.param(command, change, list(args), list(words), marks=marks,
                        id=f"{theme}-{command}-{len(PREFLIGHT)}")


PREFLIGHT = []
for _case in [
    # -- theme 2: checks that came after writing: devices, resources, data sources, tokenizers --------------
    ("device", "train", {"train": {"device": "cuda"}}, [], ["train.device=cuda", "no CUDA GPU"], [CUDA]),
    ("device", "study", {"run": {"train": {"device": "cuda"}}}, [], ["run.train.device=cuda", "gpus_per_worker=0"]),
    ("device", "study", {"run": {"train": {"device": "cuda"}}, "resources": {"gpus_per_worker": 1}}, [],
     ["run.train.device=cuda", "no CUDA GPU"], [CUDA]),
    ("device", "search", {"run": {"train": {"device": "cuda"}}}, [], ["run.train.device=cuda"]),
    ("device", "bench", None, ["attention", "--device", "cuda"], ["--device=cuda", "no CUDA GPU"], [CUDA]),
    ("resources", "study", {"resources": {"gpus_per_worker": 1}}, [], ["resources.gpus_per_worker=1", "GPU"], [CUDA]),
    ("resources", "study", {"resources": {"cpus_per_worker": 100000}}, [], ["resources.cpus_per_worker=100000", "CPU"]),
    ("resources", "search", {"resources": {"workers": 100000}}, [], ["resources.workers=100000", "CPU"]),
    ("data", "train", {"data": {"source": "missing.txt"}}, [], ["data.source='missing.txt'", "no such file"]),
    ("data", "train", {"data": {"source": "nowhere/*.jsonl"}}, [],
     ["data.source='nowhere/*.jsonl'", "nothing matches"]),
    ("data", "train", {"data": {"source": "inputs/empty.txt"}}, [], ["data.source='inputs/empty.txt'", "empty"]),
    ("data", "train", {"data": {"source": "inputs/*.txt"}}, [], ["data.source='inputs/*.txt'", "all 2 files", "empty"]),
    ("data", "train", {"data": {"source": "inputs/folder"}}, [], ["data.source='inputs/folder'", "no such file"]),
    ("data", "train", {"data": {"source": "wikitext"}}, [], ["data.source='wikitext'", "hub dataset name"]),
    ("data", "train", {"data": {"source": "my corpus"}}, [], ["data.source='my corpus'", "owner/name"]),
    ("data", "train", {"data": {"tokenizer": "missing.json"}}, [], ["data.tokenizer='missing.json'", "does not exist"]),
    ("data", "train", {"data": {"tokenizer": "inputs/bad.json"}}, [], ["data.tokenizer='inputs/bad.json'", "readable"]),
    ("data", "study", {"run": {"data": {"source": "missing.txt"}}}, [], ["run.data.source='missing.txt'"]),
    ("data", "study", {"run": {"data": {"tokenizer": "missing.json"}}}, [], ["run.data.tokenizer='missing.json'"]),
    ("data", "search", {"run": {"data": {"source": "inputs/empty.txt"}}}, [], ["run.data.source='inputs/empty.txt'"]),
    # -- theme 3: places written: unwritable, an existing file, too long, control characters, outside -------
    ("paths", "train", {}, ["train.out_dir=../../etc"], ["train.out_dir='../../etc'", "leads outside"]),
    ("paths", "train", {}, ["train.out_dir="], ["train.out_dir", "non-empty"]),
    ("paths", "train", {}, ["train.out_dir=inputs/afile"], ["train.out_dir='inputs/afile'", "existing file"]),
    ("paths", "train", {}, ["train.out_dir=inputs/afile/run"], ["train.out_dir='inputs/afile/run'", "existing file"]),
    ("paths", "train", {}, ["train.out_dir=" + "a" * 300], ["train.out_dir='aaaa", "too long"]),
    ("paths", "train", {}, ["train.out_dir=" + "/".join(["abcdefgh"] * 600)], ["train.out_dir=", "too long"]),
    ("paths", "train", {"train": {"out_dir": "runs/a\nb"}}, [], ["train.out_dir", "control characters"]),
    ("paths", "train", {"train": {"out_dir": "runs/a\x00b"}}, [], ["train.out_dir", "control characters"]),
    ("paths", "train", {}, ["train.out_dir=/proc/attamba-run"], ["train.out_dir='/proc/attamba-run'",
                                                                  "does not take new files"]),
    ("paths", "train", {}, ["data.cache_dir=../cache"], ["data.cache_dir='../cache'", "leads outside"]),
    ("paths", "train", {}, ["data.cache_dir=inputs/afile"], ["data.cache_dir='inputs/afile'", "existing file"]),
    ("paths", "train", {}, ["tracking.journal_dir=inputs/afile"], ["tracking.journal_dir", "existing file"]),
    ("paths", "study", {"out_dir": "../../elsewhere"}, [], ["out_dir='../../elsewhere'", "leads outside"]),
    ("paths", "study", {"out_dir": "inputs/afile"}, [], ["out_dir='inputs/afile'", "existing file"]),
    ("paths", "study", {"out_dir": "/proc/attamba-studies"}, [], ["out_dir='/proc/attamba-studies'", "new files"]),
    ("paths", "study", {"run": {"data": {"cache_dir": "../cache"}}}, [], ["run.data.cache_dir='../cache'", "outside"]),
    ("paths", "search", {"out_dir": "../searches"}, [], ["out_dir='../searches'", "leads outside"]),
    ("paths", "search", {}, ["storage=sqlite:///../../o.db"], ["storage='../../o.db'", "leads outside"]),
    ("paths", "search", {}, ["storage=sqlite:///inputs"], ["storage='sqlite:///inputs'", "is a folder"]),
    ("paths", "report", None, ["--experiment", "x", "--out", "inputs/afile"],
     ["--out='inputs/afile'", "existing file"]),
    ("paths", "report", None, ["--experiment", "../../x"], ["--out (default reports/EXPERIMENT)", "leads outside"]),
    ("paths", "report", None, ["--experiment", "a\nb"], ["--experiment", "control characters"]),
    ("paths", "sync", None, ["nowhere"], ["DIR='nowhere'", "no such folder"]),
    ("paths", "eval", None, ["nowhere"], ["checkpoint 'nowhere' does not exist"]),
    ("paths", "eval", None, ["inputs", "--lm-eval", "x", "--include-path", "nowhere"], ["--include-path='nowhere'"]),
    ("paths", "generate", None, ["nowhere", "--prompt", "x"], ["checkpoint 'nowhere' does not exist"]),
    # -- theme 4: YAML shapes ---------------------------------------------------------------------------
    ("yaml", "train", "1: 2\n", [], ["line 1", "the key '1'", "not text"]),
    ("yaml", "train", "true: 3\n", [], ["the key 'true'", "not text"]),
    ("yaml", "train", "null: 3\n", [], ["the key 'null'", "not text"]),
    ("yaml", "train", "optim:\n  1: 2\n", [], ["optim: the key '1'", "line 2"]),
    ("yaml", "study", "name: x\nattamba: {chunk_size: [4], 8: [1]}\n", [], ["attamba: the key '8'"]),
    ("yaml", "train", "? [a, b]\n: 1\n", [], ["a list", "not text"]),
    ("yaml", "train", "a: " + "[" * 100 + "]" * 100 + "\n", [], ["nested deeper than 32"]),
    ("yaml", "train", ALIAS_CHAIN, [], ["nested deeper than 32", "aliases expanded"]),
    ("yaml", "train", BOMB, [], ["aliases expand to more than 10000 values"]),
    ("yaml", "search", "name: &a [*a]\n", [], ["name", "alias inside the value it names"]),
    ("yaml", "train", "- 1\n- 2\n", [], ["mapping", "got a list"]),
    ("yaml", "train", "!!python/object/apply:os.system ['true']\n", [], ["bad.yaml", "line 1"]),
    ("yaml", "train", "# " + "x" * (1 << 20) + "\n", [], ["bad.yaml", "MiB"]),
    ("yaml", "train", b"name: \xff\n", [], ["bad.yaml", "UTF-8"]),
    ("yaml", "search", {"space": {"chunk_size": 4}}, [], ["space.chunk_size", "mapping of IntParam fields", "4"]),
    ("yaml", "search", {"space": {"state_dim": 16}}, [], ["space.state_dim", "mapping of IntParam fields"]),
    ("yaml", "search", {"space": {"boundaries": "cyclic"}}, [], ["space.boundaries", "a list"]),
    ("yaml", "eval", None, ["nowhere", "--variant", "chunk_size=["], ["--variant", "chunk_size", "not a YAML value"]),
    ("yaml", "train", {}, ["optim.lr=[1, {a: "], ["override 'optim.lr=[1, {a: '", "not valid YAML"]),
    # -- theme 5: integers: seeds, counts, runs that would take forever --------------------------------------
    ("integers", "train", {}, ["train.seed=" + str(10**30)], ["train.seed", "[0, 9223372036854775807]", str(10**30)]),
    ("integers", "train", {}, ["train.seed=-1"], ["train.seed", "got -1"]),
    ("integers", "train", {}, ["model.seed=-1"], ["model.seed", "got -1"]),
    ("integers", "train", {}, [f"model.boundary_seed={2**63}"], ["model.boundary_seed", str(2**63)]),
    ("integers", "train", {}, ["data.seed=-3"], ["data.seed", "got -3"]),
    ("integers", "train", {}, ["eval.seed=-3"], ["eval.seed", "got -3"]),
    ("integers", "train", "train:\n  seed: " + "9" * 200 + "\n", [], ["line 2", "an integer of 200 digits"]),
    ("integers", "study", {"seeds": [10**30]}, [], ["seeds[0]", str(10**30)]),
    ("integers", "study", {"seeds": [0, -1]}, [], ["seeds[1]", "got -1"]),
    ("integers", "search", {"seed": -1}, [], ["seed must be", "got -1"]),
    ("integers", "generate", None, ["nowhere", "--prompt", "x", "--seed", "-1"], ["--seed", "got -1"]),
    ("integers", "train", {}, ["train.steps=1000000000000"], ["train.steps=1000000000000", "days", "--yes"]),
    ("integers", "study", {"tokens": {"tokens": 10**30}}, [], ["the study's 2 runs", "days", "--yes",
                                                               "tokens.tokens"]),
    ("integers", "search", {"run": {"train": {"steps": 10**12}}}, [], ["the search's 2 trials", "--yes"]),
    ("integers", "generate", None, ["nowhere", "--prompt", "x", "--max-new-tokens", "0"], ["--max-new-tokens"]),
    ("integers", "generate", None, ["nowhere", "--prompt", "x", "--max-new-tokens", str(10**9)],
     ["--max-new-tokens", "at most"]),
    ("integers", "generate", None, ["nowhere", "--prompt", "x", "--temperature", "nan"], ["--temperature", "nan"]),
    ("integers", "generate", None, ["nowhere", "--prompt", "x", "--temperature", "-1"], ["--temperature", "-1"]),
    ("integers", "generate", None, ["nowhere", "--prompt", "x", "--top-p", "0"], ["--top-p", "0"]),
    ("integers", "generate", None, ["nowhere", "--prompt", "x", "--top-k", "0"], ["--top-k", "0"]),
    ("integers", "generate", None, ["nowhere", "--prompt", ""], ["--prompt", "non-empty"]),
    ("integers", "eval", None, ["nowhere", "--lm-eval", "x", "--limit", "0"], ["--limit", "got 0"]),
    ("integers", "eval", None, ["nowhere", "--paper-tail", "1"], ["--paper-tail", "got 1"]),
    ("integers", "eval", None, ["nowhere", "--limit", "5"], ["--include-path and --limit", "--lm-eval"]),
    ("integers", "eval", None, ["nowhere", "--lm-eval", "a,,b"], ["--lm-eval", "non-empty"]),
    ("integers", "bench", None, ["attention", "--seq-len", "0"], ["--seq-len", "got 0"]),
    ("integers", "bench", None, ["train-step", "--repeats", "-1"], ["--repeats", "got -1"]),
    ("integers", "bench", None, ["decode", "--context", str(10**9)], ["--context", str(10**9)]),
    ("integers", "bench", None, ["attention", "--seq-len", "1000000"], ["--seq-len=1000000", "--no-reference"]),
    ("integers", "bench", None, ["train-step", "--size", "huge"], ["--size", "'huge'"]),
    ("integers", "bench", None, ["decode", "--dtype", "bfloat16"], ["bench decode", "--dtype"]),
    # -- theme 6: a search's every point, not only its first --------------------------------------------
    ("space", "search", {"space": {"state_dim": {"choices": [16, 10**9]}}}, [],
     ["space.state_dim.choices[1]=1000000000", "memory"]),
    ("space", "search", {"space": {"leading_tokens": {"choices": [0, 100000]}}}, [],
     ["space.leading_tokens.choices[1]=100000", "data.seq_len (32)"]),
    ("space", "search", {}, ["space.chunk_size={low: 2, high: 1000}"],
     ["space.chunk_size.high=1000", "model.chunk_size", "data.seq_len (32)"]),
    ("space", "search", {}, ["space.chunk_size={low: 2, high: 1001, step: 10}"],
     ["space.chunk_size.high=1001 (drawn as 992)"]),
    ("space", "search", {}, ["space.state_dim={low: 8, high: 1000000000, log: true}"],
     ["space.state_dim.high=1000000000", "memory"]),
    ("space", "search", {"space": {"boundaries": ["cyclic", "diagonal"]}}, [], ["space.boundaries", "'diagonal'"]),
    ("space", "search", {}, ["storage="], ["storage", "non-empty"]),
    ("space", "search", {"storage": "   "}, [], ["storage", "non-empty"]),
    # -- theme 7: coercions that changed a value silently ------------------------------------------------
    ("coercion", "train", {}, ["model.kv_proj=off"], ["model.kv_proj", "'off'", "write true or false"]),
    ("coercion", "train", "train:\n  progress: yes\n", [], ["train.progress", "'yes'", "write true or false"]),
    ("coercion", "train", {}, ["model.pseudo_chunk=On"], ["model.pseudo_chunk", "'On'", "write true or false"]),
    ("coercion", "train", "train:\n  steps: 1_000\n", [], ["train.steps", "'1_000'"]),
    ("coercion", "study", {"attamba": {"kv_proj": ["off"]}}, [], ["kv_proj", "'off'", "write true or false"]),
    ("coercion", "train", {}, ["model.vocab_size=100"], ["model.vocab_size=100", "'byte' has 259 tokens"]),
    ("coercion", "train", {"data": {"tokenizer": "bpe", "vocab_size": 512}, "model": {"vocab_size": 1024}}, [],
     ["model.vocab_size=1024", "'bpe' has 512 tokens", "data.vocab_size=1024"]),
    ("coercion", "study", {"run": {"model": {"vocab_size": 100}}}, [], ["run.model.vocab_size=100", "259"]),
    ("coercion", "search", {"run": {"model": {"vocab_size": 300}}}, [], ["run.model.vocab_size=300", "259"]),
    ("coercion", "train", "optim:\n  lr: 0.1\n  lr: 0.2\n", [], ["optim.lr: duplicate key 'lr'", "line 2",
                                                                  "line 3"]),
    ("coercion", "study", "name: a\nsizes: [micro]\nname: b\n", [], ["duplicate key 'name'", "line 1"]),
    ("coercion", "train", "", [], ["bad.yaml", "is empty"]),
    ("coercion", "train", "# only a comment\n\n", [], ["bad.yaml", "is empty"]),
    ("coercion", "train", {}, ["model.chunk_size=64"], ["model.chunk_size", "data.seq_len (32)", "got 64"]),
    ("coercion", "train", {}, ["model.leading_tokens=33"], ["model.leading_tokens", "data.seq_len (32)", "got 33"]),
    ("coercion", "study", {"attamba": {"chunk_size": [4, 64]}}, [], ["attamba.chunk_size[1]=64", "data.seq_len"]),
    ("coercion", "study", {"run": {"train": {"out_dir": "mine"}}}, [],
     ["run.train.out_dir='mine'", "would be ignored", "studies/bad-input/<run name>"]),
    ("coercion", "study", {"run": {"train": {"steps": 5}}}, [], ["run.train.steps=5", "tokens"]),
    ("coercion", "study", {"run": {"model": {"seed": 3}}}, [], ["run.model.seed=3", "seeds"]),
    ("coercion", "study", {"run": {"name": "x"}}, [], ["run.name='x'", "would be ignored"]),
    ("coercion", "search", {"run": {"train": {"out_dir": "mine"}}}, [],
     ["run.train.out_dir='mine'", "searches/bad-input/trials/<trial name>"]),
    # -- theme 8: tracking, report, sync, lm-eval ---------------------------------------------------------
    ("tracking", "train", {}, ["tracking.uri=ftp://x"], ["tracking.uri='ftp://x'", "unknown scheme"]),
    ("tracking", "train", {}, ["tracking.uri=sqlite:///inputs"], ["tracking.uri='sqlite:///inputs'", "is a folder"]),
    ("tracking", "train", {}, ["tracking.uri=sqlite:////proc/attamba/m.db"], ["tracking.uri", "new files"]),
    ("tracking", "train", {}, ["tracking.uri=sqlite:///../m.db"], ["tracking.uri='../m.db'", "leads outside"]),
    ("tracking", "study", {"run": {"tracking": {"uri": "sqlite:///inputs"}}}, [], ["run.tracking.uri", "folder"]),
    ("tracking", "search", {"run": {"tracking": {"uri": "sqlite:///../m.db"}}}, [], ["run.tracking.uri", "outside"]),
    ("tracking", "report", None, ["--experiment", "x", "--tracking-uri", "ftp://x"], ["--tracking-uri", "'ftp'"]),
    ("tracking", "report", None, ["--experiment", "x", "--tracking-uri", "sqlite:///inputs"], ["--tracking-uri",
                                                                                             "is a folder"]),
    ("tracking", "sync", None, [".", "--tracking-uri", "ftp://x"], ["--tracking-uri='ftp://x'", "unknown scheme"]),
    ("tracking", "sync", None, ["inputs/afile"], ["DIR='inputs/afile'", "not a folder"]),
]:
    PREFLIGHT.append(_p(*_case))


@pytest.fixture
def work(folder, monkeypatch):
    """`folder` with a few input files, and a tripwire on everything a command starts after its checks."""
    import importlib

    import pipeline.cli
    import pipeline.eval.evaluate
    import pipeline.ray.cluster
    import pipeline.report
    import pipeline.search.driver
    import pipeline.study.driver
    import pipeline.tracking
    import pipeline.train.loop

    def tripwire(what):
        def started(*args, **kwargs):
            raise AssertionError(f"{what} started for bad input")
        return started

    prepare = importlib.import_module("pipeline.data.prepare")   # the package's `prepare` is the function
    for module, name in ((pipeline.train.loop, "train"), (prepare, "prepare"),
                         (pipeline.ray.cluster, "connect"), (pipeline.study.driver, "parent_run"),
                         (pipeline.search.driver, "parent_run"), (pipeline.eval.checkpoint, "evaluate_checkpoint"),
                         (pipeline.cli, "generate_from_checkpoint"), (pipeline.report, "make_report"),
                         (pipeline.tracking, "sync_journal")):
        monkeypatch.setattr(module, name, tripwire(f"{module.__name__}.{name}"))
    for name in ("ATTAMBA_HOME", "RAY_JOB_CONFIG_JSON_ENV_VAR", "ATTAMBA_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    inputs = folder / "inputs"
    (inputs / "folder").mkdir(parents=True)
    for name in ("empty.txt", "empty2.txt"):
        (inputs / name).write_text("")
    (inputs / "afile").write_text("a file, not a folder\n")
    (inputs / "bad.json").write_text("{not a tokenizer")
    return folder


def snapshot(root: Path) -> dict:
    """Every path under `root` with its kind and size: what a command must leave as it was."""
    return {str(p.relative_to(root)): (p.is_dir(), p.is_dir() or p.stat().st_size) for p in root.rglob("*")}


def _run_cli(work: Path, capsys, command: str, change, args: list[str]) -> tuple[int, list[str], str]:
    """Write the case's file (for train, study, search), run the command; (exit code, stderr lines, stdout)."""
    if command in BASE:
        path = work / "bad.yaml"
        if isinstance(change, bytes):
            path.write_bytes(change)
        elif isinstance(change, str):
            path.write_text(change)
        else:
            path.write_text(yaml.safe_dump(_merge(BASE[command], change)))
        args = ["bad.yaml", *args]
    before = snapshot(work)
    code = main([command, *args])
    captured = capsys.readouterr()
    assert snapshot(work) == before, "the command wrote or removed files"
    return code, captured.err.strip().splitlines(), captured.out


def test_the_preflight_table_covers_every_theme_and_command():
    themes = {c.id.split("-")[0] for c in PREFLIGHT}
    assert themes == {"device", "resources", "data", "paths", "yaml", "integers", "space", "coercion", "tracking"}
    assert {c.values[0] for c in PREFLIGHT} == {"train", "study", "search", "eval", "generate", "report", "sync",
                                                "bench"}
    assert len(PREFLIGHT) >= 120


@pytest.mark.parametrize("command, change, args, words", PREFLIGHT)
def test_bad_input_is_refused_in_one_line_before_anything_is_written_or_started(work, capsys, command, change,
                                                                                 args, words):
    code, lines, out = _run_cli(work, capsys, command, change, args)
    assert code == 2, lines
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith(f"attamba {command}: error: ") and "Traceback" not in line
    assert len(line) <= 500, f"{len(line)} characters"
    for word in words:
        assert word in line, (word, line)
    assert out == ""


def test_a_billion_laughs_file_is_refused_at_once(work, capsys):
    start = time.perf_counter()
    code, lines, _ = _run_cli(work, capsys, "train", BOMB, [])
    assert code == 2 and len(lines) == 1 and len(lines[0]) < 300, lines
    assert time.perf_counter() - start < 2


def test_a_huge_value_makes_a_short_line(work, capsys):
    code, lines, _ = _run_cli(work, capsys, "train", {"name": "x" * 100_000}, [])
    assert code == 2 and len(lines) == 1 and len(lines[0]) < 300 and lines[0].count("x") < 100, lines


def test_lm_eval_not_installed_is_one_line(work, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)   # import lm_eval now fails, as where it is not installed
    code, lines, _ = _run_cli(work, capsys, "eval", None, ["nowhere", "--lm-eval", "hellaswag"])
    assert code == 2 and len(lines) == 1 and "--lm-eval needs lm-evaluation-harness" in lines[0], lines


def test_an_unforeseen_error_while_checking_is_one_line_and_attamba_debug_shows_it(work, capsys, monkeypatch):
    import pipeline.config

    def broken(data):
        raise TypeError("unhashable type: 'list'")

    monkeypatch.setattr(pipeline.config, "run_config_from_dict", broken)
    code, lines, _ = _run_cli(work, capsys, "train", {}, [])
    assert code == 2 and len(lines) == 1, lines
    assert "config file 'bad.yaml'" in lines[0] and "TypeError: unhashable type" in lines[0]
    assert "ATTAMBA_DEBUG=1" in lines[0]
    monkeypatch.setenv("ATTAMBA_DEBUG", "1")
    with pytest.raises(TypeError, match="unhashable"):
        main(["train", "bad.yaml"])


def test_an_error_after_the_checks_keeps_its_traceback(work, monkeypatch):
    """A TypeError from training is a bug, not bad input: it is not turned into a one-line exit 2."""
    import pipeline.train.loop

    def bug(cfg, **options):
        raise TypeError("a bug in the run phase")

    monkeypatch.setattr(pipeline.train.loop, "train", bug)
    (work / "ok.yaml").write_text(yaml.safe_dump(BASE["train"]))
    with pytest.raises(TypeError, match="a bug in the run phase"):
        main(["train", "ok.yaml"])


def test_yes_lets_a_long_run_past_the_time_check(work):
    from pipeline.preflight import check_run

    cfg = load_run_config(None, ["size=micro", "data.tokenizer=byte", "data.seq_len=32", "model.max_seq_len=32",
                                 "train.steps=1000000000000"])
    with pytest.raises(ValueError, match="--yes"):
        check_run(cfg)
    check_run(cfg, yes=True)


@pytest.mark.parametrize("text, value", [("steps: 010", 10), ("steps: 0x10", 16), ("steps: 0o10", 8),
                                         ("progress: false", False), ("progress: FALSE", False),
                                         ("out_dir: 2024-01-01", "2024-01-01"), ("out_dir: 'off'", "off")])
def test_files_are_read_as_yaml_1_2(folder, text, value):
    path = folder / "run.yaml"
    path.write_text(f"train:\n  {text}\n")
    key = text.split(":")[0]
    assert getattr(load_run_config(path).train, key) == value


def test_merge_keys_still_share_settings(folder):
    path = folder / "run.yaml"
    path.write_text("base: &base {steps: 3, seed: 1}\n")
    with pytest.raises(ValueError, match="unknown config key"):   # `base` itself is not a field ...
        load_run_config(path)
    path.write_text("train:\n  <<: {steps: 3, seed: 1}\n  seed: 2\n")   # ... a merge is, and its keys may be overridden
    cfg = load_run_config(path)
    assert (cfg.train.steps, cfg.train.seed) == (3, 2)


# ---- exit codes: a study or search with failed runs is not a success ---------------------------------

@pytest.mark.parametrize("command, result, code", [
    ("study", {"failed": []}, 0),
    ("study", {"failed": ["micro__full__s0__D256"]}, 1),
    ("search", {"failed": [], "complete": 4, "n_trials": 4}, 0),
    ("search", {"failed": [3], "complete": 4, "n_trials": 4}, 1),
    ("search", {"failed": [], "complete": 2, "n_trials": 4}, 1),
])
def test_a_study_or_search_with_failed_runs_exits_1_and_still_prints_its_json(work, capsys, monkeypatch, command,
                                                                               result, code):
    import pipeline.search.driver
    import pipeline.study.driver

    module = pipeline.study.driver if command == "study" else pipeline.search.driver
    monkeypatch.setattr(module, f"run_{command}", lambda *args, **kwargs: dict(result))
    assert main([command, "any.yaml"]) == code
    captured = capsys.readouterr()
    assert json.loads(captured.out)["failed"] == result["failed"]
    assert ("failed" in captured.err) == bool(code)


# ---- a few through a real process -------------------------------------------------------------------

def _attamba(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("ATTAMBA_HOME", "RAY_ADDRESS", "ATTAMBA_DEBUG")}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]),
               ATTAMBA_CACHE=str(cwd / "cache"), MLFLOW_TRACKING_URI=f"sqlite:///{cwd / 'mlflow.db'}",
               ATTAMBA_OPTUNA_STORAGE=f"sqlite:///{cwd / 'optuna.db'}")
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("command, change, args, words", [
    ("train", BOMB, [], ["aliases expand"]),
    ("train", {}, ["train.device=cuda"], ["train.device=cuda"]),
    ("study", {"run": {"train": {"device": "cuda"}}}, [], ["run.train.device=cuda"]),
    ("study", {"seeds": [10**30]}, [], ["seeds[0]"]),
    ("search", {"space": {"state_dim": {"choices": [16, 10**9]}}}, [], ["space.state_dim.choices[1]"]),
])
def test_bad_input_through_a_real_process(tmp_path, command, change, args, words):
    if "cuda" in str(change) + str(args) and __import__("torch").cuda.is_available():
        pytest.skip("a GPU is visible here")
    path = tmp_path / "bad.yaml"
    path.write_text(change if isinstance(change, str) else yaml.safe_dump(_merge(BASE[command], change)))
    done = _attamba(tmp_path, command, "bad.yaml", *args)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith(f"attamba {command}: error: "), done.stderr[-2000:]
    assert all(word in lines[0] for word in words), lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


@pytest.mark.slow
def test_a_study_whose_every_run_fails_exits_1(tmp_path):
    """A real tiny study whose two runs pass every check and then fail while training (a learning rate that
    makes the loss non-finite at once): exit code 1, and the JSON lists both runs as failed."""
    path = tmp_path / "study.yaml"
    study = _merge(BASE["study"], {"name": "all-fail", "resources": {"max_failures": 0, "cpus_per_worker": 0.99},
                                   "report": False,
                                   "run": {"optim": {"lr": 1e30, "warmup_steps": 0},
                                           "train": {"max_consecutive_skips": 1, "eval_every": 0, "ckpt_every": 0,
                                                     "batch_size": 2}}})
    path.write_text(yaml.safe_dump(study))
    done = _attamba(tmp_path, "study", "study.yaml")
    assert done.returncode == 1, done.stderr[-3000:]
    result = json.loads(done.stdout[done.stdout.index("{"):])
    assert len(result["failed"]) == 2 and result["trained"] == 2, result
    assert "2 run(s) failed" in done.stderr
    assert "non-finite loss" in done.stderr, "the runs failed for the planned reason"
