"""Evaluation: bits per byte, the paper's tail metric, checkpoint verification, the lm-eval adapter (MQAR recall:
test_mqar.py)."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attamba.model import AttambaLM
from pipeline import checkpoints
from pipeline.train import checkpoint as ckpt
from pipeline.config import load_run_config
from pipeline.data.prepare import prepare
from pipeline.eval.evaluate import evaluate_split, paper_metric

TEXT = ["The quick brown fox jumps over the lazy dog. " * 6, "Ünïcödé bytes cost more: żółć ", "short",
        "To be, or not to be, that is the question: " * 5] * 3


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTAMBA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT))
    cfg = load_run_config(None, ["size=micro", "model.max_seq_len=64", f"data.source={corpus}",
                                 "data.tokenizer=byte", "data.seq_len=32", "data.val_fraction=0.3",
                                 "data.test_fraction=0.1", "data.progress=false"])
    data = prepare(cfg.data, max_seq_len=64)
    cfg = replace(cfg, model=replace(cfg.model, vocab_size=data.vocab_size))
    torch.manual_seed(0)
    return cfg, data, AttambaLM(cfg.model).eval()


def test_bits_per_byte_matches_independent_count(setup):
    cfg, data, model = setup
    res = evaluate_split(model, data, "validation", batch_size=3, max_batches=0)
    tokens = torch.from_numpy(np.asarray(data.tokens("validation")).astype(np.int64))
    # Independent: one forward per window of 33 tokens, log_softmax by hand, bytes from the raw text.
    nats, count, start = 0.0, 0, 0
    while start < len(tokens) - 1:
        window = tokens[start:start + 33]
        with torch.no_grad():
            logp = F.log_softmax(model(window[None, :-1])[0].double(), -1)
        nats -= float(logp.gather(1, window[1:, None]).sum())
        count += len(window) - 1
        start += 32
    n_bytes = sum(len(d.encode("utf-8")) for d in data.documents("validation"))
    assert count == res["tokens"] == len(tokens) - 1
    assert res["bytes"] == n_bytes
    assert res["bpb"] == pytest.approx(nats / (math.log(2) * n_bytes), rel=1e-9)
    assert res["loss"] == pytest.approx(nats / count, rel=1e-9)


def test_loss_by_position_matches_independent_count(setup):
    from pipeline import schema

    cfg, data, model = setup
    res = evaluate_split(model, data, "validation", batch_size=3, max_batches=0)
    tokens = torch.from_numpy(np.asarray(data.tokens("validation")).astype(np.int64))
    seq_len = cfg.data.seq_len
    assert schema.position_buckets(seq_len) == [(1, 8), (9, 32)]
    # Independent: one forward per window, the target at index t seen after t + 1 tokens.
    nats, count, start = np.zeros(seq_len + 1), np.zeros(seq_len + 1), 0
    while start < len(tokens) - 1:
        window = tokens[start:start + seq_len + 1]
        with torch.no_grad():
            logp = F.log_softmax(model(window[None, :-1])[0].double(), -1)
        nll = -logp.gather(1, window[1:, None])[:, 0].numpy()
        nats[1:len(nll) + 1] += nll
        count[1:len(nll) + 1] += 1
        start += seq_len
    want = {schema.loss_pos_name(a, b): nats[a:b + 1].sum() / count[a:b + 1].sum() for a, b in ((1, 8), (9, 32))}
    assert res["by_position"] == pytest.approx(want, rel=1e-6)   # the model scores in float32
    # the buckets split the targets: their count-weighted mean is the loss
    weights = {schema.loss_pos_name(a, b): count[a:b + 1].sum() for a, b in ((1, 8), (9, 32))}
    assert sum(res["by_position"][k] * w for k, w in weights.items()) / count.sum() == pytest.approx(res["loss"],
                                                                                                    rel=1e-9)


def test_position_buckets_are_log_spaced_up_to_the_sequence_length():
    from pipeline import schema

    assert schema.position_buckets(2048) == [(1, 8), (9, 32), (33, 128), (129, 512), (513, 2048)]
    assert schema.position_buckets(256)[-1] == (129, 256)
    assert schema.position_buckets(5) == [(1, 5)]
    assert schema.position_buckets(9) == [(1, 8), (9, 9)]
    for name, want in (("val/loss_pos_9-32", (9, 32)), ("evalvar/swa-W9/loss_pos_129-256", (129, 256)),
                       ("loss_pos_1-8", (1, 8)), ("val/loss", None), ("val/loss_pos_x-8", None)):
        assert schema.parse_loss_pos(name) == want
    with pytest.raises(ValueError, match="seq_len must be >= 1"):
        schema.position_buckets(0)


def test_a_window_changes_only_the_positions_beyond_it(setup):
    """A full transformer scored through a window of W keys (the query included) predicts the targets at
    positions <= W from the same tokens as without it: those buckets are equal, the later ones are not."""
    from pipeline import schema
    from pipeline.eval.evaluate import evaluate_model
    from pipeline.eval.variants import evaluate_variants, resolve

    cfg, data, _ = setup
    full_cfg = replace(cfg.model, attention="full")
    torch.manual_seed(0)
    model = AttambaLM(full_cfg).eval()
    resolved = resolve(full_cfg, [{"window": 8}])
    assert [v.label for v in resolved] == ["swa-W8"]
    got = evaluate_variants(model.state_dict(), resolved, data, batch_size=3)
    base = evaluate_model(model, data, cfg.eval, 3, full=True)
    first, later = schema.loss_pos_name(1, 8), schema.loss_pos_name(9, 32)
    assert got[schema.eval_variant_metric("swa-W8", first)] == pytest.approx(base[f"val/{first}"], rel=1e-6)
    assert got[schema.eval_variant_metric("swa-W8", later)] != pytest.approx(base[f"val/{later}"], rel=1e-4)
    # a periodic evaluation (a few batches) logs no loss by position: only the final one does
    assert not any(schema.parse_loss_pos(k) for k in evaluate_model(model, data, replace(cfg.eval, batches=1), 3))


def test_paper_metric_uses_only_each_documents_tail(setup):
    cfg, data, model = setup
    docs = [np.asarray(d).astype(np.int64) for d in data.document_tokens("validation")]
    tail = 16
    base = paper_metric(model, docs, tail)
    manual_nats, manual_count = 0.0, 0
    for d in docs:
        piece = torch.from_numpy(d[-tail:])
        manual_nats += float(model(piece[None, :-1], piece[None, 1:], reduction="none").detach().double().sum())
        manual_count += len(piece) - 1
    assert base["paper_tokens"] == manual_count
    assert base["paper_ppl"] == pytest.approx(math.exp(manual_nats / manual_count), rel=1e-9)
    changed_head = [np.concatenate([(d[:-tail] + 7) % 256, d[-tail:]]) for d in docs]
    assert paper_metric(model, changed_head, tail)["paper_ppl"] == pytest.approx(base["paper_ppl"], rel=1e-12)
    changed_tail = [np.concatenate([d[:-3], (d[-3:] + 7) % 256]) for d in docs]
    assert paper_metric(model, changed_tail, tail)["paper_ppl"] != pytest.approx(base["paper_ppl"], rel=1e-6)
    with pytest.raises(ValueError, match="paper_tail"):
        paper_metric(model, docs, 65)


def _export(setup, directory):
    cfg, _, model = setup
    ckpt.write_model_files(directory, model.state_dict(), cfg.to_dict(), None)
    ckpt.write_manifest(directory, 0, checkpoints.config_hash(cfg.to_dict()))
    return directory


def test_checkpoint_verification_refuses_tampering(setup, tmp_path):
    directory = _export(setup, tmp_path / "checkpoints" / "step_00000000")
    model, cfg, tok = checkpoints.load_model(directory)
    assert torch.equal(model.embed.weight, setup[2].embed.weight) and tok.vocab_size == cfg.model.vocab_size
    raw = bytearray((directory / checkpoints.WEIGHTS).read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (directory / checkpoints.WEIGHTS).write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="model.pt does not match its sha256"):
        checkpoints.load_model(directory)
    with pytest.raises(ValueError, match="model.pt does not match"):
        checkpoints.latest_checkpoint(tmp_path)  # a bad manifest is an error, not a silent fallback
    (directory / checkpoints.MANIFEST).unlink()
    with pytest.raises(ValueError, match="has no manifest.json"):
        checkpoints.load_model(directory)
    assert checkpoints.latest_checkpoint(tmp_path) is None  # an unsealed save is passed over


def test_lm_eval_adapter_runs_a_local_multiple_choice_task(setup, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval not installed: pip install lm-eval")
    from pipeline.eval.harness import AttambaEvalLM, run_lm_eval

    directory = _export(setup, tmp_path / "ck")
    rows = [{"question": "The quick brown fox jumps over the lazy", "choices": [" dog.", " cat!", " sky?"], "label": 0},
            {"question": "To be, or not to be, that is the", "choices": [" question", " answer"], "label": 0},
            {"question": "Short and", "choices": [" sweet", " sour", " long"], "label": 1}]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
""")
    out = run_lm_eval(directory, ["tiny_mc"], include_path=tmp_path / "tasks")
    acc = out["results"]["tiny_mc"]["acc,none"]
    # The adapter's choice scores, recomputed by hand: acc must be the fraction where the label wins.
    model, _, tok = checkpoints.load_model(directory)
    lm = AttambaEvalLM(model, tok)
    expected = 0
    for r in rows:
        scores = []
        for c in r["choices"]:
            seq = torch.tensor([[tok.bos_id] + tok.encode(r["question"] + c)])
            logp = F.log_softmax(model(seq[:, :-1])[0], -1)
            n = len(tok.encode(c))
            scores.append(float(logp[-n:].gather(1, seq[0, -n:, None]).sum().detach()))
        expected += int(np.argmax(scores) == r["label"])
        assert scores[0] == pytest.approx(lm._continuation_logprob(tok.encode(r["question"]),
                                                                    tok.encode(r["choices"][0]))[0], rel=1e-5)
    assert acc == pytest.approx(expected / len(rows))
    rolling = lm.loglikelihood_rolling([type("R", (), {"args": ("abc " * 30,)})()])[0]
    assert rolling < 0 and math.isfinite(rolling)


