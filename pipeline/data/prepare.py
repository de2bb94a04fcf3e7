"""The data pipeline's front door: `DataConfig` and `prepare(config) -> PreparedData`.

`prepare` does all the work up front (read, split, train or load the tokenizer, tokenize, pack, cache)
and raises a ValueError before any training compute when something is wrong. Reruns with the same
corpus, tokenizer and settings reuse the on-disk caches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from attamba.checks import boolean, fail, in_range, integer, seed, text

from pipeline.data import cache as data_cache
from pipeline.data import sources as data_sources
from pipeline.data.loader import TrainBatches, eval_batches, num_sequences
from pipeline.data.mqar_source import SOURCE as MQAR_SOURCE, MQARConfig, MQARData, check as check_mqar
from pipeline.data.sources import SPLITS
from pipeline.data.tokenizer import MIN_BPE_VOCAB, build_tokenizer

log = logging.getLogger(__name__)

CACHE_ENV = "ATTAMBA_CACHE"


@dataclass(frozen=True)
class DataConfig:
    source: str = "bundled"          # "bundled" | "mqar" (synthetic recall task, data.mqar) | hub name
                                     # ("owner/name[:config]" or alias) | file, directory or glob
    text_field: str = "text"         # column holding the text in jsonl/parquet/hub rows
    tokenizer: str = "bpe"           # "bpe" (trained on the train split) | "byte" | path to a tokenizer.json
    vocab_size: int = 4096           # BPE vocabulary size, special tokens included (ignored by the others)
    seq_len: int = 256               # T: training rows hold T + 1 tokens
    val_fraction: float = 0.05       # fraction of documents in the validation split
    test_fraction: float = 0.05      # fraction of documents in the test split
    seed: int = 0                    # split assignment and per-epoch shuffling
    cache_dir: str | None = None     # None: $ATTAMBA_CACHE, else ./.cache/attamba
    max_documents: int | None = None  # keep at most this many documents (hub sources: 100k when None)
    progress: bool = True            # tqdm bars for long steps (shown only on a terminal)
    # source=mqar only: pairs, vocabulary (the model's), query gap law, validation set size; seq_len is T, seed
    # seeds the training stream and the fixed validation and test sets. The text fields above are unused.
    mqar: MQARConfig = field(default_factory=MQARConfig)

    def __post_init__(self):
        for name in ("source", "text_field", "tokenizer"):
            text(name, getattr(self, name))
        if self.tokenizer not in ("bpe", "byte") and not self.tokenizer.endswith(".json"):
            fail("tokenizer", self.tokenizer, "'bpe', 'byte' or a path to a tokenizer.json")
        integer("vocab_size", self.vocab_size, MIN_BPE_VOCAB, 2**32,
                fix=f"a BPE vocabulary holds the 256 bytes and BOS/EOS/PAD, so at least {MIN_BPE_VOCAB} entries")
        integer("seq_len", self.seq_len, 1)
        for name in ("val_fraction", "test_fraction"):
            in_range(name, getattr(self, name), 0, 1, high_open=True)
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"val_fraction + test_fraction must be < 1 to leave training data, got "
                f"{self.val_fraction} + {self.test_fraction}; lower one of them"
            )
        seed("seed", self.seed)
        integer("max_documents", self.max_documents, 1, or_none=True)
        text("cache_dir", self.cache_dir, or_none=True, fix="a folder path, or None for the default")
        boolean("progress", self.progress)
        if self.source == MQAR_SOURCE:
            check_mqar(self.mqar, self.seq_len)
        elif self.mqar != MQARConfig():
            fail("mqar", asdict(self.mqar), f"left out with source={self.source!r}", f"it sets the synthetic task "
                 f"of source={MQAR_SOURCE!r}; remove data.mqar or set data.source={MQAR_SOURCE}")


def cache_root(config: DataConfig) -> Path:
    """config.cache_dir, else $ATTAMBA_CACHE, else .cache/attamba under the working directory."""
    return Path(config.cache_dir or os.environ.get(CACHE_ENV) or Path.cwd() / ".cache" / "attamba")


def bits_per_byte(nll_sum_nats: float, n_bytes: int) -> float:
    """Total negative log-likelihood (nats, summed over predicted tokens) -> bits per UTF-8 byte."""
    return nll_sum_nats / (math.log(2) * n_bytes)


class PreparedData:
    """Tokenizer plus memory-mapped token streams of the train/validation/test splits."""

    def __init__(self, config: DataConfig, directory: Path, meta: dict, tokenizer,
                 cache_hit: bool, tokenizer_cache_hit: bool):
        self.config, self.directory, self.meta, self.tokenizer = config, directory, meta, tokenizer
        self.cache_hit, self.tokenizer_cache_hit = cache_hit, tokenizer_cache_hit
        self._tokens = {s: data_cache.open_tokens(directory, s, meta) for s in SPLITS}

    vocab_size = property(lambda self: self.tokenizer.vocab_size)
    bos_id = property(lambda self: self.tokenizer.bos_id)
    eos_id = property(lambda self: self.tokenizer.eos_id)
    pad_id = property(lambda self: self.tokenizer.pad_id)
    seq_len = property(lambda self: self.config.seq_len)

    def tokens(self, split: str) -> np.ndarray:
        """The split's packed token stream [n_tokens] (read-only memmap)."""
        return self._tokens[_check_split(split)]

    def num_sequences(self, split: str) -> int:
        return num_sequences(len(self.tokens(split)), self.config.seq_len)

    def batches(self, split: str = "train", batch_size: int = 8, rank: int = 0, world_size: int = 1,
                start: int = 0, seed: int | None = None) -> TrainBatches:
        """Endless shuffled batches [batch_size, seq_len + 1]; `.position` is the resumable state."""
        seed = self.config.seed if seed is None else seed
        return TrainBatches(self.tokens(split), self.config.seq_len, batch_size, rank, world_size, start, seed)

    def eval_batches(self, split: str = "validation", batch_size: int = 8, rank: int = 0, world_size: int = 1):
        """Each sequence of the split once, in order: [<= batch_size, seq_len + 1]."""
        return eval_batches(self.tokens(split), self.config.seq_len, batch_size, rank, world_size)

    def documents(self, split: str) -> list[str]:
        """The raw text of the split's documents, in packing order."""
        return data_cache.read_documents(self.directory, _check_split(split))

    def document_tokens(self, split: str) -> list[np.ndarray]:
        """Each document's tokens as packed: [BOS, ..., EOS] (views into the memmap)."""
        offsets = np.load(self.directory / f"{_check_split(split)}.offsets.npy")
        tokens = self.tokens(split)
        return [tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:])]

    def n_bytes(self, split: str) -> int:
        """UTF-8 bytes of the split's document text (the denominator of bits per byte)."""
        return self.meta["splits"][_check_split(split)]["n_bytes"]

    def bytes_per_token(self, split: str) -> float:
        """UTF-8 bytes per text token (BOS/EOS excluded): bpb = loss_nats / ln 2 / bytes_per_token."""
        info = self.meta["splits"][_check_split(split)]
        return info["n_bytes"] / max(1, info["n_text_tokens"])


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    return split


