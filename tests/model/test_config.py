"""Model config validation, presets and the cost model's parameter count."""

import pytest

from attamba import costs
from attamba.config import ModelConfig, SSMConfig
from attamba.model import AttambaLM
from attamba.presets import PRESETS, model_config

BAD_CONFIGS = [
    ({"chunk_size": 0}, "chunk_size"),
    ({"chunk_size": 2.5}, "chunk_size"),
    ({"leading_tokens": -1}, "leading_tokens"),
    ({"boundaries": "diagonal"}, "boundaries"),
    ({"attention": "linear"}, "attention"),
    ({"ssm_segmentation": "segment"}, "ssm_segmentation"),
    ({"dim": 0}, "dim"),
    ({"dim": 100, "n_heads": 3}, "dim"),
    ({"n_layers": 0}, "n_layers"),
    ({"vocab_size": 1}, "vocab_size"),
    ({"head_dim": 7, "dim": 56, "n_heads": 8}, "head_dim"),
    ({"head_dim": 32, "dim": 512, "n_heads": 8}, "head_dim"),  # attamba needs n_heads*head_dim == dim
    ({"norm_eps": 0.0}, "norm_eps"),
    ({"rope_theta": -1.0}, "rope_theta"),
    ({"max_seq_len": 0}, "max_seq_len"),
    ({"kv_proj": "yes"}, "kv_proj"),
    ({"ssm_residual": 1}, "ssm_residual"),
    ({"window": 0, "attention": "swa"}, "window"),
    ({"attention": "iso_kv"}, "kv_dim"),
    ({"attention": "iso_kv", "kv_dim": 100}, "kv_dim"),
    ({"ssm": {"state_dim": 0}}, "ssm.state_dim"),
    ({"ssm": {"conv_width": 0}}, "ssm.conv_width"),
    ({"ssm": {"scan_chunk": 0}}, "ssm.scan_chunk"),
    ({"ssm": {"a_init_min": 4.0, "a_init_max": 2.0}}, "ssm.a_init_max"),
    ({"ssm": {"dt_min": 0.1, "dt_max": 0.01}}, "ssm.dt_max"),
    ({"ssm": {"inner_dim": 100, "heads": 8}}, "ssm.inner_dim"),
    ({"ssm": {"heads": 3, "groups": 2, "inner_dim": 96}}, "ssm.heads"),
    ({"ssm": "big"}, "ssm"),
    ({"iso": "kv"}, "iso"),   # iso names how an iso_kv baseline was sized; other kinds have none
    ({"attention": "iso_kv", "kv_dim": 16, "iso": "bytes"}, "iso"),
]


@pytest.mark.parametrize("overrides, field", BAD_CONFIGS)
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ValueError) as err:
        ModelConfig(**overrides)
    message = str(err.value)
    assert message.startswith(field + " ") or f" {field} " in message or message.startswith(field), message
    assert "got" in message or "must" in message


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="size must be one of"):
        model_config("s7b")
    with pytest.raises(ValueError, match="unknown model field"):
        model_config("micro", chunk=4)


def test_ladder_is_increasing_and_micro_is_ci_sized():
    counts = [costs.param_count(model_config(name, vocab_size=32000), non_embedding=False) for name in PRESETS]
    assert counts == sorted(counts)
    assert costs.param_count(model_config("micro", vocab_size=256), non_embedding=False) < 1_000_000
    paper = costs.param_count(model_config("s60m", vocab_size=32000, attention="full"), non_embedding=False)
    assert 50e6 < paper < 70e6
    big = costs.param_count(model_config("s1_3b", vocab_size=32000, attention="full"), non_embedding=False)
    assert 1.1e9 < big < 1.6e9


@pytest.mark.parametrize("overrides", [
    {}, {"kv_proj": True}, {"tied_embeddings": True}, {"attention": "full"}, {"attention": "swa", "window": 8},
    {"attention": "iso_kv", "kv_dim": 16}, {"ssm": SSMConfig(state_dim=8, groups=2, heads=2, inner_dim=32)},
])
def test_param_count_matches_module(overrides):
    cfg = model_config("micro", vocab_size=97, **overrides)
    model = AttambaLM(cfg)
    assert costs.param_count(cfg, non_embedding=False) == model.num_params(non_embedding=False)
    assert costs.param_count(cfg) == model.num_params()


