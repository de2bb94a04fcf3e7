"""A real short run with eval.variants: its final evaluation scores the whole validation split, logs each
variant's metrics and tag into its MLflow run, and keeps them on a resume at the final step;
`attamba eval --variant` adds more to the same run; `--split test` names its metrics test/..."""

import json

import pytest

from attamba import costs
from pipeline import schema
from pipeline.cli import main
from pipeline.config import load_run_config
from pipeline.data.prepare import prepare
from pipeline.train.loop import train
from tests.pipeline.train.runs import cache, env, tiny  # noqa: F401 (fixtures)


def _json(stdout: str) -> dict:
    """The command's JSON, after any line a library printed before it."""
    return json.loads(stdout[stdout.index("{\n"):])


def _run(run_id):
    from mlflow.tracking import MlflowClient

    return MlflowClient().get_run(run_id)


@pytest.mark.slow
def test_final_evaluation_logs_variants_and_the_whole_split(env, capsys):
    out = env / "run"
    cfg = load_run_config(None, tiny(out, "train.steps=3", "train.ckpt_every=3", "train.eval_every=0",
                                     "tracking.enabled=true", "tracking.experiment=evalvar",
                                     "eval.variants=[{chunk_size: 8}, {window: 9}, {leading_tokens: 0}]"))
    result = train(cfg)
    data = prepare(cfg.data, max_seq_len=cfg.model.max_seq_len)
    assert result[schema.M_VAL_TOKENS] == len(data.tokens("validation")) - 1   # every target of the split
    run = _run(result["run_id"])
    model = cfg.model.__class__(**{**vars(cfg.model), "vocab_size": data.vocab_size})
    p8 = model.__class__(**{**vars(model), "chunk_size": 8})
    assert p8.variant() == "attamba-P8-L4-cyclic"
    assert run.data.tags[schema.TAG_EVAL_VARIANT_PREFIX + p8.variant()] == "chunk_size=8"
    assert schema.TAG_EVAL_VARIANT_PREFIX + "swa-W9" not in run.data.tags   # a window is for transformers
    metrics = run.data.metrics
    kv = metrics[schema.eval_variant_metric(p8.variant(), "kv_cache_bytes")]
    assert kv == costs.kv_cache_bytes(p8, cfg.data.seq_len) != metrics[schema.M_KV_BYTES]
    assert metrics[schema.eval_variant_metric(p8.variant(), "attn_flops_per_token")] == \
        costs.attention_flops(p8, cfg.data.seq_len)["per_token"]
    for label in (p8.variant(), "attamba-P4-L0-cyclic"):
        assert metrics[schema.eval_variant_metric(label, "ppl")] != metrics[schema.M_VAL_PPL]
    # the loss by position in the context, of the run and of each variant, from the final evaluation
    buckets = [schema.loss_pos_name(a, b) for a, b in schema.position_buckets(cfg.data.seq_len)]
    for name in buckets:
        assert metrics[schema.split_metric("validation", name)] == result[schema.split_metric("validation", name)]
        assert schema.eval_variant_metric(p8.variant(), name) in metrics
    # a resume at the final step re-logs the stored evaluation, variants included, into the same run
    again = train(cfg)
    assert again["run_id"] == result["run_id"]
    assert again[schema.eval_variant_metric(p8.variant(), "ppl")] == result[schema.eval_variant_metric(p8.variant(), "ppl")]

    # a variant added to the config of a finished run is scored on its final weights by running it again
    more = load_run_config(None, tiny(out, "train.steps=3", "train.ckpt_every=3", "train.eval_every=0",
                                      "tracking.enabled=true", "tracking.experiment=evalvar",
                                      "eval.variants=[{chunk_size: 8}, {leading_tokens: 2}]"))
    third = train(more)
    assert third["run_id"] == result["run_id"] and third["steps_s"] == 0
    assert third[schema.eval_variant_metric(p8.variant(), "ppl")] == result[schema.eval_variant_metric(p8.variant(), "ppl")]
    run = _run(result["run_id"])
    assert run.data.tags[schema.TAG_EVAL_VARIANT_PREFIX + "attamba-P4-L2-cyclic"] == "leading_tokens=2"
    assert run.data.metrics[schema.eval_variant_metric("attamba-P4-L2-cyclic", "ppl")] == \
        third[schema.eval_variant_metric("attamba-P4-L2-cyclic", "ppl")]

    # the CLI: another variant, logged into the same run
    assert main(["eval", str(out), "--variant", "model.chunk_size=2,boundaries=uniform"]) == 0
    captured = capsys.readouterr()
    printed = _json(captured.out)
    assert printed[schema.M_VAL_PPL] == pytest.approx(result[schema.M_VAL_PPL], rel=1e-6)
    assert "logged into MLflow run " + result["run_id"] in captured.err
    key = schema.eval_variant_metric("attamba-P2-L4-uniform", "ppl")
    assert _run(result["run_id"]).data.metrics[key] == printed[key]
    assert main(["eval", str(out), "--variant", "chunk_size=16", "--no-log"]) == 0
    assert "not logged (--no-log)" in capsys.readouterr().err
    assert schema.eval_variant_metric("attamba-P16-L4-cyclic", "ppl") not in _run(result["run_id"]).data.metrics
    # a shape-changing variant fails before any evaluation, in one line
    assert main(["eval", str(out), "--variant", "kv_proj=true"]) == 2
    assert "may only change the attention setting" in capsys.readouterr().err
    # the test split names its metrics by it
    assert main(["eval", str(out), "--split", "test"]) == 0
    printed = _json(capsys.readouterr().out)
    assert "test/ppl" in printed and "test/tokens" in printed and schema.M_VAL_PPL not in printed
