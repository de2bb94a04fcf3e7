import json
import math
import os
import time

import numpy as np
import pytest
import torch

from pipeline.data import sources as data_sources
from pipeline.data.prepare import DataConfig, bits_per_byte, prepare
from pipeline.data.tokenizer import ByteTokenizer


@pytest.fixture(autouse=True)
def _cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTAMBA_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def bundled_byte(tmp_path_factory):
    cfg = DataConfig(tokenizer="byte", seq_len=64, cache_dir=str(tmp_path_factory.mktemp("byte")), progress=False)
    return prepare(cfg)


@pytest.fixture(scope="module")
def bundled_bpe(tmp_path_factory):
    # 10 of the 38 plays keep the test fast; the full corpus is exercised with the byte tokenizer
    cfg = DataConfig(cache_dir=str(tmp_path_factory.mktemp("bpe")), max_documents=10, progress=False)
    return cfg, prepare(cfg)


def write_docs(directory, docs, suffix=".txt"):
    directory.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(docs):
        (directory / f"doc{i:02d}{suffix}").write_text(d, encoding="utf-8")


# ---- corpus and splits -------------------------------------------------------------------------

def test_bundled_splits_are_disjoint_complete_and_deterministic(bundled_byte, tmp_path):
    docs = {s: bundled_byte.documents(s) for s in ("train", "validation", "test")}
    assert [len(docs[s]) for s in docs] == [34, 2, 2]
    sets = {s: set(d) for s, d in docs.items()}
    assert not sets["train"] & sets["validation"] and not sets["train"] & sets["test"]
    assert not sets["validation"] & sets["test"]
    all_plays = data_sources.load_files(data_sources.bundled_files(), "text", str(tmp_path / "hf"), False)
    assert len(all_plays) == 38 and set(all_plays) == sets["train"] | sets["validation"] | sets["test"]

    again = prepare(DataConfig(tokenizer="byte", seq_len=64, cache_dir=str(tmp_path / "other"), progress=False))
    assert not again.cache_hit
    assert all(again.documents(s) == docs[s] for s in docs)
    reseeded = data_sources.split_documents(all_plays, 0.05, 0.05, seed=1)
    assert set(reseeded["validation"]) != sets["validation"]


def test_bos_eos_wrap_every_document(bundled_byte):
    tok = bundled_byte.tokenizer
    for split in ("validation", "test"):
        pieces = bundled_byte.document_tokens(split)
        texts = bundled_byte.documents(split)
        assert np.array_equal(np.concatenate(pieces), bundled_byte.tokens(split))
        for ids, text in zip(pieces, texts):
            assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
            inner = np.asarray(ids[1:-1])
            assert not np.isin(inner, [tok.bos_id, tok.eos_id]).any()
            assert bytes(inner.astype(np.uint8)) == text.encode("utf-8")


def test_packing_shapes_and_shifted_targets(bundled_byte):
    T = bundled_byte.seq_len
    tokens = np.asarray(bundled_byte.tokens("train"))
    it = bundled_byte.batches("train", batch_size=3, seed=5)
    batch = next(it)
    assert batch.shape == (3, T + 1) and batch.dtype == torch.long
    for row, j in zip(batch, it.indices(0)):
        assert torch.equal(row, torch.from_numpy(tokens[j * T: j * T + T + 1].astype(np.int64)))
    inputs, targets = batch[:, :-1], batch[:, 1:]
    assert torch.equal(inputs[:, 1:], targets[:, :-1])

    rows = torch.cat(list(bundled_byte.eval_batches("validation", batch_size=7)))
    assert rows.shape == (bundled_byte.num_sequences("validation"), T + 1)
    # consecutive sequences overlap by exactly one token: every token is a target once
    assert torch.equal(rows[:-1, -1], rows[1:, 0])
    flat = torch.cat([rows[0, :1], rows[:, 1:].reshape(-1)])
    n = len(flat)
    assert torch.equal(flat, torch.from_numpy(np.asarray(bundled_byte.tokens("validation")[:n]).astype(np.int64)))


def test_uint16_memmap_and_metadata(bundled_byte):
    tokens = bundled_byte.tokens("train")
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
    meta = json.loads((bundled_byte.directory / "meta.json").read_text())
    info = meta["splits"]["train"]
    assert info["n_docs"] == 34 and info["n_tokens"] == len(tokens) == info["n_text_tokens"] + 2 * 34


