"""Tokenized splits on disk: one flat token stream per split, memory-mapped, plus a metadata JSON.

Layout of `<cache_dir>/data/<key>/`:
  `<split>.bin`          tokens, uint16 when the vocabulary fits, else uint32: [BOS] doc [EOS] [BOS] doc [EOS] ...
  `<split>.offsets.npy`  int64 [n_docs + 1]: document i is tokens[offsets[i]:offsets[i+1]] (BOS..EOS included)
  `<split>.docs.jsonl`   the raw documents, one JSON string per line, for evaluators that need text
  `meta.json`            sizes and the SHA-256 of every file above: a cache is used only when all match

A cache is built in a private temporary folder beside it and renamed into place, under a lock
(`<key>.lock`) that a second process preparing the same cache waits on, then reuses what the first built.
So two trials racing on one cache never delete each other's fresh files, and a damaged cache (a flipped
bit, a truncated file, an interrupted copy) is rebuilt instead of read.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from pipeline.data.sources import SPLITS
from pipeline.data.tokenizer import ByteTokenizer, show_progress

CACHE_FORMAT = 2      # 2: meta.json holds each file's SHA-256
_ENCODE_BATCH_DOCS = 16


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def tokenize_documents(docs: list[str], tokenizer, dtype: np.dtype, desc: str, progress: bool):
    """Encode and pack documents as [BOS] doc [EOS] ... -> (tokens [N], offsets [n_docs + 1], text_tokens)."""
    from tqdm.auto import tqdm

    pieces: list[np.ndarray] = []
    bos = np.array([tokenizer.bos_id], dtype=dtype)
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    text_tokens = 0
    with tqdm(total=len(docs), desc=desc, unit="doc", disable=not show_progress(progress)) as bar:
        for start in range(0, len(docs), _ENCODE_BATCH_DOCS):
            batch = docs[start:start + _ENCODE_BATCH_DOCS]
            if isinstance(tokenizer, ByteTokenizer):
                encoded = [tokenizer.encode_array(d) for d in batch]
            else:
                encoded = tokenizer.encode_batch(batch)
            for ids in encoded:
                ids = np.asarray(ids, dtype=dtype)
                text_tokens += len(ids)
                pieces.extend((bos, ids, eos))
            bar.update(len(batch))
    lengths = np.array([len(p) for p in pieces], dtype=np.int64).reshape(-1, 3).sum(axis=1) if pieces else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    return tokens, offsets, text_tokens


def _files(split: str) -> tuple[str, str, str]:
    return f"{split}.bin", f"{split}.offsets.npy", f"{split}.docs.jsonl"


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 4 MiB blocks (token caches and checkpoint shards run to GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entry to disk (a folder: so a rename inside it survives power loss)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def build_lock(directory: Path):
    """Exclusive lock on building `directory`; a second builder waits here (the OS frees it if we die)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.with_name(directory.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _private_name(directory: Path, what: str) -> Path:
    return directory.with_name(f"{directory.name}.{what}-{os.getpid()}-{os.urandom(4).hex()}")


def write_cache(directory: Path, splits: dict[str, list[str]], tokenizer, meta: dict, progress: bool) -> dict:
    """Tokenize every split into a private folder, then rename it to `directory`. Call under `build_lock`:
    an invalid cache already at `directory` is moved aside and deleted only after the new one is in place."""
    tmp = _private_name(directory, "tmp")
    tmp.mkdir(parents=True)
    try:
        meta = _write_files(tmp, splits, tokenizer, meta, progress)
        if directory.exists():
            stale = _private_name(directory, "stale")
            os.replace(directory, stale)
            os.replace(tmp, directory)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.replace(tmp, directory)
        fsync_path(directory.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)   # gone already unless something failed
    return meta


def _write_files(tmp: Path, splits: dict[str, list[str]], tokenizer, meta: dict, progress: bool) -> dict:
    dtype = token_dtype(tokenizer.vocab_size)
    meta = dict(meta, format=CACHE_FORMAT, dtype=dtype.name, vocab_size=tokenizer.vocab_size,
                bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, splits={})
    for split in SPLITS:
        docs = splits[split]
        tokens, offsets, text_tokens = tokenize_documents(docs, tokenizer, dtype, f"tokenizing {split}", progress)
        tokens.tofile(tmp / f"{split}.bin")
        np.save(tmp / f"{split}.offsets.npy", offsets)
        with open(tmp / f"{split}.docs.jsonl", "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
        meta["splits"][split] = {
            "n_docs": len(docs),
            "n_bytes": sum(len(d.encode("utf-8")) for d in docs),
            "n_tokens": int(len(tokens)),
            "n_text_tokens": int(text_tokens),
        }
    meta["sha256"] = {}
    for split in SPLITS:
        for name in _files(split):
            fsync_path(tmp / name)
            meta["sha256"][name] = file_sha256(tmp / name)
    with open(tmp / "meta.json", "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    fsync_path(tmp)
    return meta


def read_cache(directory: Path, key: str) -> tuple[dict | None, str]:
    """(meta, "") for a complete cache whose files match its metadata, else (None, reason)."""
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        return None, "no cache yet"
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("key") != key or meta.get("format") != CACHE_FORMAT:
            return None, f"metadata key/format mismatch in {meta_path}"
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split in SPLITS:
            info = meta["splits"][split]
            size = os.path.getsize(directory / f"{split}.bin")
            if size != info["n_tokens"] * itemsize:
                return None, f"{split}.bin has {size} bytes, metadata says {info['n_tokens'] * itemsize}"
            offsets = np.load(directory / f"{split}.offsets.npy")
            if len(offsets) != info["n_docs"] + 1 or int(offsets[-1]) != info["n_tokens"]:
                return None, f"{split}.offsets.npy does not match the metadata"
            if not (directory / f"{split}.docs.jsonl").is_file():
                return None, f"{split}.docs.jsonl is missing"
            for name in _files(split):
                if file_sha256(directory / name) != meta["sha256"][name]:
                    return None, f"{name}'s content does not match its SHA-256 in meta.json (a damaged file)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"unreadable cache in {directory} ({type(e).__name__}: {e})"
    return meta, ""


def open_tokens(directory: Path, split: str, meta: dict) -> np.ndarray:
    """Read-only memory map of a split's token stream, shape [n_tokens]."""
    n = meta["splits"][split]["n_tokens"]
    if n == 0:
        return np.zeros(0, dtype=meta["dtype"])
    return np.memmap(directory / f"{split}.bin", dtype=meta["dtype"], mode="r", shape=(n,))


def read_documents(directory: Path, split: str) -> list[str]:
    with open(directory / f"{split}.docs.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]
