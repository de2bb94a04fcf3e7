"""The study grid: any model field as an axis, unions of grids with their own sizes, iso baselines per Attamba
variant, one variant identity in names and tags, and every bad entry refused before any model is built."""

from __future__ import annotations

import pytest

from attamba import costs
from pipeline import schema
from pipeline.study.spec import expand, load_study
from pipeline.train.run_tracking import run_tags
from tests.pipeline.study.test_study import _study_file

EXAMPLE = {"attamba": {"chunk_size": [4, 8], "ssm_segmentation": ["chunk", "offset"], "kv_proj": [False, True]},
           "baselines": ["full", "iso_flop"]}


def _specs(tmp_path, overrides=(), **changes):
    return expand(load_study(_study_file(tmp_path, **changes), list(overrides)))


def test_the_ablation_example_gives_distinct_variants_names_and_tags(tmp_path):
    specs = _specs(tmp_path, **EXAMPLE)
    attamba = [s for s in specs if s.config.model.attention == "attamba"]
    assert len(attamba) == 8
    assert {(s.config.model.chunk_size, s.config.model.ssm_segmentation, s.config.model.kv_proj)
            for s in attamba} == {(p, g, k) for p in (4, 8) for g in ("chunk", "offset") for k in (False, True)}
    expected_iso = {costs.iso_flop_config(s.config.model, s.config.data.seq_len).variant() for s in attamba}
    iso = [s for s in specs if s.config.model.kind == "iso_flop"]
    assert {s.variant for s in iso} == expected_iso and len(iso) == len(expected_iso)   # each distinct one once
    assert len(specs) == 8 + 1 + len(expected_iso)
    for collection in ([s.name for s in specs], [s.variant for s in specs],
                       [s.config.tracking.run_name for s in specs]):
        assert len(set(collection)) == len(specs), collection
    tags = [run_tags(s.config) for s in specs]
    assert len({t[schema.TAG_VARIANT] for t in tags}) == len(specs)   # no two models merge in the report
    for spec, tag in zip(specs, tags):
        model = spec.config.model
        assert spec.variant == model.variant() == tag[schema.TAG_VARIANT] == spec.name.split("__")[1]
        assert tag[schema.TAG_KIND] == model.kind
        assert tag[schema.TAG_SEGMENTATION] == (model.ssm_segmentation if model.attention == "attamba" else "")
        if model.attention == "attamba":
            assert ("-seg_offset" in spec.name) == (model.ssm_segmentation == "offset")
            assert ("-kv_proj" in spec.name) == model.kv_proj
            shown = spec.config.tracking.run_name   # the display name shows every axis that varies
            assert ("-segoff-" in shown) == (model.ssm_segmentation == "offset")
            assert ("-kvp-" in shown) == model.kv_proj and ("-nokvp-" in shown) == (not model.kv_proj)
    assert {t[schema.TAG_KIND] for t in tags} == {"attamba", "full", "iso_flop"}   # never iso_kv
    # each Attamba run names the iso-FLOP run of the study sized from it, which the report pairs it with
    assert {t[schema.TAG_MATCH["iso_flop"]] for s, t in zip(specs, tags) if s.config.model.kind == "attamba"} == {
        s.variant for s in iso}
    assert all(s.config.model.iso == "flop" for s in iso)


def test_a_nested_ssm_axis_and_a_scalar_value(tmp_path):
    specs = _specs(tmp_path, attamba={"chunk_size": 4, "leading_tokens": [4], "ssm.state_dim": [8, 16]},
                   baselines=[])
    assert [s.config.model.ssm.state_dim for s in specs] == [8, 16]
    assert [s.variant for s in specs] == ["attamba-P4-L4-cyclic-ssm.state_dim8", "attamba-P4-L4-cyclic-ssm.state_dim16"]
    assert [s.config.tracking.run_name for s in specs] == ["micro-P4-L4-N8-s0", "micro-P4-L4-N16-s0"]
    # an SSM width set by the grid re-derives what follows from it (heads = inner_dim // 32)
    specs = _specs(tmp_path, attamba={"ssm.inner_dim": [64, 96]}, baselines=[])
    assert [(s.config.model.ssm.heads, s.variant) for s in specs] == [
        (2, "attamba-P4-L4-cyclic-ssm.inner_dim64"), (3, "attamba-P4-L4-cyclic-ssm.inner_dim96")]


