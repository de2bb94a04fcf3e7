"""Checkpoints on a real DeepSpeed engine (CPU): how many are kept, a damaged newest one passed over for the
previous one, and the resume checks on the data and the step count."""

import json
import logging
import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch

from pipeline import schema
from pipeline.config import load_run_config
from pipeline import checkpoints
from pipeline.train.engine import free_port
from pipeline.train.loop import StopTraining, train
from tests.pipeline.train.runs import child_env, losses, rows, tiny


def folders(out_dir) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (out_dir / "checkpoints").iterdir())


def test_keep_last_keeps_the_newest_two_and_the_milestones(env):
    common = ["train.steps=10", "train.ckpt_every=2", "train.eval_every=0"]
    leftover = env / "last" / "checkpoints" / "step_00000001"   # an interrupted save of an earlier attempt
    leftover.mkdir(parents=True)
    (leftover / "mp_rank_00_model_states.pt").write_bytes(b"cut off")
    train(load_run_config(None, tiny(env / "last", *common)))    # saves at 2, 4, 6, 8, 10; keep_last=2
    assert folders(env / "last") == [8, 10]
    train(load_run_config(None, tiny(env / "mile", *common, "train.keep_steps=[4]")))
    assert folders(env / "mile") == [4, 8, 10]
    train(load_run_config(None, tiny(env / "all", *common, "train.keep_last=0")))
    assert folders(env / "all") == [2, 4, 6, 8, 10]
    for out in ("last", "mile", "all"):
        for step in folders(env / out):
            assert checkpoints.verify(env / out / "checkpoints" / checkpoints.step_tag(step))["step"] == step


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(env, caplog):
    cfg = load_run_config(None, tiny(env / "run", "train.steps=6", "train.ckpt_every=2", "train.eval_every=0"))
    first = train(cfg)
    before = losses(env / "run")
    newest = env / "run" / "checkpoints" / "step_00000006"
    shard = newest / "mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])   # a save cut by a power loss
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoints"):
        again = train(cfg)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "passing over damaged checkpoint" in warned and str(newest) in warned
    assert "resuming from" in warned and "step_00000004" in warned
    # steps 5 and 6 were trained again from step 4, exactly as the first time
    assert again["step"] == 6 and again["start_step"] == 4
    assert [r["step"] for r in rows(env / "run")] == [1, 2, 3, 4, 5, 6]
    for step in (5, 6):
        assert losses(env / "run")[step] == pytest.approx(before[step], abs=1e-6, rel=0)
    assert again[schema.M_VAL_LOSS] == pytest.approx(first[schema.M_VAL_LOSS], abs=1e-6, rel=0)
    assert checkpoints.verify(newest)["step"] == 6   # the damaged folder was replaced by a sound one


