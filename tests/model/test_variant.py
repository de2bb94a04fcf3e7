"""ModelConfig.variant(): the one variant identity, built from every field that matters for the kind."""

import dataclasses
import pytest

from attamba import costs
from attamba.checks import SAFE_NAME
from attamba.config import SIZE_FIELDS, ModelConfig, SSMConfig

ISO = {"attention": "iso_kv", "kv_dim": 32}

# One change per field that is not a size field: (the base it applies to, the change). Every field of
# ModelConfig and SSMConfig must appear here or in SIZE_FIELDS, so a new field cannot be left out of the label.
CHANGES = {
    "norm_eps": ({}, {"norm_eps": 1e-6}),
    "rope_theta": ({}, {"rope_theta": 500000.0}),
    "tied_embeddings": ({}, {"tied_embeddings": True}),
    "init_std": ({}, {"init_std": 0.01}),
    "attention": ({}, {"attention": "full"}),
    "chunk_size": ({}, {"chunk_size": 4}),
    "leading_tokens": ({}, {"leading_tokens": 32}),
    "boundaries": ({}, {"boundaries": "uniform"}),
    "boundary_seed": ({"boundaries": "random"}, {"boundary_seed": 7}),
    "kv_proj": ({}, {"kv_proj": True}),
    "ssm_residual": ({}, {"ssm_residual": False}),
    "pseudo_chunk": ({}, {"pseudo_chunk": True}),
    "ssm_segmentation": ({}, {"ssm_segmentation": "offset"}),
    "window": ({"attention": "swa"}, {"window": 33}),
    "kv_dim": (ISO, {"kv_dim": 48}),
    "iso": (ISO, {"iso": "flop"}),
    "sliding_window": (ISO, {"sliding_window": True}),
    "ssm.state_dim": ({}, {"state_dim": 16}),
    "ssm.inner_dim": ({}, {"inner_dim": 512}),
    "ssm.heads": ({}, {"heads": 4}),
    "ssm.groups": ({}, {"groups": 2}),
    "ssm.conv_width": ({}, {"conv_width": 2}),
    "ssm.scan_chunk": ({}, {"scan_chunk": 32}),
    "ssm.a_init_min": ({}, {"a_init_min": 2.0}),
    "ssm.a_init_max": ({}, {"a_init_max": 8.0}),
    "ssm.dt_min": ({}, {"dt_min": 0.0001}),
    "ssm.dt_max": ({}, {"dt_max": 0.05}),
    "ssm.dt_init_floor": ({}, {"dt_init_floor": 1e-5}),
    "ssm.dt_limit_min": ({}, {"dt_limit_min": 0.01}),
    "ssm.dt_limit_max": ({}, {"dt_limit_max": 4.0}),
}


def _build(base: dict, change: dict, name: str) -> ModelConfig:
    if name.startswith("ssm."):
        return ModelConfig(**base, ssm=SSMConfig(**change))
    return ModelConfig(**{**base, **change})


def test_every_field_is_either_a_size_or_part_of_the_identity():
    names = {f.name for f in dataclasses.fields(ModelConfig)} - {"ssm"}
    names |= {f"ssm.{f.name}" for f in dataclasses.fields(SSMConfig)}
    assert names == set(CHANGES) | set(SIZE_FIELDS), sorted(names ^ (set(CHANGES) | set(SIZE_FIELDS)))


@pytest.mark.parametrize("name", sorted(CHANGES))
def test_changing_any_non_size_field_changes_the_label(name):
    base, change = CHANGES[name]
    before, after = ModelConfig(**base).variant(), _build(base, change, name).variant()
    assert after != before, (name, after)
    assert SAFE_NAME.fullmatch(after), after   # a folder name


def test_a_windowed_iso_kv_label_says_its_window():
    windowed = ModelConfig(**ISO, sliding_window=True, window=9)
    assert windowed.variant() == "iso_kv-F32-W9"
    assert dataclasses.replace(windowed, window=17).variant() == "iso_kv-F32-W17"
    assert ModelConfig(**ISO, iso="flop", sliding_window=True, window=9).variant() == "iso_flop-F32-W9"