def test_a_list_of_grids_is_the_union_with_per_grid_sizes(tmp_path):
    grids = [{"chunk_size": [4, 8], "leading_tokens": [4]},
             {"chunk_size": [4], "leading_tokens": [4], "kv_proj": [False, True], "sizes": ["micro"]}]
    specs = _specs(tmp_path, sizes=["micro", "tiny"], attamba=grids, baselines=["full", {"kind": "swa", "window": [3, 9],
                                                                                      "sizes": ["tiny"]}])
    by_size = {size: sorted(s.variant for s in specs if s.size == size) for size in ("micro", "tiny")}
    # the second grid's kv_proj=false point is the first grid's P4 model: it runs once
    assert by_size["micro"] == ["attamba-P4-L4-cyclic", "attamba-P4-L4-cyclic-kv_proj", "attamba-P8-L4-cyclic", "full"]
    assert by_size["tiny"] == ["attamba-P4-L4-cyclic", "attamba-P8-L4-cyclic", "full", "swa-W3", "swa-W9"]


def test_swa_keeps_its_default_window_and_iso_kv_is_its_own_kind(tmp_path):
    specs = _specs(tmp_path, attamba={"chunk_size": [4], "leading_tokens": [4, 16]}, baselines=["swa", "iso_kv"])
    assert [s.variant for s in specs if s.config.model.attention == "swa"] == ["swa-W17"]
    assert {s.config.model.kind for s in specs if s.config.model.attention == "iso_kv"} == {"iso_kv"}


def test_an_iso_baseline_of_selects_the_attamba_variants_it_is_sized_from(tmp_path):
    grids = [{"chunk_size": [4, 8], "leading_tokens": [4]}, {"chunk_size": [8], "leading_tokens": [1, 16]}]
    of = {"leading_tokens": [4]}
    specs = _specs(tmp_path, attamba=grids, baselines=[{"kind": "iso_kv", "of": of}, {"kind": "iso_flop"}])
    attamba = [s.config for s in specs if s.config.model.attention == "attamba"]
    sized = lambda solver, runs: {solver(c.model, c.data.seq_len).variant() for c in runs}
    assert {s.variant for s in specs if s.config.model.kind == "iso_kv"} == sized(
        costs.iso_kv_config, [c for c in attamba if c.model.leading_tokens == 4])
    assert {s.variant for s in specs if s.config.model.kind == "iso_flop"} == sized(costs.iso_flop_config, attamba)
    # an `of` that matches no Attamba variant is refused, naming its path
    with pytest.raises(ValueError, match=r"baselines\[0\]\.of.*match at least one Attamba variant"):
        _specs(tmp_path, attamba=grids, baselines=[{"kind": "iso_kv", "of": {"leading_tokens": [7]}}])
    with pytest.raises(ValueError, match=r"baselines\[0\]\.of\.leading_token.*did you mean 'leading_tokens'"):
        _specs(tmp_path, attamba=grids, baselines=[{"kind": "iso_kv", "of": {"leading_token": [4]}}])


def test_the_study_eval_section_goes_over_every_runs_eval(tmp_path):
    specs = _specs(tmp_path, eval={"batches": 3})
    assert specs and all(s.config.eval.batches == 3 for s in specs)
    with pytest.raises(ValueError, match="eval"):
        _specs(tmp_path, eval=[1])


def test_full_transformers_are_also_scored_through_each_attamba_window_and_40_keys(tmp_path):
    """Every full transformer gets {window: L + 1} for each Attamba L of the study (at any size) and {window: 40},
    once each, after the study's own variants; windows of seq_len keys or more (the whole context) and other
    kinds are left alone."""
    grids = [{"chunk_size": [4], "leading_tokens": [4, 8]}, {"chunk_size": [8], "leading_tokens": [63]}]
    specs = _specs(tmp_path, attamba=grids, baselines=["full", "swa", "iso_kv"],
                   eval={"variants": [{"window": 9}, {"chunk_size": 16}]})
    assert specs[0].config.data.seq_len == 64
    for s in specs:
        variants = list(s.config.eval.variants)
        if s.config.model.attention == "full":
            # 9 = 8 + 1 is the study's own; 64 = 63 + 1 is the whole context
            assert variants == [{"window": 9}, {"chunk_size": 16}, {"window": 5}, {"window": 40}], s.name
        else:
            assert variants == [{"window": 9}, {"chunk_size": 16}], s.name
    assert {s.config.model.attention for s in specs} == {"full", "swa", "attamba", "iso_kv"}


def test_the_shipped_studies_keep_the_quickstart_names():
    from tests.helpers import REPO_ROOT

    names = {s.name for s in expand(load_study(REPO_ROOT / "configs" / "studies" / "quickstart.yaml"))}
    assert {f"tiny__{v}__s{seed}__D614400" for v in ("full", "attamba-P4-L16-cyclic", "attamba-P8-L16-cyclic")
            for seed in range(4)} == names


