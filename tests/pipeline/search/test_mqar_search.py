"""A P/L search on `data.source: mqar`: its quality is the loss on the answers (an MQAR run logs no perplexity),
refused otherwise before any trial; a small search on Ray gives a front of val/loss against KV-cache bytes."""

from __future__ import annotations

import json

import pytest

from pipeline import schema
from pipeline.search.space import load_search
from tests.pipeline.search.test_search import SMOKE

MQAR = ["run.data={source: mqar, seq_len: 64, progress: false, mqar: {pairs: 4, vocab_size: 64, val_examples: 16}}",
        "run.model={max_seq_len: 64}"]


@pytest.mark.parametrize("overrides, message", [
    ([], "objectives.quality must be val_loss with run.data.source=mqar, got 'val_ppl'"),
    (["objectives.quality=val_bpb"], "objectives.quality must be val_loss with run.data.source=mqar, got 'val_bpb'"),
    (["objectives.quality=val_loss", "constraints.max_ppl_gap=0.1"],
     "constraints.max_ppl_gap must be null with run.data.source=mqar, got 0.1"),
])
def test_an_mqar_search_is_refused_an_objective_it_cannot_measure(overrides, message):
    with pytest.raises(ValueError, match=message) as error:
        load_search(SMOKE, [*MQAR, *overrides])
    assert "\n" not in str(error.value)


def test_an_mqar_search_optimises_the_answers_loss():
    search = load_search(SMOKE, [*MQAR, "objectives.quality=val_loss"])
    assert search.objectives.metrics == [schema.M_VAL_LOSS, schema.M_KV_BYTES]


@pytest.mark.slow
def test_a_small_mqar_search_on_ray_gives_a_front(search_env):
    from pipeline.search.driver import run_search

    url = f"sqlite:///{search_env}/optuna.db"
    out = run_search(SMOKE, [*MQAR, "objectives.quality=val_loss", f"storage={url}",
                             f"out_dir={search_env}/searches", "n_trials=2"])
    assert out["complete"] == 2 and not out["failed"] and out["pareto"]
    record = json.loads((search_env / "searches" / "smoke" / "pareto.json").read_text())
    assert record["objectives"] == [schema.M_VAL_LOSS, schema.M_KV_BYTES]
    assert all(0 < p["values"][schema.M_VAL_LOSS] < 10 for p in record["front"])
