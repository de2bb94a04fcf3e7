"""Tokenizers: raw bytes, a byte-level BPE trained with HF `tokenizers`, or any local tokenizer.json.

All expose the same small interface (`vocab_size`, `encode`, `decode`, `bos_id`, `eos_id`, `pad_id`,
`fingerprint`). `encode` never adds special tokens: packing places BOS/EOS around documents itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)
MIN_BPE_VOCAB = 256 + len(SPECIAL_TOKENS)
# Names other tokenizers give their specials, tried in order when loading a foreign tokenizer.json.
_BOS_NAMES = (BOS, "<s>", "<|begin_of_text|>", "<bos>", "[CLS]", "<|endoftext|>")
_EOS_NAMES = (EOS, "</s>", "<|end_of_text|>", "<eos>", "[SEP]", "<|endoftext|>")
_PAD_NAMES = (PAD, "<pad>", "[PAD]", "<|finetune_right_pad_id|>")
_BPE_FORMAT = "bytelevel-bpe-v1"


class ByteTokenizer:
    """Ids 0..255 are UTF-8 byte values; 256, 257, 258 are BOS, EOS, PAD."""

    vocab_size = 259
    bos_id, eos_id, pad_id = 256, 257, 258
    fingerprint = "byte-v1"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A wrapper over `tokenizers.Tokenizer` with BOS/EOS/PAD resolved to ids."""

    def __init__(self, tok, path: str):
        self._tok = tok
        self.path = path
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = _first_id(tok, _EOS_NAMES)
        if self.eos_id is None:
            raise ValueError(
                f"tokenizer={path!r} has no end-of-document token (looked for {list(_EOS_NAMES)}); "
                f"add one to the tokenizer or use tokenizer='bpe'"
            )
        bos = _first_id(tok, _BOS_NAMES)
        pad = _first_id(tok, _PAD_NAMES)
        # GPT-2-style vocabularies have one <|endoftext|> for both roles.
        self.bos_id = self.eos_id if bos is None else bos
        self.pad_id = self.eos_id if pad is None else pad
        spec = tok.to_str()
        self.fingerprint = hashlib.sha256(spec.encode("utf-8")).hexdigest()
        parsed = json.loads(spec)
        pre = parsed.get("pre_tokenizer") or {}
        # cutting texts into pieces keeps the ids only under plain byte-level pre-tokenization
        self._splittable = (pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
                            and not pre.get("add_prefix_space")
                            and parsed.get("normalizer") is None)

    @classmethod
    def from_file(cls, path: str) -> "HFTokenizer":
        from tokenizers import Tokenizer

        if not os.path.isfile(path):
            raise ValueError(f"tokenizer={path!r} does not exist; give a tokenizer.json path, 'bpe' or 'byte'")
        try:
            tok = Tokenizer.from_file(path)
        except Exception as e:
            raise ValueError(f"tokenizer={path!r} is not a readable tokenizer.json ({e}); fix the file or use 'bpe'") from e
        return cls(tok, path)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Same ids as `encode` per text; long texts are cut into pieces so all cores share the work."""
        pieces, owner = [], []
        for i, text in enumerate(texts):
            for piece in (split_at_word_starts(text) if self._splittable else [text]):
                pieces.append(piece)
                owner.append(i)
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)  # fast: no offsets
        out: list[list[int]] = [[] for _ in texts]
        for i, enc in zip(owner, encode(pieces, add_special_tokens=False)):
            out[i].extend(enc.ids)
        return out

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


_WORD_START = re.compile(r"(?<=\S)(?=\s)")


def split_at_word_starts(text: str, size: int = 4096) -> list[str]:
    """Cut `text` into pieces of about `size` characters, only where a non-space meets a space.

    Byte-level BPE's pre-tokenizer (GPT-2 regex) never joins a non-space character with a following
    space into one pre-token, and its whitespace rules look only ahead, so pieces cut there encode to
    exactly the ids of the whole text. This is only valid for byte-level pre-tokenization; a foreign
    tokenizer.json with another pre-tokenizer is encoded whole.
    """
    pieces, start = [], 0
    while len(text) - start > size:
        m = _WORD_START.search(text, start + size)
        if m is None:
            break
        pieces.append(text[start:m.start()])
        start = m.start()
    pieces.append(text[start:])
    return pieces


def _first_id(tok, names) -> int | None:
    for name in names:
        i = tok.token_to_id(name)
        if i is not None:
            return i
    return None


def show_progress(enabled: bool) -> bool:
    return enabled and sys.stderr.isatty()


def bpe_cache_key(train_hash: str, vocab_size: int) -> str:
    import tokenizers

    spec = {"format": _BPE_FORMAT, "train": train_hash, "vocab_size": vocab_size,
            "specials": SPECIAL_TOKENS, "tokenizers": tokenizers.__version__}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def train_bpe(docs: list[str], vocab_size: int, progress: bool = False):
    """Byte-level BPE over `docs`; all 256 bytes are in the base alphabet so any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tqdm.auto import tqdm

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress(progress),
    )
    bar = tqdm(docs, desc="training BPE", unit="doc", disable=not show_progress(progress))
    tok.train_from_iterator(bar, trainer=trainer, length=len(docs))
    return tok


def build_tokenizer(spec: str, vocab_size: int, train_docs: list[str], train_hash: str,
                    cache_dir: str, progress: bool = False):
    """Return (tokenizer, cache_hit). "bpe" trains on the training documents once per content hash."""
    if spec == "byte":
        return ByteTokenizer(), False
    if spec != "bpe":
        return HFTokenizer.from_file(spec), False
    from tokenizers import Tokenizer

    out = Path(cache_dir) / "tokenizers" / bpe_cache_key(train_hash, vocab_size)
    path = out / "tokenizer.json"
    if path.is_file():
        problem = _cached_problem(path)
        if problem is None:
            try:
                return HFTokenizer(Tokenizer.from_file(str(path)), str(path)), True
            except Exception as error:
                problem = f"it is not a readable tokenizer ({error})"
        log.warning("cached tokenizer %s: %s; training it again from the training split", path, problem)
    tok = train_bpe(train_docs, vocab_size, progress)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"tokenizer.json.tmp{os.getpid()}"
    tok.save(str(tmp))
    digest = _sha256(tmp)
    os.replace(tmp, path)  # atomic, so a concurrent reader never sees half a file
    _write_json(out / CACHED_HASH_FILE, {"sha256": digest})   # after the file: a hash always names a whole file
    return HFTokenizer(tok, str(path)), False


CACHED_HASH_FILE = "tokenizer.sha256.json"   # beside a cached tokenizer.json: its SHA-256 when it was trained


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _cached_problem(path: Path) -> str | None:
    """Why the cached tokenizer at `path` must not be used (None when its bytes are those it was trained
    with): edited after training, or no hash kept (cut off mid-save, or cached before hashes were kept)."""
    try:
        recorded = json.loads((path.parent / CACHED_HASH_FILE).read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no SHA-256 recorded in {CACHED_HASH_FILE} beside it"
    now = _sha256(path)
    if now != recorded:
        return f"it was changed after it was trained (sha256 {recorded[:12]}.. -> {now[:12]}..)"
    return None