def _read_documents(config: DataConfig, root: Path) -> list[str]:
    kind = data_sources.source_kind(config.source)
    hf_cache = str(root / "hf_datasets")
    if kind == "bundled":
        docs = data_sources.load_files(data_sources.bundled_files(), config.text_field, hf_cache, config.progress)
    elif kind == "local":
        files = data_sources.local_files(config.source)
        docs = data_sources.load_files(files, config.text_field, hf_cache, config.progress)
    else:
        docs = _hub_documents(config, root, hf_cache)
    return docs[:config.max_documents] if config.max_documents else docs


def _hub_download_path(config: DataConfig, root: Path) -> Path:
    spec = json.dumps([config.source, config.text_field, config.max_documents])
    return root / "hub" / (hashlib.sha256(spec.encode()).hexdigest()[:20] + ".jsonl")


def _hub_documents(config: DataConfig, root: Path, hf_cache: str) -> list[str]:
    """Hub documents, downloaded once and kept as JSONL (with its SHA-256 beside it) so later runs (even
    offline ones) skip the hub; a kept file that no longer matches its hash is downloaded again."""
    path = _hub_download_path(config, root)
    digest_path = path.with_suffix(".sha256")
    if path.is_file():
        recorded = digest_path.read_text().strip() if digest_path.is_file() else None
        now = data_cache.file_sha256(path)
        if recorded == now:
            with open(path, encoding="utf-8") as f:
                return [json.loads(line) for line in f]
        log.warning("downloaded corpus %s %s; downloading it again", path,
                    f"was changed after download (sha256 {recorded[:12]}.. -> {now[:12]}..)" if recorded
                    else "has no SHA-256 beside it")
        data_sources.check_hub(config.source)
    docs = data_sources.load_hub(config.source, config.text_field, config.max_documents, hf_cache, config.progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    digest = data_cache.file_sha256(tmp)
    os.replace(tmp, path)
    digest_path.write_text(digest + "\n")
    return docs


def _early_checks(config: DataConfig, max_seq_len: int | None, root: Path) -> None:
    if max_seq_len is not None and config.seq_len > max_seq_len:
        raise ValueError(
            f"seq_len={config.seq_len} exceeds the model's max_seq_len={max_seq_len}; "
            f"lower data.seq_len or raise the model's max_seq_len"
        )
    if config.source == MQAR_SOURCE:
        return
    if config.tokenizer not in ("bpe", "byte") and not os.path.isfile(config.tokenizer):
        raise ValueError(f"tokenizer={config.tokenizer!r} does not exist; give a tokenizer.json path, 'bpe' or 'byte'")
    if data_sources.source_kind(config.source) == "hub":
        if not _hub_download_path(config, root).is_file():
            data_sources.check_hub(config.source)


def _file_digest(path: str | None) -> str | None:
    return data_cache.file_sha256(Path(path)) if path and os.path.isfile(path) else None


def prepare(config: DataConfig, max_seq_len: int | None = None) -> PreparedData | MQARData:
    """Read, split, tokenize, pack and cache; raise ValueError on any problem before training starts.
    For source=mqar: the synthetic task's streams (MQARData), nothing read or cached."""
    root = cache_root(config)
    _early_checks(config, max_seq_len, root)
    if config.source == MQAR_SOURCE:
        return MQARData(config)
    raw = _read_documents(config, root)
    docs = [d for d in raw if d.strip()]
    if not docs:
        raise ValueError(
            f"source={config.source!r} has no text after reading ({len(raw)} documents, all empty); "
            f"check the files and text_field={config.text_field!r}, or use source='bundled'"
        )
    splits = data_sources.split_documents(docs, config.val_fraction, config.test_fraction, config.seed)
    train_hash = data_sources.content_hash(splits["train"])
    tokenizer, tok_hit = build_tokenizer(config.tokenizer, config.vocab_size, splits["train"], train_hash,
                                         str(root), config.progress)
    spec = {"corpus": data_sources.content_hash(docs), "tokenizer": tokenizer.fingerprint,
            "val_fraction": config.val_fraction, "test_fraction": config.test_fraction, "seed": config.seed,
            "format": data_cache.CACHE_FORMAT}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]
    directory = root / "data" / key
    meta, reason = data_cache.read_cache(directory, key)
    cache_hit = meta is not None
    if not cache_hit:
        with data_cache.build_lock(directory):   # another process may be building this very cache
            meta, reason = data_cache.read_cache(directory, key)
            cache_hit = meta is not None
            if not cache_hit:
                if reason != "no cache yet":
                    log.warning("rebuilding the token cache in %s: %s", directory, reason)
                meta = dict(spec, key=key, source=config.source, tokenizer_spec=config.tokenizer,
                            tokenizer_sha256=_file_digest(getattr(tokenizer, "path", None)))
                meta = data_cache.write_cache(directory, splits, tokenizer, meta, config.progress)
    data = PreparedData(config, directory, meta, tokenizer, cache_hit, tok_hit)
    if data.num_sequences("train") < 1:
        raise ValueError(
            f"the train split has {meta['splits']['train']['n_tokens']} tokens, fewer than seq_len + 1 = "
            f"{config.seq_len + 1}; lower seq_len or add documents"
        )
    return data