def _write_corpus(folder, seed, n_docs=30):
    rng = random.Random(seed)
    words = "the a of to and in that it is was he for on are as with his they at be this from have".split()
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (folder / f"doc{seed}_{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(400)))


def _bpe_file(path, seed):
    from pipeline.data.tokenizer import train_bpe

    rng = random.Random(seed)
    text = ["".join(rng.choice("abcdefgh ") for _ in range(2000)) for _ in range(20)]
    train_bpe(text, 300).save(str(path))


@pytest.mark.parametrize("change", ["corpus", "tokenizer"])
def test_changed_data_under_a_checkpoint_is_refused(env, change):
    corpus = env / "corpus"
    _write_corpus(corpus, 0)
    tokenizer = env / "tokenizer.json"
    _bpe_file(tokenizer, 0)
    cfg = load_run_config(None, tiny(env / "run", "train.steps=2", "train.ckpt_every=2", "train.eval_every=0",
                                     f"data.source={corpus}", f"data.tokenizer={tokenizer}"))
    train(cfg)
    assert train(cfg)["step"] == 2            # the same data resumes (here: at the end)
    if change == "corpus":
        _write_corpus(corpus, 1, n_docs=5)    # new files in the source folder
        expected = "corpus hash: "
    else:
        _bpe_file(tokenizer, 1)               # same path, same vocabulary size, other merges
        expected = "tokenizer fingerprint: "
    with pytest.raises(ValueError, match=f"trained on other data than data.source='{corpus}'") as error:
        train(cfg)
    assert expected in str(error.value) and " -> " in str(error.value) and "train.out_dir" in str(error.value)
    assert "--restart" in str(error.value)


def test_a_changed_config_is_refused_naming_each_field_and_restart_starts_the_folder_over(env, capsys):
    from pipeline.cli import build_parser, main
    from tests.pipeline.tracking.mlflow_runs import assert_one_run_per_folder

    out = env / "run"
    base = tiny(out, "train.steps=4", "train.ckpt_every=2", "train.eval_every=0", "tracking.enabled=true")
    first = train(load_run_config(None, base))
    changed = [*base, "model.leading_tokens=2", "optim.lr=0.001"]
    with pytest.raises(ValueError) as error:
        train(load_run_config(None, changed))
    text = str(error.value)
    assert "model.leading_tokens: 4 -> 2" in text and "optim.lr: 0.005 -> 0.001" in text
    assert "model.chunk_size" not in text and "--restart" in text and "\n" not in text
    # the CLI says it in one line, exit 2, before any training; --restart is one of its options
    config = env / "run.yaml"
    config.write_text("name: run\n")
    assert main(["train", str(config), *changed]) == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("attamba")]   # MLflow logs its own lines
    assert line.startswith("attamba train: error: checkpoint") and "model.leading_tokens: 4 -> 2" in line
    assert "Traceback" not in err
    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["train"].format_help().split())
    assert "--restart" in help_text and "start the run folder over" in help_text
    # restart: the earlier attempt moves aside (with its checkpoints, metrics and journals) and keeps its
    # MLflow run; the folder trains from step 0 into a new one
    again = train(load_run_config(None, changed), restart=True)
    assert again["start_step"] == 0 and again["step"] == 4 and again["run_id"] != first["run_id"]
    (moved,) = (out / "restarted").iterdir()
    assert checkpoints.verify(moved / "checkpoints" / "step_00000004")["step"] == 4 and (moved / "metrics.jsonl").is_file()
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4]
    runs = assert_one_run_per_folder(os.environ["MLFLOW_TRACKING_URI"], "attamba", [out, moved])
    assert runs[moved].info.run_id == first["run_id"]


def test_a_folder_without_a_checkpoint_keeps_its_config_once_steps_were_logged(env):
    out = env / "fresh"
    base = tiny(out, "train.steps=2", "train.ckpt_every=0", "train.eval_every=0")
    train(load_run_config(None, base))
    assert train(load_run_config(None, base))["start_step"] == 0      # the same settings start over
    with pytest.raises(ValueError, match=r"holds steps of an attempt with another config .*"
                                         r"data.seq_len: 64 -> 32.*--restart"):
        train(load_run_config(None, [*base, "data.seq_len=32"]))
    assert train(load_run_config(None, [*base, "data.seq_len=32"]), restart=True)["step"] == 2


def test_changed_steps_is_refused_unless_allowed(env):
    common = ["train.ckpt_every=3", "train.eval_every=3", "optim.warmup_steps=2"]

    def stop(step, metrics, checkpoint):
        raise StopTraining

    assert train(load_run_config(None, tiny(env / "cut", "train.steps=6", *common)), on_eval=stop)["step"] == 3
    longer = tiny(env / "cut", "train.steps=8", *common)
    with pytest.raises(ValueError, match=r"train.steps=6, this run has train.steps=8.*train.allow_steps_change=true"):
        train(load_run_config(None, longer))
    resumed = train(load_run_config(None, [*longer, "train.allow_steps_change=true"]))
    assert resumed["step"] == 8
    # from step 4 on, the learning rate follows the 8-step schedule, as in a run planned for 8 steps
    train(load_run_config(None, tiny(env / "planned", "train.steps=8", *common)))
    lr = {r["step"]: r[schema.M_LR] for r in rows(env / "cut")}
    planned = {r["step"]: r[schema.M_LR] for r in rows(env / "planned")}
    for step in range(4, 9):
        assert lr[step] == pytest.approx(planned[step], rel=1e-12), step
    six = {r["step"]: r[schema.M_LR] for r in rows(env / "cut") if r["step"] <= 3}
    assert six[3] != pytest.approx(planned[3], rel=1e-6)   # the schedules differ: the check can fail


