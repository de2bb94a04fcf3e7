"""Tokenized splits on disk: one flat token stream per split, memory-mapped, plus a metadata JSON.

Layout of `<cache_dir>/data/<key>/`:
  `<split>.bin`          tokens, uint16 when the vocabulary fits, else uint32: [BOS] doc [EOS] [BOS] doc [EOS] ...
  `<split>.offsets.npy`  int64 [n_docs + 1]: document i is tokens[offsets[i]:offsets[i+1]] (BOS..EOS included)
  `<split>.docs.jsonl`   the raw documents, one JSON string per line, for evaluators that need text
  `meta.json`            written last: its presence with matching sizes marks a complete cache
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from pipeline.data.sources import SPLITS
from pipeline.data.tokenizer import ByteTokenizer, show_progress

CACHE_FORMAT = 1
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


def write_cache(directory: Path, splits: dict[str, list[str]], tokenizer, meta: dict, progress: bool) -> dict:
    """Tokenize every split into `directory`; meta.json goes last so an interrupted write reads as missing."""
    if directory.exists():
        shutil.rmtree(directory)
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
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
    with open(tmp / "meta.json", "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    try:
        os.replace(tmp, directory)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same cache first
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
