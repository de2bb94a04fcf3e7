"""Evaluation variants on the model: the same weights under another attention setting equal the model built
with that setting from the start; settings that would change a parameter are refused before any compute.
And in a real short run with eval.variants: its final evaluation scores the whole validation split, logs each
variant's metrics and tag into its MLflow run, and keeps them on a resume at the final step;
`attamba eval --variant` adds more to the same run; `--split test` names its metrics test/..."""

import json
import logging
import math

import pytest
import torch

from attamba import costs
from attamba.attention import Attention, LayerChunks
from attamba.config import ModelConfig
from attamba.layers import apply_rope, rope_tables
from attamba.model import AttambaLM
from attamba.variants import check_same_shapes, check_variant, evaluated_as
from pipeline import schema
from pipeline.cli import main
from pipeline.config import load_run_config, run_config_from_dict
from pipeline.data.prepare import prepare
from pipeline.eval.variants import load_as, parse_variant, resolve, variant_tags
from pipeline.train.loop import train
from tests.helpers import assert_close
from tests.pipeline.train.runs import tiny

SMALL = dict(vocab_size=61, dim=32, n_layers=3, n_heads=2, max_seq_len=96)


def _perturbed(cfg: ModelConfig) -> AttambaLM:
    """A model whose every weight is moved off its initial value (norms and SSM constants included)."""
    model = AttambaLM(cfg)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _tokens(n=2, t=77):
    return torch.randint(0, SMALL["vocab_size"], (n, t), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("overrides", [{"chunk_size": 8}, {"leading_tokens": 0, "boundaries": "random"},
                                       {"ssm_segmentation": "offset", "boundary_seed": 3}])
def test_attamba_variant_equals_the_model_built_with_it(overrides):
    base_cfg = ModelConfig(**SMALL, chunk_size=4, leading_tokens=5, boundaries="cyclic")
    base = _perturbed(base_cfg)
    new_cfg = evaluated_as(base_cfg, check_variant(overrides, "v"))
    reference = AttambaLM(ModelConfig(**{**SMALL, "chunk_size": 4, "leading_tokens": 5, "boundaries": "cyclic",
                                         **overrides}))
    reference.load_state_dict(base.state_dict())
    tokens = _tokens()
    got = load_as(base.state_dict(), new_cfg)(tokens)
    assert_close("variant vs built at it", reference.eval()(tokens), got, 0)
    assert not torch.allclose(got, base(tokens), atol=1e-3)  # the setting really changed what is computed


def test_kv_bytes_of_a_variant_are_its_own():
    base_cfg = ModelConfig(**SMALL, chunk_size=4, leading_tokens=4)
    new_cfg = evaluated_as(base_cfg, {"chunk_size": 8})
    assert costs.kv_cache_bytes(new_cfg, 64) < costs.kv_cache_bytes(base_cfg, 64)
    assert new_cfg.variant() == ModelConfig(**SMALL, chunk_size=8, leading_tokens=4).variant()


def test_full_transformer_with_a_window_equals_the_swa_model():
    base_cfg = ModelConfig(**SMALL, attention="full")
    base = _perturbed(base_cfg)
    (variant,) = resolve(base_cfg, [check_variant({"window": 9}, "v")])
    assert variant.label == "swa-W9" and variant.overrides == "attention=swa,window=9"
    swa = AttambaLM(ModelConfig(**SMALL, attention="swa", window=9))
    swa.load_state_dict(base.state_dict())
    tokens = _tokens()
    got = load_as(base.state_dict(), variant.model)(tokens)
    assert_close("window vs swa", swa.eval()(tokens), got, 0)
    assert not torch.allclose(got, base(tokens), atol=1e-3)


def test_iso_kv_with_a_window_equals_a_naive_masked_reference():
    cfg = ModelConfig(**SMALL, attention="iso_kv", kv_dim=16, sliding_window=True, window=7)
    assert cfg.variant() == "iso_kv-F16-W7"
    torch.manual_seed(0)
    layer = Attention(cfg, 0)
    x = torch.randn(2, 29, cfg.dim, dtype=torch.float64)
    layer = layer.double()
    rope = rope_tables(torch.arange(29), cfg.attn_head_dim, cfg.rope_theta, torch.float64)
    got = layer(x, rope, LayerChunks(None, None, cfg.leading_window))
    # naive: query t sees keys t-6..t (7 keys, itself included)
    q = apply_rope(layer.heads(x @ layer.wq.weight.T), *rope)
    k = apply_rope(layer.heads(x @ layer.wk.weight.T), *rope)
    v = layer.heads(x @ layer.wv.weight.T)
    t = torch.arange(29)
    visible = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - 7)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(cfg.attn_head_dim)
    out = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1) @ v
    want = out.transpose(1, 2).reshape(2, 29, -1) @ layer.wo.weight.T
    assert_close("iso_kv window vs naive", want, got, 1e-12)
    # its cache holds the window only
    assert costs.kv_cache_bytes(cfg, 64) == 2 * 7 * 16 * 4 * cfg.n_layers


