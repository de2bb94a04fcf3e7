"""configs/studies/gpu_smoke.yaml: the one-GPU study that scripts/gpu_check.sh runs. Checked here without a
GPU: it loads, expands to the two runs the issue asks for, and its two trials fit one GPU at once."""

from __future__ import annotations

from pathlib import Path

from pipeline.runs.resources import check_resources, trial_slots
from pipeline.study.spec import expand, load_study
from tests.helpers import REPO_ROOT

STUDY = REPO_ROOT / "configs" / "studies" / "gpu_smoke.yaml"


def test_gpu_smoke_expands_to_a_transformer_and_attamba_on_s60m_in_bf16():
    study = load_study(STUDY)
    specs = expand(study)
    kinds = sorted(spec.config.model.attention for spec in specs)
    assert kinds == ["attamba", "full"]
    for spec in specs:
        cfg = spec.config
        assert spec.size == "s60m" and (cfg.model.dim, cfg.model.n_layers) == (512, 8)
        assert cfg.data.seq_len == 2048 and cfg.model.max_seq_len >= 2048 and cfg.data.source == "bundled"
        assert cfg.train.precision == "bf16" and cfg.train.device == "cuda"
        assert 100 <= cfg.train.steps <= 1000  # a few hundred steps
        if cfg.model.attention == "attamba":
            model = cfg.model
            assert (model.chunk_size, model.leading_tokens, model.boundaries) == (8, 32, "cyclic")


def test_gpu_smoke_trials_share_one_gpu():
    resources = load_study(STUDY).resources
    one_gpu = {"CPU": 16.0, "GPU": 1.0}
    check_resources(resources, one_gpu)
    assert 0 < resources.gpus_per_worker <= 0.5
    assert trial_slots(resources, one_gpu) == 2


def test_gpu_smoke_out_dir_can_be_overridden():
    study = load_study(STUDY, ["out_dir=/tmp/elsewhere"])
    assert all(str(spec.out_dir).startswith("/tmp/elsewhere/gpu_smoke/") for spec in expand(study))