@pytest.mark.parametrize("change, words", [
    ({"attamba": {"chunk_sise": [4]}}, ["attamba.chunk_sise", "unknown model field", "did you mean 'chunk_size'"]),
    ({"attamba": [{"chunk_size": [4]}, {"ssm.state_dimm": [16]}]}, ["attamba[1].ssm.state_dimm", "'ssm.state_dim'"]),
    ({"attamba": {"chunk_size": {"four": 4}}}, ["attamba.chunk_size", "a list of values"]),
    ({"attamba": {"chunk_size": []}}, ["attamba.chunk_size", "non-empty list"]),
    ({"attamba": [{"chunk_size": [4]}, {"ssm.state_dim": [16, 0]}]}, ["attamba[1].ssm.state_dim[1]=0", "grid point", ">= 1"]),
    ({"attamba": {"ssm_segmentation": ["chunk", "segment"]}}, ["attamba.ssm_segmentation[1]='segment'", "chunk, offset"]),
    ({"attamba": {"kv_proj": ["yes"]}}, ["attamba.kv_proj[0]='yes'", "true or false"]),
    ({"attamba": {"chunk_size": [4], "sizes": ["tiny"]}}, ["attamba.sizes[0]", "'tiny'", "study's sizes"]),
    ({"attamba": {"dim": [64]}}, ["attamba.dim", "size field"]),
    ({"attamba": {"window": [5]}}, ["attamba.window", "does not read window"]),
    ({"attamba": 4}, ["attamba", "mapping"]),
    ({"baselines": ["ful"]}, ["baselines", "'ful'", "full"]),
    ({"baselines": ["full", "swaa"]}, ["baselines[1]: unknown baseline 'swaa'", "swa"]),
    ({"baselines": [{"kind": "swaa"}]}, ["baselines[0].kind: unknown baseline 'swaa'", "swa"]),
    ({"baselines": [{"window": [5]}]}, ["baselines[0]", "kind"]),
    ({"baselines": [{"kind": "full", "chunk_size": [4]}]}, ["baselines[0].chunk_size", "does not read chunk_size"]),
    ({"baselines": [{"kind": "swa", "window": [0]}]}, ["baselines[0].window[0]=0", ">= 1"]),
    ({"baselines": [{"kind": "iso_flop", "kv_dim": [16]}]}, ["baselines[0].kv_dim", "solve"]),
    ({"baselines": [{"kind": "full", "sizes": ["huge"]}]}, ["baselines[0].sizes[0]", "'huge'"]),
])
def test_bad_grids_fail_before_any_trial_naming_the_path(tmp_path, change, words):
    from pipeline.study.driver import run_study

    with pytest.raises(ValueError) as info:
        run_study(_study_file(tmp_path, **change), address="127.0.0.1:1")   # would fail to connect
    for word in words:
        assert word in str(info.value), str(info.value)
    assert not (tmp_path / "studies").exists()


