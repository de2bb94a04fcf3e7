"""The `data.source: mqar` source (pipeline/data/mqar_source.py): no files, the model's vocabulary, a training
stream that is a pure function of (seed, position, rank), fixed evaluation sets, and its config errors."""

import pytest
import torch

from pipeline.config import load_run_config
from pipeline.data.mqar import IGNORE
from pipeline.data.mqar_source import MQARConfig, MQARData
from pipeline.data.prepare import DataConfig, prepare


def _data(tmp_path, **mqar):
    return prepare(DataConfig(source="mqar", seq_len=32, seed=3, cache_dir=str(tmp_path / "cache"),
                              mqar=MQARConfig(**{"pairs": 4, "vocab_size": 64, "val_examples": 40, **mqar})))


def test_source_needs_no_files_and_sets_the_vocabulary(tmp_path):
    data = _data(tmp_path)
    assert isinstance(data, MQARData) and data.vocab_size == 64 and data.seq_len == 32 and data.tokenizer is None
    assert not (tmp_path / "cache").exists()           # nothing read, nothing cached
    assert data.meta["corpus"] == _data(tmp_path).meta["corpus"]
    assert data.meta["corpus"] != _data(tmp_path, power_a=0.5).meta["corpus"]


def test_training_batch_is_a_pure_function_of_seed_position_and_rank(tmp_path):
    data = _data(tmp_path)
    run = data.batches("train", batch_size=8, rank=1, world_size=2)
    seen = [next(run) for _ in range(5)]
    assert run.position == 5 and run.state_dict() == {"position": 5, "seed": 3, "batch_size": 8, "world_size": 2}
    inputs, targets = seen[0]
    assert inputs.shape == targets.shape == (8, 32) and ((targets != IGNORE).sum(1) == 4).all()
    resumed = data.batches("train", batch_size=8, rank=1, world_size=2, start=3)
    for step in (3, 4):
        assert all(torch.equal(a, b) for a, b in zip(next(resumed), seen[step]))
    other_rank = data.batches("train", batch_size=8, rank=0, world_size=2)
    assert not torch.equal(next(other_rank)[0], seen[0][0])
    reseeded = data.batches("train", batch_size=8, rank=1, world_size=2, seed=4)
    assert not torch.equal(next(reseeded)[0], seen[0][0])
    assert len({tuple(x.flatten().tolist()) for x, _ in seen}) == 5     # fresh sequences every step
    with pytest.raises(ValueError, match="rank must be an integer in"):
        data.batches("train", batch_size=8, rank=2, world_size=2)


def test_validation_and_test_sets_are_fixed_and_apart_from_training(tmp_path):
    data = _data(tmp_path)
    val = data.examples("validation")
    assert val.inputs.shape == (40, 32)
    assert all(torch.equal(a, b) for a, b in zip(val, _data(tmp_path).examples("validation")))
    rows = {tuple(r) for r in val.inputs.tolist()}
    assert not rows & {tuple(r) for r in data.examples("test").inputs.tolist()}
    train = data.batches("train", batch_size=40)
    assert not rows & {tuple(r) for _ in range(20) for r in next(train)[0].tolist()}
    with pytest.raises(ValueError, match="'validation' or 'test'"):
        data.examples("train")


@pytest.mark.parametrize("overrides, message", [
    (["data.mqar.pairs=0"], "data.mqar.pairs must be an integer >= 1, got 0"),
    (["data.mqar.pairs=20"], "data.seq_len must be >= 80 for MQAR with data.mqar.pairs=20"),
    (["data.mqar.vocab_size=9"], "data.mqar.vocab_size must be >= 10 for MQAR with data.mqar.pairs=4"),
    (["data.mqar.power_a=-1"], "data.mqar.power_a must be > 0, got -1"),
    (["data.mqar.val_examples=0"], "data.mqar.val_examples must be >= 1"),
    (["data.mqar.pair=4"], "unknown config key.*data.mqar.pair"),
    (["data.source=bundled"], "data.mqar must be left out with source='bundled'"),
    (["eval.paper_metric=true"], "eval.paper_metric must be false with data.source=mqar"),
])
def test_bad_mqar_configs_fail_in_one_line_naming_the_field(overrides, message):
    base = ["data.source=mqar", "data.seq_len=64", "model.max_seq_len=64", "data.mqar.vocab_size=64"]
    with pytest.raises(ValueError, match=message) as error:
        load_run_config(None, base + overrides)
    assert "\n" not in str(error.value)


def test_the_probe_refuses_lengths_too_short_for_its_pairs():
    with pytest.raises(ValueError, match=r"eval.mqar_lengths\[1\] must be >= 32, got 16"):
        load_run_config(None, ["eval.mqar_lengths=[64, 16]", "eval.mqar_pairs=8"])