def test_labels_of_all_changes_are_distinct():
    labels = [_build(*CHANGES[name], name).variant() for name in CHANGES]
    assert len(set(labels)) == len(labels), sorted(labels)


@pytest.mark.parametrize("name", SIZE_FIELDS)
def test_size_fields_are_not_part_of_the_label(name):
    change = {"vocab_size": 100, "dim": 256, "n_layers": 2, "n_heads": 4, "head_dim": 64, "ffn_dim": 128,
              "max_seq_len": 64, "seed": 3}[name]
    base = {"n_heads": 4} if name == "head_dim" else {}
    attention = {"attention": "full"} if name == "head_dim" else {}   # attamba needs head_dim = dim / n_heads
    assert ModelConfig(**base, **attention, **{name: change}).variant() == ModelConfig(**base, **attention).variant()


def test_core_labels_and_suffixes_read_as_documented():
    assert ModelConfig().variant() == "attamba-P8-L8-cyclic"
    assert ModelConfig(attention="full").variant() == "full"
    assert ModelConfig(attention="swa", window=33).variant() == "swa-W33"
    assert ModelConfig(attention="iso_kv", kv_dim=32).variant() == "iso_kv-F32"
    assert ModelConfig(attention="iso_kv", kv_dim=32, iso="kv").variant() == "iso_kv-F32"
    assert ModelConfig(attention="iso_kv", kv_dim=48, iso="flop").variant() == "iso_flop-F48"
    label = ModelConfig(chunk_size=4, ssm_segmentation="offset", kv_proj=True, ssm_residual=False,
                        pseudo_chunk=True, ssm=SSMConfig(state_dim=16), rope_theta=500000.0).variant()
    assert label == ("attamba-P4-L8-cyclic-rope_theta500000-kv_proj-no_ssm_residual-pseudo_chunk-seg_offset"
                     "-ssm.state_dim16")


def test_fields_a_kind_ignores_do_not_split_it():
    # a transformer ignores every Attamba field; the SSM widths count only off their default rule
    assert ModelConfig(attention="full", chunk_size=4, kv_proj=True, ssm=SSMConfig(state_dim=8)).variant() == "full"
    assert ModelConfig(attention="swa", window=5, leading_tokens=64).variant() == "swa-W5"
    assert ModelConfig(window=5, kv_dim=None).variant() == "attamba-P8-L8-cyclic"
    assert ModelConfig(boundary_seed=3).variant() == "attamba-P8-L8-cyclic"   # seeds random boundaries only
    assert ModelConfig(dim=64, n_heads=2).ssm.inner_dim == 32
    assert ModelConfig(dim=64, n_heads=2).variant() == ModelConfig(dim=64, n_heads=2, ssm={"inner_dim": 32}).variant()
    assert ModelConfig(dim=64, n_heads=2, ssm={"inner_dim": 64}).variant().endswith("-ssm.inner_dim64")


def test_kind_names_the_iso_sizing_and_the_cost_solvers_set_it():
    attamba = ModelConfig(dim=128, n_heads=4, n_layers=2, chunk_size=8, leading_tokens=8)
    kv, flop = costs.iso_kv_config(attamba, 256), costs.iso_flop_config(attamba, 256)
    assert (kv.attention, kv.iso, kv.kind) == ("iso_kv", "kv", "iso_kv")
    assert (flop.attention, flop.iso, flop.kind) == ("iso_kv", "flop", "iso_flop")
    assert kv.variant() == f"iso_kv-F{kv.kv_dim}" and flop.variant() == f"iso_flop-F{flop.kv_dim}"
    assert ModelConfig(attention="iso_kv", kv_dim=32, iso="param").kind == "iso_param"
    assert [ModelConfig(attention=a, kv_dim=32 if a == "iso_kv" else None).kind
            for a in ("attamba", "full", "swa", "iso_kv")] == ["attamba", "full", "swa", "iso_kv"]