def test_the_ablation_example_keeps_its_variants_apart_in_the_report(tmp_path):
    """The example study's runs, logged to a real MLflow store with the tags and cost metrics training logs
    (run_tags, cost_metrics) and a final evaluation, give one report row per variant (no two models merged
    as seeds of one), and the iso-KV comparison never takes one of its iso-FLOP runs."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    from pipeline.report import make_report
    from pipeline.train.run_tracking import cost_metrics
    from tests.pipeline.report.test_report import _md_section

    specs = _specs(tmp_path, seeds=[0, 1], **EXAMPLE)
    uri = f"sqlite:///{tmp_path / 'report.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("ablation", artifact_location=str(tmp_path / "artifacts"))
    for i, spec in enumerate(specs):
        run_id = client.create_run(exp_id, run_name=spec.config.tracking.run_name).info.run_id
        tags = {**run_tags(spec.config), schema.TAG_STATUS: "finished", schema.TAG_STUDY: "ablation"}
        loss = 3.0 + 0.01 * (i % 7) + 0.001 * spec.seed
        metrics = [Metric(k, v, 0, 0) for k, v in cost_metrics(spec.config, 1).items()]
        metrics += [Metric(schema.M_VAL_LOSS, loss, 0, 1), Metric(schema.M_VAL_PPL, 2.718281828 ** loss, 0, 1)]
        client.log_batch(run_id, metrics=metrics, tags=[RunTag(k, v) for k, v in tags.items()])
        client.set_terminated(run_id, "FINISHED")
    out = tmp_path / "report"
    make_report("ablation", out, tracking_uri=uri, n_bootstrap=0)
    md = (out / "summary.md").read_text()
    best = _md_section(md, "Best run per variant")
    assert sorted(r["variant"] for r in best) == sorted({s.variant for s in specs})
    assert all(r["runs"] == "2" for r in best)   # the two seeds of each variant, nothing more
    assert "no iso-KV baseline in this study" in md.split("## Iso-KV comparison", 1)[1].split("\n## ", 1)[0]
    flop = _md_section(md, "Iso-FLOP comparison (the iso-FLOP baseline sized from each Attamba, same size)")
    attamba = {s.variant: s.config for s in specs if s.config.model.kind == "attamba"}
    assert {r["variant"]: r["reference"] for r in flop} == {
        v: costs.iso_flop_config(c.model, c.data.seq_len).variant() for v, c in attamba.items()}


def test_seq_lens_run_each_size_at_each_length_as_its_own_setting(tmp_path):
    specs = _specs(tmp_path, seq_lens=[16, 32], baselines=["full", "iso_kv"])
    lengths = {s.config.data.seq_len for s in specs}
    assert lengths == {16, 32}
    for spec in specs:
        T = spec.config.data.seq_len
        assert spec.name.startswith(f"{spec.size}__T{T}__") and f"-T{T}-" in spec.config.tracking.run_name
        assert spec.config.model.max_seq_len >= T
        if spec.config.model.kind == "iso_kv":   # sized from the Attamba of its own length
            att = next(s for s in specs if s.config.model.attention == "attamba" and s.config.data.seq_len == T)
            assert spec.variant == costs.iso_kv_config(att.config.model, T).variant()
    per_length = {T: sorted(s.variant for s in specs if s.config.data.seq_len == T) for T in lengths}
    assert len(per_length[16]) == len(per_length[32]) and len({s.name for s in specs}) == len(specs)
    # the same token budget gives the longer sequences half the steps
    steps = {s.config.data.seq_len: s.config.train.steps for s in specs if s.variant == "full"}
    assert steps[16] == 2 * steps[32]


def test_a_steps_budget_gives_every_run_the_same_steps(tmp_path):
    specs = _specs(tmp_path, seq_lens=[16, 32], tokens={"rule": "steps", "steps": 7})
    assert {s.config.train.steps for s in specs} == {7}
    assert {s.tokens for s in specs} == {7 * s.config.train.batch_size * s.config.data.seq_len for s in specs}


@pytest.mark.parametrize("changes, message", [
    ({"seq_lens": [16, 16]}, r"seq_lens must be distinct, got \[16, 16\]"),
    ({"seq_lens": [1]}, r"seq_lens\[0\] must be .*2.*got 1"),
    ({"tokens": {"rule": "steps"}}, r"tokens.steps must be an integer >= 1 with tokens.rule=steps"),
    ({"tokens": {"rule": "fixed", "steps": 5}}, r"tokens.steps must be left out with tokens.rule=fixed, got 5"),
])
def test_bad_lengths_and_steps_budgets_are_refused(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        _specs(tmp_path, **changes)


def test_seq_lens_per_size_give_each_size_its_own_lengths(tmp_path):
    specs = _specs(tmp_path, sizes=["micro", "tiny"], seq_lens={"micro": [16], "tiny": [16, 32]})
    assert sorted({(s.size, s.config.data.seq_len) for s in specs}) == [("micro", 16), ("tiny", 16), ("tiny", 32)]
    assert all(s.name.startswith(f"{s.size}__T{s.config.data.seq_len}__") for s in specs)


@pytest.mark.parametrize("seq_lens, message", [
    ({"micro": [16]}, r"seq_lens must be lengths for every size \(missing: tiny\)"),
    ({"micro": [16], "tiny": [16], "small": [8]}, r"seq_lens.small must be under one of the study's sizes"),
    ({"micro": [], "tiny": [16]}, r"seq_lens.micro must be a non-empty list"),
    ({"micro": [16, 16], "tiny": [16]}, r"seq_lens.micro must be distinct"),
    (64, r"seq_lens must be a list of sequence lengths, or a mapping size -> list"),
])
def test_bad_per_size_lengths_are_refused(tmp_path, seq_lens, message):
    with pytest.raises(ValueError, match=message):
        _specs(tmp_path, sizes=["micro", "tiny"], seq_lens=seq_lens)


def test_a_grid_may_run_at_some_of_the_study_lengths_only(tmp_path):
    specs = _specs(tmp_path, seq_lens=[16, 32], baselines=["full"],
                   attamba=[{"chunk_size": [2, 4], "leading_tokens": [4]},
                            {"chunk_size": [8], "leading_tokens": [4], "seq_lens": [16]}])
    got = sorted((s.config.data.seq_len, s.variant) for s in specs)
    assert (16, "attamba-P8-L4-cyclic") in got and (32, "attamba-P8-L4-cyclic") not in got
    assert (32, "attamba-P4-L4-cyclic") in got and (32, "full") in got
    with pytest.raises(ValueError, match=r"attamba\[1\]\.seq_lens\[0\] must be one of the study's seq_lens"):
        _specs(tmp_path, seq_lens=[16, 32], attamba=[{"chunk_size": [2]}, {"chunk_size": [8], "seq_lens": [64]}])