# ---- tokenizers --------------------------------------------------------------------------------

def test_bpe_is_trained_then_reused_from_cache(bundled_bpe):
    cfg, first = bundled_bpe
    assert not first.cache_hit and not first.tokenizer_cache_hit and first.vocab_size == 4096
    tok_file = first.tokenizer.path
    mtimes = (os.stat(tok_file).st_mtime_ns, os.stat(first.directory / "train.bin").st_mtime_ns)
    second = prepare(cfg)
    assert second.cache_hit and second.tokenizer_cache_hit
    assert (os.stat(tok_file).st_mtime_ns, os.stat(second.directory / "train.bin").st_mtime_ns) == mtimes
    assert np.array_equal(first.tokens("test"), second.tokens("test"))
    assert first.bytes_per_token("train") > 2.0  # a working BPE compresses English well past 1 byte/token
    text = "Now, fair Hippolyta — naïve “quotes” ✓ 日本\n\ttabs  "
    ids = second.tokenizer.encode(text)
    assert second.tokenizer.decode(ids) == text and max(ids) < 4096
    assert first.tokens("train").dtype == np.uint16


def test_pieced_batch_encoding_equals_whole_text_encoding(bundled_bpe):
    from pipeline.data.tokenizer import split_at_word_starts

    _, data = bundled_bpe
    tok = data.tokenizer
    tricky = ("a  \n\n  b.  \n\tc's  d\u00a0e \u3000f 12 345 -- x\n" * 300) + "   "
    texts = [tricky, data.documents("test")[0], "", "short"]
    assert len(split_at_word_starts(tricky, size=50)) > 10
    assert "".join(split_at_word_starts(tricky, size=50)) == tricky
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok._splittable


def test_bpe_sees_only_the_training_split(tmp_path):
    # each document carries its own nonsense word; BPE merges it only if it trained on that document
    words = [chr(ord("b") + i) + "qzx" * 2 for i in range(12)]
    docs = [f"{w} " * 400 + "the quick brown fox " * 50 for w in words]
    write_docs(tmp_path / "corpus", docs)
    data = prepare(DataConfig(source=str(tmp_path / "corpus"), vocab_size=400, val_fraction=0.2,
                              test_fraction=0.2, seq_len=16, progress=False))
    for split, expect_merged in (("train", True), ("validation", False), ("test", False)):
        for doc in data.documents(split):
            n = len(data.tokenizer.encode(doc.split()[0]))
            assert (n == 1) == expect_merged, (split, doc[:8], n)


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "héllo ✓ 日本 \x00 end"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and tok.decode(ids) == text
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id]) == text
    assert tok.vocab_size == 259 and {tok.bos_id, tok.eos_id, tok.pad_id} == {256, 257, 258}


def test_local_tokenizer_json(bundled_bpe, tmp_path):
    _, data = bundled_bpe
    write_docs(tmp_path / "c", ["Thou art a boil, a plague sore. " * 40] * 3)
    other = prepare(DataConfig(source=str(tmp_path / "c" / "*.txt"), tokenizer=data.tokenizer.path, seq_len=8,
                               val_fraction=0, test_fraction=0, progress=False))
    assert other.vocab_size == 4096 and other.bos_id == data.bos_id and other.eos_id == data.eos_id


# ---- local sources -----------------------------------------------------------------------------

def test_txt_glob_and_directory_sources(tmp_path):
    docs = [f"document {i}: " + "words and more words. " * 20 for i in range(6)]
    write_docs(tmp_path / "d", docs)
    (tmp_path / "d" / "ignored.csv").write_text("a,b\n")
    for source in (str(tmp_path / "d" / "doc*.txt"), str(tmp_path / "d")):
        data = prepare(DataConfig(source=source, tokenizer="byte", seq_len=8, val_fraction=0.2,
                                  test_fraction=0.2, progress=False))
        got = sum((data.documents(s) for s in ("train", "validation", "test")), [])
        assert sorted(got) == sorted(docs)