def test_iso_kv_variant_loads_the_same_weights_and_is_labelled_by_its_window():
    base_cfg = ModelConfig(**SMALL, attention="iso_kv", kv_dim=16)
    base = _perturbed(base_cfg)
    (variant,) = resolve(base_cfg, [check_variant({"model.window": 9}, "v")])
    assert variant.label == "iso_kv-F16-W9"
    assert variant_tags([variant]) == {schema.TAG_EVAL_VARIANT_PREFIX + "iso_kv-F16-W9": "window=9,sliding_window=true"}
    got = load_as(base.state_dict(), variant.model)(_tokens())
    assert not torch.allclose(got, base(_tokens()), atol=1e-3)


def test_variants_that_do_not_apply_are_skipped_with_a_line(caplog):
    variants = [check_variant({"chunk_size": 16}, "v"), check_variant({"window": 5}, "v")]
    with caplog.at_level(logging.INFO, logger="pipeline.eval.variants"):
        assert [v.label for v in resolve(ModelConfig(**SMALL, attention="full"), variants)] == ["swa-W5"]
        assert [v.label for v in resolve(ModelConfig(**SMALL, chunk_size=4), variants)] == ["attamba-P16-L8-cyclic"]
    assert sum("does not apply" in r.message for r in caplog.records) == 2
    with pytest.raises(ValueError, match="sliding_window"):
        ModelConfig(**SMALL, attention="full", sliding_window=True)


@pytest.mark.parametrize("variant,field", [({"kv_proj": True}, "kv_proj"), ({"ssm": {"state_dim": 64}}, "ssm"),
                                           ({"dim": 64}, "dim"), ({"chunk_size": 0}, "chunk_size")])
def test_parameter_changing_or_bad_variants_are_refused_at_config_build(variant, field):
    with pytest.raises(ValueError, match=rf"eval\.variants\[1\]\.{field}") as info:
        run_config_from_dict({"eval": {"variants": [{"chunk_size": 16}, variant]}})
    if field != "chunk_size":
        assert "may only change the attention setting" in str(info.value)


def test_shape_check_names_the_parameter_and_uses_no_memory():
    base = ModelConfig(**SMALL)
    with pytest.raises(ValueError, match="layers.0.attn.wk.weight.*may only change the attention setting"):
        check_same_shapes(base, ModelConfig(**SMALL, kv_proj=True), "evaluation variant kv_proj=true")
    check_same_shapes(base, evaluated_as(base, {"chunk_size": 2, "pseudo_chunk": True}), "ok")


def test_cli_variant_text_is_parsed_and_checked():
    assert parse_variant("model.chunk_size=16,boundaries=random") == {"chunk_size": 16, "boundaries": "random"}
    with pytest.raises(ValueError, match="not field=value"):
        parse_variant("chunk_size")
    with pytest.raises(ValueError, match=r"--variant\.kv_proj.*attention setting"):
        parse_variant("kv_proj=true")


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
