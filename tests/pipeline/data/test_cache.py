"""The token cache under concurrent builders and damage: built once, renamed into place, verified by hash."""

import hashlib
import logging
import multiprocessing
import os
from pathlib import Path

import numpy as np

from pipeline.data import cache as data_cache
from pipeline.data.prepare import DataConfig, prepare
from pipeline.data.sources import SPLITS
from tests.pipeline.data.test_data import write_docs


def _config(tmp_path) -> DataConfig:
    docs = [f"document {i}: " + "some words and more words " * (200 + 17 * i) for i in range(24)]
    write_docs(tmp_path / "corpus", docs)
    return DataConfig(source=str(tmp_path / "corpus"), tokenizer="byte", seq_len=16, val_fraction=0.2,
                      test_fraction=0.1, cache_dir=str(tmp_path / "cache"), progress=False)


def _digest(data) -> str:
    """Everything a trial reads from the cache: each split's tokens, documents and document offsets."""
    h = hashlib.sha256()
    for split in SPLITS:
        h.update(np.asarray(data.tokens(split)).tobytes())
        h.update("\n".join(data.documents(split)).encode())
        h.update(b"".join(np.asarray(t).tobytes() for t in data.document_tokens(split)))
    return h.hexdigest()


def _prepare_in_child(config, barrier, results):
    barrier.wait()   # both start preparing at the same moment
    data = prepare(config)
    results.put((os.getpid(), data.cache_hit, _digest(data), str(data.directory)))


def _cache_entries(config) -> list[str]:
    return sorted(p.name for p in (Path(config.cache_dir) / "data").iterdir())


def test_two_processes_preparing_one_cache_both_succeed_and_leave_one_valid_cache(tmp_path):
    config = _config(tmp_path)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_prepare_in_child, args=(config, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]
    got = [results.get(timeout=5) for _ in procs]
    assert len({digest for _, _, digest, _ in got}) == 1 and len({d for *_, d in got}) == 1
    # one built it, the other waited for it and reused it: never two builders deleting each other's files
    assert sorted(hit for _, hit, _, _ in got) == [False, True]
    directory = Path(got[0][3])
    assert _cache_entries(config) == [directory.name, directory.name + ".lock"]   # no tmp or stale folders
    meta, reason = data_cache.read_cache(directory, directory.name)
    assert meta is not None, reason
    again = prepare(config)
    assert again.cache_hit and _digest(again) == got[0][2]


def test_a_cache_whose_content_does_not_match_its_hash_is_rebuilt(tmp_path, caplog):
    config = _config(tmp_path)
    first = prepare(config)
    good = _digest(first)
    path = first.directory / "train.bin"
    del first
    with open(path, "r+b") as f:   # one flipped byte: sizes and offsets still match the metadata
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with caplog.at_level(logging.WARNING, logger="pipeline.data.prepare"):
        rebuilt = prepare(config)
    assert not rebuilt.cache_hit and _digest(rebuilt) == good
    assert any("train.bin" in r.getMessage() and "SHA-256" in r.getMessage() for r in caplog.records)
    docs = rebuilt.directory / "validation.docs.jsonl"
    docs.write_text(docs.read_text().replace("words", "wordz", 1))   # damaged text, same length
    assert not prepare(config).cache_hit
    final = prepare(config)
    assert final.cache_hit and _digest(final) == good
    assert _cache_entries(config) == [final.directory.name, final.directory.name + ".lock"]


def test_a_cached_tokenizer_edited_in_place_is_detected_and_trained_again(tmp_path, caplog):
    import json

    from pipeline.data.tokenizer import CACHED_HASH_FILE

    config = DataConfig(**{**vars(_config(tmp_path)), "tokenizer": "bpe", "vocab_size": 300})
    first = prepare(config)
    path = Path(first.tokenizer.path)
    trained = path.read_bytes()
    assert json.loads((path.parent / CACHED_HASH_FILE).read_text())["sha256"] == hashlib.sha256(trained).hexdigest()
    assert first.meta["tokenizer_sha256"] == hashlib.sha256(trained).hexdigest()   # in the token cache's manifest
    assert prepare(config).tokenizer_cache_hit
    # still valid JSON, still a tokenizer, one vocabulary entry renamed: it would tokenize differently
    spec = json.loads(trained)
    vocab = spec["model"]["vocab"]
    name = next(token for token, i in vocab.items() if i == 280)
    vocab["zzzz"] = vocab.pop(name)
    path.write_text(json.dumps(spec))
    with caplog.at_level(logging.WARNING, logger="pipeline.data.tokenizer"):
        again = prepare(config)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert str(path) in warned and "changed after it was trained (sha256" in warned
    assert not again.tokenizer_cache_hit and path.read_bytes() == trained   # trained again, the same tokenizer
    assert again.tokenizer.fingerprint == first.tokenizer.fingerprint and _digest(again) == _digest(first)
    (path.parent / CACHED_HASH_FILE).unlink()   # cut off before its hash was written: not trusted either
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.data.tokenizer"):
        assert not prepare(config).tokenizer_cache_hit
    assert "no SHA-256 recorded" in caplog.text