def _eval_cli(args, env_extra, tmp_path, timeout):
    import os
    import subprocess
    import sys

    from tests.helpers import REPO_ROOT

    # An empty HF cache: a hub task's data can only come from the hub.
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1",
           **env_extra}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "eval", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _check_hub_error(result):
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [l for l in result.stderr.splitlines() if l.startswith("attamba eval: error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    line = lines[0]
    assert "lm-eval task(s) arc_easy need the Hugging Face hub" in line and "the hub is unreachable" in line
    assert "--include-path FOLDER" in line and "dataset_path is a local loader" in line


def test_lm_eval_hub_task_offline_fails_in_one_line(setup, tmp_path):
    """With HF_HUB_OFFLINE=1 a task whose data lives on the hub (arc_easy) fails in one line that says the hub
    is unreachable and how to run a local task; nothing is scored."""
    pytest.importorskip("lm_eval", reason="lm-eval not installed: pip install lm-eval")
    directory = _export(setup, tmp_path / "ck")
    result = _eval_cli([str(directory), "--lm-eval", "arc_easy", "--limit", "2"], {"HF_HUB_OFFLINE": "1"},
                       tmp_path, timeout=300)
    _check_hub_error(result)
    assert "OfflineModeIsEnabled" in result.stderr or "offline" in result.stderr.lower()


@pytest.mark.slow
def test_lm_eval_hub_task_with_the_hub_refusing_connections_fails_in_one_line(setup, tmp_path):
    """Not offline mode, but every connection to the hub refused (its endpoint on a closed local port):
    the same one line, after the hub client's retries."""
    pytest.importorskip("lm_eval", reason="lm-eval not installed: pip install lm-eval")
    import socket

    with socket.socket() as sock:   # a port nothing listens on once the socket is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    directory = _export(setup, tmp_path / "ck")
    result = _eval_cli([str(directory), "--lm-eval", "arc_easy", "--limit", "2"],
                       {"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{port}"},
                       tmp_path, timeout=400)
    _check_hub_error(result)


def test_hub_unreachable_reads_the_cause_chain():
    pytest.importorskip("lm_eval", reason="lm-eval not installed: pip install lm-eval")
    import requests
    from huggingface_hub.errors import OfflineModeIsEnabled

    from pipeline.eval.harness import hub_unreachable

    def chained(outer, inner):
        try:
            try:
                raise inner
            except Exception as cause:
                raise outer from cause
        except Exception as error:
            return error

    assert hub_unreachable(chained(RuntimeError("task build failed"), requests.exceptions.ConnectionError("refused")))
    assert hub_unreachable(OfflineModeIsEnabled("offline"))
    assert hub_unreachable(ConnectionRefusedError(111, "refused"))
    assert not hub_unreachable(chained(RuntimeError("x"), KeyError("no such task")))
    assert not hub_unreachable(ValueError("bad limit"))


def test_metrics_are_named_by_their_split_and_count_what_they_scored(setup):
    from pipeline import schema
    from pipeline.eval.evaluate import evaluate_model

    cfg, data, model = setup
    whole = evaluate_model(model, data, cfg.eval, 2, full=True)
    assert whole[schema.M_VAL_TOKENS] == len(data.tokens("validation")) - 1   # every target once
    some = evaluate_model(model, data, replace(cfg.eval, batches=1), 2)
    assert some[schema.M_VAL_TOKENS] == 2 * cfg.data.seq_len < whole[schema.M_VAL_TOKENS]
    test = evaluate_model(model, data, cfg.eval, 2, full=True, split="test")
    reached = min(len(data.tokens("test")) - 1, cfg.data.seq_len)   # the furthest position a test target is at
    by_position = {f"test/{schema.loss_pos_name(a, b)}" for a, b in schema.position_buckets(cfg.data.seq_len)
                   if a <= reached}
    assert by_position and set(test) == {"test/loss", "test/ppl", "test/bpb", "test/tokens", *by_position}
    assert test["test/tokens"] == len(data.tokens("test")) - 1
    assert test["test/loss"] != whole[schema.M_VAL_LOSS]


def test_cli_variants_without_a_tracked_run_say_they_were_not_logged(setup, tmp_path, capsys):
    from pipeline import schema
    from pipeline.cli import main

    directory = _export(setup, tmp_path / "checkpoints" / "step_00000000")
    cfg = setup[0].model
    assert cfg.chunk_size == 8   # so chunk_size=8 is the trained setting, skipped; a window does not apply
    assert main(["eval", str(tmp_path), "--variant", "chunk_size=4", "--variant", "model.leading_tokens=0",
                 "--variant", "chunk_size=8", "--variant", "window=9"]) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out[captured.out.index("{\n"):])
    labels = {replace(cfg, chunk_size=4).variant(), replace(cfg, leading_tokens=0).variant()}
    assert set(printed["eval_variant_tags"]) == {schema.TAG_EVAL_VARIANT_PREFIX + label for label in labels}
    for label in labels:
        assert schema.eval_variant_metric(label, "kv_cache_bytes") in printed
    assert "not logged: no MLflow run recorded in" in captured.err
    assert main(["eval", str(directory), "--variant", "ssm.state_dim=64"]) == 2
    assert "may only change the attention setting" in capsys.readouterr().err