def test_jsonl_and_parquet_sources_with_text_field(tmp_path):
    import pandas as pd

    rows = [{"id": i, "body": f"row {i} " + "ab " * 30} for i in range(5)]
    with open(tmp_path / "a.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    pd.DataFrame(rows).to_parquet(tmp_path / "a.parquet")
    for name in ("a.jsonl", "a.parquet"):
        data = prepare(DataConfig(source=str(tmp_path / name), text_field="body", tokenizer="byte", seq_len=8,
                                  val_fraction=0.2, test_fraction=0, max_documents=4, progress=False))
        got = data.documents("train") + data.documents("validation")
        assert sorted(got) == sorted(r["body"] for r in rows[:4])
    with pytest.raises(ValueError, match="text_field='text'"):
        prepare(DataConfig(source=str(tmp_path / "a.jsonl"), tokenizer="byte", progress=False))


def test_changed_local_file_changes_the_cache_key(tmp_path):
    write_docs(tmp_path / "c", ["alpha " * 50, "beta " * 50])
    cfg = DataConfig(source=str(tmp_path / "c"), tokenizer="byte", seq_len=8, val_fraction=0, test_fraction=0,
                     progress=False)
    first = prepare(cfg)
    (tmp_path / "c" / "doc01.txt").write_text("gamma, longer than before " * 50)
    second = prepare(cfg)
    assert second.directory != first.directory and not second.cache_hit
    assert any(d.startswith("gamma") for d in second.documents("train"))


def test_wikitext_lines_group_into_articles():
    lines = [" = A = \n", " text a \n", " = = Sub = = \n", " more a \n", " = B = \n", " text b \n"]
    assert data_sources.group_wikitext_lines(lines) == ["".join(lines[:4]), "".join(lines[4:])]
    assert data_sources.group_wikitext_lines(lines, limit=1) == ["".join(lines[:4])]


def test_source_kinds():
    assert data_sources.source_kind("bundled") == "bundled"
    for hub in ("wikitext-103-raw-v1", "HuggingFaceFW/fineweb-edu:sample-10BT", "mlfoundations/dclm-baseline-1.0"):
        assert data_sources.source_kind(hub) == "hub"
    for local in ("data/x.txt", "./corpus", "/abs/dir", "shards/*.parquet"):
        assert data_sources.source_kind(local) == "local"


# ---- loader: sharding and resume ---------------------------------------------------------------

def test_two_ranks_split_the_global_batch(bundled_byte):
    single = bundled_byte.batches(batch_size=8, seed=3)
    ranks = [bundled_byte.batches(batch_size=4, rank=r, world_size=2, seed=3) for r in range(2)]
    steps = single.steps_per_epoch
    assert steps == ranks[0].steps_per_epoch
    seen = []
    for step in range(steps):
        idx = [r.indices(step) for r in ranks]
        assert not set(idx[0]) & set(idx[1])
        assert sorted(np.concatenate(idx)) == sorted(single.indices(step))
        seen.extend(np.concatenate(idx))
    assert len(seen) == len(set(seen)) == steps * 8
    # the tensors follow the indices
    a, b, s = next(ranks[0]), next(ranks[1]), next(single)
    key = lambda t: sorted(map(tuple, t.tolist()))
    assert key(torch.cat([a, b])) == key(s)


def test_resume_from_saved_position_matches_uninterrupted_run(bundled_byte):
    it = bundled_byte.batches(batch_size=16, rank=1, world_size=2, seed=11)
    steps = it.steps_per_epoch
    assert steps > 3
    for _ in range(steps - 2):  # stop two steps before the epoch ends so the resumed run crosses it
        next(it)
    saved = it.position
    expected = [next(it) for _ in range(5)]
    resumed = bundled_byte.batches(batch_size=16, rank=1, world_size=2, seed=11, start=saved)
    got = [next(resumed) for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(expected, got))
    assert resumed.position == saved + 5
    assert not np.array_equal(it.epoch_permutation(0), it.epoch_permutation(1))


# ---- errors ------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="no such file.*bundled"):
        prepare(DataConfig(source=str(tmp_path / "nope.txt"), progress=False))


def test_empty_corpus(tmp_path):
    write_docs(tmp_path / "e", ["", "   \n\n"])
    with pytest.raises(ValueError, match="no text after reading"):
        prepare(DataConfig(source=str(tmp_path / "e"), progress=False))


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}])
def test_hub_name_offline_fails_fast(monkeypatch, env):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for source in ("wikitext-103-raw-v1", "HuggingFaceFW/fineweb-edu:sample-10BT"):
        t0 = time.perf_counter()
        with pytest.raises(ValueError) as err:
            prepare(DataConfig(source=source, max_documents=100, progress=False))
        assert time.perf_counter() - t0 < 5
        msg = str(err.value)
        assert "unreachable" in msg and "offline" in msg and "'bundled'" in msg and "local files" in msg


