"""Checks of a run's data settings that need the file system but read no corpus: the source exists and is
not empty (local files), is a hub name of the right form (hub: whether the hub answers is a runtime
condition, checked when the data is prepared), the tokenizer file loads, and an explicit model.vocab_size
agrees with the tokenizer, which always sets the model's vocabulary."""

from __future__ import annotations

import os
import re
import threading

from attamba.checks import shown

from pipeline.data import sources
from pipeline.data.prepare import DataConfig
from pipeline.data.tokenizer import ByteTokenizer, HFTokenizer

# "owner/name" or "owner/name:config", as the hub spells dataset ids
HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*(?::[A-Za-z0-9][A-Za-z0-9_.-]*)?")
LIST_TIMEOUT_S = 10.0   # listing a local source longer than this means it is not a corpus folder (e.g. "/")


def _list_files(source: str) -> list[str]:
    """sources.local_files(source), given at most LIST_TIMEOUT_S: a source such as "/" or "/**" would walk
    the whole file system."""
    found: list = []

    def run():
        try:
            found.append(sources.local_files(source))
        except Exception as exc:   # passed on to the caller's thread
            found.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(LIST_TIMEOUT_S)
    if not found:
        raise ValueError(f"data.source={shown(source)}: listing its files took more than {LIST_TIMEOUT_S:.0f} s; "
                         f"point it at the folder, file or glob of the corpus")
    if isinstance(found[0], Exception):
        raise found[0]
    return found[0]


def check_source(data: DataConfig) -> str:
    """The kind of data.source ("bundled", "local", "hub"), checked as the module docstring says."""
    source = data.source
    kind = sources.source_kind(source)
    if kind == "local":
        try:
            files = _list_files(source)
        except ValueError as exc:
            message = str(exc)
            raise ValueError(message if message.startswith("data.") else f"data.{message}") from None
        if all(os.path.getsize(f) == 0 for f in files):
            what = f"the file {files[0]!r} is" if len(files) == 1 else f"all {len(files)} files it names are"
            raise ValueError(f"data.source={shown(source)}: {what} empty; point it at files that hold the corpus, "
                             f"or use data.source=bundled")
    elif kind == "hub" and source not in sources.HUB_ALIASES and not HUB_NAME.fullmatch(source):
        raise ValueError(f"data.source={shown(source)} is no local file, folder or glob (none exists) and no hub "
                         f"dataset name (owner/name or owner/name:config, or one of "
                         f"{', '.join(sources.HUB_ALIASES)}); fix the path or the name, or use data.source=bundled")
    return kind


def tokenizer_size(data: DataConfig) -> int:
    """The vocabulary the run's model will have: the tokenizer's (a tokenizer.json is loaded and checked)."""
    if data.tokenizer == "byte":
        return ByteTokenizer.vocab_size
    if data.tokenizer == "bpe":
        return data.vocab_size
    try:
        tokenizer = HFTokenizer.from_file(data.tokenizer)
    except ValueError as exc:
        raise ValueError(f"data.{exc}") from None
    return tokenizer.vocab_size


def check_vocab(given_model, data: DataConfig, where: str = "") -> None:
    """An explicit model.vocab_size (from the file or an override: `given_model` is the model mapping as
    written) must be the tokenizer's size: the run sets the model's vocabulary from its tokenizer, so any
    other value would be changed silently."""
    given = given_model.get("vocab_size") if isinstance(given_model, dict) else None
    if given is None:
        return
    size = tokenizer_size(data)
    if data.tokenizer == "bpe":
        fix = f"set {where}data.vocab_size={given} for a BPE of that size, or drop {where}model.vocab_size"
    else:
        fix = f"drop {where}model.vocab_size (or set it to {size})"
    if given != size:
        raise ValueError(f"{where}model.vocab_size={shown(given)} but data.tokenizer={data.tokenizer!r} has {size} "
                         f"tokens, and a run's model always takes its tokenizer's vocabulary; {fix}")


def check_data(data: DataConfig) -> None:
    """check_source and the tokenizer file."""
    check_source(data)
    tokenizer_size(data)
