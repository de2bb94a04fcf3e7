"""A study on `data.source: mqar`: its grid trains through Ray like any data source's, and every run logs
recall (overall and by distance) and no perplexity or bits per byte."""

from __future__ import annotations

import json
import subprocess

import pytest

from pipeline import schema
from pipeline.study.spec import expand, load_study
from tests.pipeline.study.test_study import SMOKE, _driver_env, _mlflow_children, _study_command

MQAR_DATA = "run.data={source: mqar, seq_len: 64, progress: false, mqar: {pairs: 4, vocab_size: 64, val_examples: 32}}"


def test_an_mqar_study_expands_like_any_other():
    specs = expand(load_study(SMOKE, [MQAR_DATA]))
    assert sorted(s.variant for s in specs) == ["attamba-P4-L4-cyclic", "full"]
    assert all(s.config.data.source == "mqar" and s.config.data.mqar.vocab_size == 64 for s in specs)
    with pytest.raises(ValueError, match="data.mqar.vocab_size must be >= 10"):   # before any trial
        expand(load_study(SMOKE, [MQAR_DATA.replace("vocab_size: 64", "vocab_size: 9")]))


@pytest.mark.slow
def test_a_study_on_mqar_trains_two_runs_through_ray_and_logs_recall(tmp_path, ray_tmp):
    command = _study_command(tmp_path, MQAR_DATA, "report=true")
    done = subprocess.run(command, cwd=tmp_path, env=_driver_env(ray_tmp), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert out["trained"] == 2 and not out["failed"]
    _, children = _mlflow_children(tmp_path)
    assert len(children) == 2
    for run in children:
        metrics, params = run.data.metrics, run.data.params
        assert params["data.source"] == "mqar" and params["model.vocab_size"] == "64"
        assert 0 <= metrics[schema.M_VAL_RECALL] <= 1 and schema.M_VAL_LOSS in metrics
        assert any(name.startswith("val/recall_d") for name in metrics)
        assert schema.M_VAL_PPL not in metrics and schema.M_VAL_BPB not in metrics
        assert metrics[schema.M_VAL_TOKENS] == 32 * 4        # the answers of the fixed validation set
    summary = (tmp_path / "reports" / "smoke" / "summary.md").read_text()
    assert "none (MQAR task ids), vocabulary 64" in summary   # not the unused default tokenizer