@pytest.mark.parametrize("field, value, needle", [
    ("seq_len", 0, "seq_len must be an integer >= 1, got 0"),
    ("vocab_size", 100, "vocab_size must be an integer in \\[259"),
    ("tokenizer", "bep", "tokenizer must be 'bpe', 'byte' or a path"),
    ("val_fraction", 1.5, "val_fraction must be a number in \\[0, 1\\), got 1.5"),
    ("test_fraction", 0.6, "val_fraction \\+ test_fraction must be < 1"),
    ("max_documents", 0, "max_documents must be None or an integer >= 1, got 0"),
    ("source", "", "source must be a non-empty string"),
    ("seed", 1.5, r"seed must be an integer in \[0, 9223372036854775807\], got 1.5"),
    ("seed", -1, r"seed must be an integer in \[0, 9223372036854775807\], got -1"),
])
def test_bad_config_values(field, value, needle):
    kwargs = {"val_fraction": 0.5} if field == "test_fraction" else {}
    with pytest.raises(ValueError, match=needle):
        DataConfig(**{field: value}, **kwargs)


def test_seq_len_above_model_max_fails_before_reading():
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="seq_len=2048 exceeds the model's max_seq_len=1024"):
        prepare(DataConfig(source="/no/such/corpus.txt", seq_len=2048), max_seq_len=1024)
    assert time.perf_counter() - t0 < 1


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        prepare(DataConfig(tokenizer=str(tmp_path / "tok.json")))


def test_too_little_data_for_seq_len(tmp_path):
    write_docs(tmp_path / "s", ["tiny"])
    with pytest.raises(ValueError, match="fewer than seq_len"):
        prepare(DataConfig(source=str(tmp_path / "s"), tokenizer="byte", seq_len=64, val_fraction=0,
                           test_fraction=0, progress=False))


def test_corrupt_cache_is_detected_and_rebuilt(tmp_path):
    write_docs(tmp_path / "c", ["some words here " * 40, "other words there " * 40, "third " * 40])
    cfg = DataConfig(source=str(tmp_path / "c"), tokenizer="byte", seq_len=8, val_fraction=0.3, test_fraction=0,
                     progress=False)
    good = np.array(prepare(cfg).tokens("train"))
    bin_path = prepare(cfg).directory / "train.bin"
    with open(bin_path, "r+b") as f:
        f.truncate(os.path.getsize(bin_path) - 2)
    rebuilt = prepare(cfg)
    assert not rebuilt.cache_hit and np.array_equal(rebuilt.tokens("train"), good)
    (rebuilt.directory / "meta.json").write_text("{not json")
    again = prepare(cfg)
    assert not again.cache_hit and np.array_equal(again.tokens("train"), good)
    assert prepare(cfg).cache_hit


# ---- bits per byte -----------------------------------------------------------------------------

def test_byte_counts_for_known_text(tmp_path):
    docs = ["héllo wörld", "naïve ✓", "plain ascii text"]  # 13 + 10 + 16 UTF-8 bytes
    write_docs(tmp_path / "k", docs)
    data = prepare(DataConfig(source=str(tmp_path / "k"), vocab_size=300, seq_len=2, val_fraction=0.3,
                              test_fraction=0.3, progress=False))
    counts = {s: data.n_bytes(s) for s in ("train", "validation", "test")}
    assert sum(counts.values()) == 13 + 10 + 16
    for s, n in counts.items():
        assert n == sum(len(d.encode("utf-8")) for d in data.documents(s))
        info = data.meta["splits"][s]
        assert info["n_text_tokens"] == sum(len(data.tokenizer.encode(d)) for d in data.documents(s))
        assert data.bytes_per_token(s) == pytest.approx(n / info["n_text_tokens"])
    assert bits_per_byte(39 * math.log(2), 39) == pytest.approx(1.0)
    assert bits_per_byte(2.0 * 100, 250) == pytest.approx(200 / (250 * math.log(2)))