@pytest.mark.parametrize("override, message", [
    ("train.keep_last=-1", "train.keep_last must be >= 0"),
    ("train.keep_last=1.5", "train.keep_last must be an integer"),
    ("train.keep_steps=[3]", r"train.keep_steps\[0\] must be a step where a checkpoint is saved"),
    ("train.keep_steps=[0]", r"train.keep_steps\[0\] must be an integer >= 1"),
    ("train.keep_steps=5", "train.keep_steps must be a list"),
    ("train.allow_steps_change=1", "train.allow_steps_change must be true or false"),
])
def test_bad_retention_settings_are_refused(override, message):
    with pytest.raises(ValueError, match=message):
        load_run_config(None, ["train.steps=10", "train.ckpt_every=2", override])


TWO_RANKS = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from pipeline.config import load_run_config
    from pipeline.train.loop import train
    print(json.dumps(train(load_run_config(None, json.loads(sys.argv[1])))))
""")


def _two_ranks(overrides, cwd) -> list[tuple[int, str, str]]:
    """(return code, stdout, stderr) of each rank of one 2-rank run."""
    port = free_port()
    procs = []
    for rank in range(2):
        e = dict(child_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-c", TWO_RANKS, json.dumps(overrides)], env=e, cwd=cwd,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=600) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


@pytest.mark.slow
def test_two_ranks_resume_from_the_checkpoint_rank_0_chose(env):
    """A damaged ZeRO shard of rank 1 in the newest checkpoint: rank 0 passes over it, and both ranks resume
    from the previous checkpoint and confirm its step."""
    overrides = tiny(env / "dp", "train.steps=4", "train.ckpt_every=2", "train.eval_every=0", "train.zero_stage=2",
                     "train.batch_size=4", "optim.warmup_steps=2")
    first = _two_ranks(overrides, env)
    assert [r[0] for r in first] == [0, 0], first[0][2][-3000:] + first[1][2][-3000:]
    before = losses(env / "dp")
    shard = next((env / "dp" / "checkpoints" / "step_00000004").glob("*rank_1_*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:1000])
    second = _two_ranks(overrides, env)
    assert [r[0] for r in second] == [0, 0], second[0][2][-3000:] + second[1][2][-3000:]
    assert "passing over damaged checkpoint" in second[0][2] and shard.parent.name in second[0][2]
    results = [json.loads(r[1].strip().splitlines()[-1]) for r in second]
    assert [r["step"] for r in results] == [4, 4]
    assert [r["step"] for r in rows(env / "dp")] == [1, 2, 3, 4]
    for step in (3, 4):
        assert losses(env / "dp")[step] == pytest.approx(before[step], abs=1e-6, rel=0)
    assert checkpoints.verify(shard.parent)["step"] == 4


def test_model_fields_added_later_keep_old_checkpoints_resumable():
    from pipeline.config import RunConfig

    now = RunConfig().to_dict()
    before = {**now, "model": {k: v for k, v in now["model"].items() if k not in checkpoints.LATER_MODEL_FIELDS}}
    assert checkpoints.config_hash(before) == checkpoints.config_hash(now)
    windowed = {**now, "model": {**now["model"], "sliding_window": True}}
    assert checkpoints.config_hash(windowed) != checkpoints.config_hash(now)
    assert set(checkpoints.LATER_MODEL_FIELDS) == {"iso", "sliding_window"}   # both added after checkpoints existed
    sized = {**now, "model": {**now["model"], "iso": "kv"}}
    assert checkpoints.config_hash(sized) != checkpoints.config_hash(now)

