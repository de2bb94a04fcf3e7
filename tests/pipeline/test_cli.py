"""The `attamba` command end to end: help, clear config errors, train -> eval -> generate."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import build_parser, main
from tests.helpers import REPO_ROOT as ROOT



def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("train", "eval", "generate", "study", "search", "report", "sync", "bench"):
        assert command in out
    assert "configs/studies/quickstart.yaml" in out


def test_config_errors_exit_2_with_one_clear_line(capsys, tmp_path):
    code = main(["train", str(ROOT / "configs/train_tiny.yaml"), "model.chunk_size=0"])
    err = capsys.readouterr().err
    assert code == 2 and "model.chunk_size must be >= 1, got 0" in err and "Traceback" not in err
    assert main(["train", str(ROOT / "configs/train_tiny.yaml"), "train.stepz=3"]) == 2
    assert "unknown config key(s) train.stepz" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "nothing"), "--prompt", "x"]) == 2


def test_train_eval_generate_round_trip(tmp_path):
    env = {**os.environ, "ATTAMBA_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    run = tmp_path / "run"
    overrides = ["size=micro", "data.vocab_size=300", "data.seq_len=32", "model.max_seq_len=64", "train.steps=4",
                 "train.batch_size=2", "train.eval_every=4", "train.ckpt_every=4", "train.progress=false",
                 "eval.batches=2", "eval.mqar_lengths=[]", f"train.out_dir={run}"]

    def attamba(*args):
        return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)

    done = attamba("train", str(ROOT / "configs/train_tiny.yaml"), *overrides)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout[done.stdout.index("{"):])["step"] == 4
    evaluated = attamba("eval", str(run), "--paper-metric")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    metrics = json.loads(evaluated.stdout[evaluated.stdout.index("{"):])
    assert metrics["val/loss"] > 0 and metrics["val/paper_ppl"] > 1
    generated = attamba("generate", str(run), "--prompt", "KING:", "--max-new-tokens", "12", "--temperature", "0")
    assert generated.returncode == 0, generated.stderr[-2000:]
    assert generated.stdout.startswith("KING:") and len(generated.stdout.strip()) > len("KING:")


def test_parser_builds():
    assert build_parser().prog == "attamba"


def _subcommands():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


@pytest.mark.parametrize("name", sorted(_subcommands()))
def test_every_subcommand_explains_itself_and_each_argument_with_its_default(name):
    parser = _subcommands()[name]
    assert parser.description and "\n" not in parser.description.strip(), "a one-line description"
    text = " ".join(parser.format_help().split())  # help is wrapped: compare with single spaces
    assert parser.description.strip() in text
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        label = action.option_strings[0] if action.option_strings else action.dest
        assert action.help and action.help.strip(), f"attamba {name}: {label} has no help text"
        shows_value = action.option_strings and action.nargs != 0
        if action.default is not None and (shows_value or isinstance(action, argparse.BooleanOptionalAction)):
            assert f"(default: {action.default})" in text, f"attamba {name}: {label} does not show its default"


def test_generate_help_and_readme_say_sampling_not_greedy():
    text = " ".join(_subcommands()["generate"].format_help().split())
    assert "(default: 0.8)" in text and "0 picks the most likely token (greedy)" in text
    row = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `attamba generate"))
    assert "temperature 0.8" in row and "--temperature 0" in row


def test_printed_json_is_strict_with_null_for_nan_and_infinity(capsys):
    import numpy as np

    from pipeline.cli import _print_json

    _print_json({"loss": float("nan"), "timing": {"rates": [1.5, float("inf"), -float("inf")]},
                 "np": np.float32("nan"), "np_ok": np.float64(2.0), "steps": 3, "name": "s", "path": Path("/x"),
                 "tuple": (np.float16("inf"), None)})
    out = capsys.readouterr().out
    assert "NaN" not in out and "Infinity" not in out
    strict = json.loads(out, parse_constant=lambda name: pytest.fail(f"non-strict constant {name}"))
    assert strict == {"loss": None, "timing": {"rates": [1.5, None, None]}, "np": None, "np_ok": 2.0, "steps": 3,
                      "name": "s", "path": "/x", "tuple": [None, None]}


def test_report_prints_strict_json_with_the_answer_and_describes_the_studys_parent_run(capsys, tmp_path):
    import numpy as np
    from mlflow import MlflowClient

    from pipeline import schema
    from tests.pipeline.report.test_report import _log_run, mlflow_experiment

    uri, client, exp_id = mlflow_experiment(tmp_path, "cli-report")
    parent = client.create_run(exp_id, run_name="cli-report", tags={schema.TAG_ROLE: "parent"}).info.run_id
    for seed in (0, 1, 2):
        for variant, attention, P, L, gap in (("full", "full", "", "", 0.0), ("attamba-P8-L8-cyclic", "attamba", "8",
                                                                               "8", 0.1 + 0.01 * seed)):
            _log_run(client, exp_id, f"{variant}-s1-seed{seed}", variant, attention, "s1", seed, P, L,
                     2.5 + gap, 1e5 if P else 4e5)
    out = tmp_path / "report"
    assert main(["report", "--experiment", "cli-report", "--tracking-uri", uri, "--out", str(out)]) == 0
    printed = capsys.readouterr()
    result = json.loads(printed.out, parse_constant=lambda name: pytest.fail(f"non-strict constant {name}"))
    assert result["report"] == str(out / "report.html") and result["runs"] == 6 and result["usable"] == 6
    assert result["parent_run_id"] == parent and result["failed"] == [] and result["missing"] == []
    pct = 100 * np.mean([np.exp(0.1 + 0.01 * s) - 1 for s in (0, 1, 2)])
    answer = next(line for line in result["answer"] if line.startswith("attamba-P8-L8-cyclic @ s1: "))
    assert f"perplexity +{pct:.3g}% [" in answer and "against the transformer (full): worse" in answer
    assert "KV-cache 4.00x smaller" in answer    # 4e5 / 1e5 bytes
    assert "report written to" in printed.err and "nan" not in printed.out.lower()
    note = MlflowClient(uri).get_run(parent).data.tags["mlflow.note.content"]
    assert str(out / "report.html") in note and "perplexity +" in note