def test_iso_baselines_match_their_targets():
    cfg = model_config("small", vocab_size=256, chunk_size=8, leading_tokens=8)
    T = 1024
    iso_kv = costs.iso_kv_config(cfg, T)
    assert iso_kv.attention == "iso_kv" and iso_kv.kv_dim % (2 * cfg.n_heads) == 0
    # within one rounding step (2 * n_heads channels) of Attamba's cache
    step_bytes = 2 * T * 4 * cfg.n_layers * 2 * cfg.n_heads
    assert abs(costs.kv_cache_bytes(iso_kv, T) - costs.kv_cache_bytes(cfg, T)) <= step_bytes
    iso_flop = costs.iso_flop_config(cfg, T)
    a, b = (costs.attention_sublayer_flops_per_token(c, T) for c in (cfg, iso_flop))
    assert abs(a - b) / a < 0.15
    with pytest.raises(ValueError, match="attention must be attamba"):
        costs.iso_kv_config(iso_kv, T)


# ---- the shared field validators (attamba/checks.py) -----------------------------------------------------

def test_checks_name_the_field_the_requirement_the_value_and_the_fix():
    from attamba import checks

    cases = [
        (lambda: checks.integer("n", 2.0), "n must be an integer, got 2.0"),
        (lambda: checks.integer("n", True), "n must be an integer, got True"),
        (lambda: checks.integer("n", 0, 1), "n must be an integer >= 1, got 0"),
        (lambda: checks.integer("n", 9, 1, 8), "n must be an integer in [1, 8], got 9"),
        (lambda: checks.integer("n", 0, 1, or_none=True), "n must be None or an integer >= 1, got 0"),
        (lambda: checks.at_least("x", -1, 0), "x must be >= 0, got -1"),
        (lambda: checks.at_least("x", "a", 0), "x must be a number >= 0, got 'a'"),
        (lambda: checks.at_least("x", 1.5, 0, integer=True), "x must be an integer >= 0, got 1.5"),
        (lambda: checks.positive("x", 0, fix="try 1"), "x must be > 0, got 0; try 1"),
        (lambda: checks.positive("x", float("nan")), "x must be a number > 0, got nan"),
        (lambda: checks.positive("x", float("inf"), finite=True), "x must be a finite number > 0, got inf"),
        (lambda: checks.number("x", False), "x must be a number, got False"),
        (lambda: checks.in_range("f", 1, 0, 1, high_open=True), "f must be a number in [0, 1), got 1"),
        (lambda: checks.in_range("f", -0.5, 0.0, 1.0), "f must be a number in [0.0, 1.0], got -0.5"),
        (lambda: checks.one_of("m", "c", ("a", "b")), "m must be one of a, b, got 'c'"),
        (lambda: checks.one_of("z", True, (0, 1)), "z must be one of 0, 1, got True"),
        (lambda: checks.one_of("s", "c", ("a", "b"), what="size"), "s: unknown size 'c'; choose from a, b"),
        (lambda: checks.boolean("b", 1), "b must be true or false, got 1"),
        (lambda: checks.text("t", "  "), "t must be a non-empty string, got '  '"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == message


def test_checks_return_good_values_unchanged():
    import math

    import numpy as np

    from attamba import checks

    assert checks.integer("n", np.int64(3), 1) == 3
    assert checks.integer("n", None, 1, or_none=True) is None
    assert checks.at_least("x", math.inf, 0) == math.inf      # only finite=True refuses infinities
    assert checks.positive("x", 1e-9) == 1e-9
    assert checks.in_range("f", 0, 0, 1, high_open=True) == 0
    assert checks.one_of("z", 0, (0, 1)) == 0
    assert checks.text("t", None, or_none=True) is None
