"""The tags a run gives its MLflow run: the variant is ModelConfig.variant(), the kind tells iso baselines apart."""

import pytest

from attamba import costs
from pipeline import schema
from pipeline.config import run_config_from_dict
from pipeline.train.run_tracking import run_tags


def _tags(**model):
    return run_tags(run_config_from_dict({"size": "micro", "model": model}))


@pytest.mark.parametrize("model, variant", [
    ({}, None),
    ({"ssm_segmentation": "offset"}, "-seg_offset"),
    ({"kv_proj": True}, "-kv_proj"),
    ({"ssm_residual": False}, "-no_ssm_residual"),
    ({"pseudo_chunk": True}, "-pseudo_chunk"),
    ({"ssm": {"state_dim": 16}}, "-ssm.state_dim16"),
])
def test_the_variant_tag_is_the_model_identity_with_every_suffix(model, variant):
    tags = _tags(**model)
    cfg = run_config_from_dict({"size": "micro", "model": model})
    assert tags[schema.TAG_VARIANT] == cfg.model.variant()
    assert (variant is None) == (tags[schema.TAG_VARIANT] == f"attamba-P{cfg.model.chunk_size}-L"
                                                              f"{cfg.model.leading_tokens}-{cfg.model.boundaries}")
    assert variant is None or tags[schema.TAG_VARIANT].endswith(variant)
    assert tags[schema.TAG_KIND] == "attamba"
    assert tags[schema.TAG_SEGMENTATION] == model.get("ssm_segmentation", "chunk")


def test_kind_and_segmentation_tags_of_baselines():
    attamba = run_config_from_dict({"size": "micro"}).model
    flop = costs.iso_flop_config(attamba, 64)
    kv = costs.iso_kv_config(attamba, 64)
    for model, kind in ((flop, "iso_flop"), (kv, "iso_kv"), ({"attention": "full"}, "full"),
                        ({"attention": "swa", "window": 5}, "swa")):
        fields = model if isinstance(model, dict) else {"attention": "iso_kv", "kv_dim": model.kv_dim, "iso": model.iso}
        tags = _tags(**fields)
        assert tags[schema.TAG_KIND] == kind and tags[schema.TAG_SEGMENTATION] == ""
        assert tags[schema.TAG_VARIANT].startswith(kind)
