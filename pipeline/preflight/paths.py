"""Checks of the places a command will write: folders, SQLite databases, before anything is created.

A relative path resolves under its root (the working directory, or $ATTAMBA_HOME for a study's or search's
outputs) and must stay inside it: `../../etc` is refused, `/etc/...` (absolute, so meant) is allowed. Every
path must be text without control characters, within the file system's length limits, not run through an
existing file, and its nearest existing folder must take a new entry: that is tried by making and at once
removing an empty folder there, since permission bits alone do not say it (root, read-only mounts, ACLs).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from attamba.checks import shown, text

from pipeline.tracking.config import sqlite_path

MAX_PATH = 4096    # bytes of a whole path (Linux PATH_MAX)
MAX_NAME = 255     # bytes of one path component (NAME_MAX)
PROBE_PREFIX = ".attamba-write-check-"


def _refuse(field: str, given, problem: str, fix: str):
    raise ValueError(f"{field}={shown(str(given))}: {problem}; {fix}")


def resolve(field: str, given, root: Path | None = None, *, what: str = "folder", inside: bool = True) -> Path:
    """`given` as an absolute, normalised path: text, within the length limits, and, when relative, inside
    `root` (default: the working directory) unless `inside` is false (a path that is only read)."""
    text(field, given, fix=f"a {what} path")
    raw = os.path.expanduser(given)
    if len(os.fsencode(raw)) > MAX_PATH or any(len(os.fsencode(part)) > MAX_NAME for part in Path(raw).parts):
        _refuse(field, given, f"too long (a path holds at most {MAX_PATH} bytes, each name {MAX_NAME})",
                "choose a shorter path")
    if os.path.isabs(raw):
        return Path(os.path.normpath(raw))
    base = Path(os.path.normpath(root or Path.cwd()))
    full = Path(os.path.normpath(base / raw))
    if inside and full != base and base not in full.parents:
        _refuse(field, given, f"leads outside {base} (to {full})",
                f"give a {what} inside it, or the absolute path {full} if that is what you mean")
    return full


def _nearest_existing(field: str, given, path: Path) -> Path:
    """The deepest existing folder on `path`; refused when an existing file stands on the path."""
    probe = path
    while True:
        try:
            exists = probe.exists() or probe.is_symlink()
            is_dir = probe.is_dir()
        except OSError as exc:
            _refuse(field, given, f"{probe} cannot be checked ({exc.strerror or exc})", "choose another path")
        if exists:
            if not is_dir:
                _refuse(field, given, f"{probe} is an existing file, not a folder",
                        "choose another path, or move the file away")
            return probe
        if probe.parent == probe:
            return probe
        probe = probe.parent


def _writable(field: str, given, folder: Path) -> None:
    try:
        os.rmdir(tempfile.mkdtemp(prefix=PROBE_PREFIX, dir=folder))
    except OSError as exc:
        _refuse(field, given, f"the folder {folder} does not take new files ({exc.strerror or exc})",
                "choose a folder you can write to")


def output_dir(field: str, given, root: Path | None = None, *, probe: bool = True) -> Path:
    """A folder a command will create (or write into): checked as the module docstring says. Returns it
    absolute. `probe=False` skips the write test (for many folders under one already tested)."""
    path = resolve(field, given, root)
    nearest = _nearest_existing(field, given, path)
    if probe:
        _writable(field, given, nearest)
    return path


def database_file(field: str, given, db: str, root: Path | None = None) -> Path:
    """The file of a SQLite URL (`given` is the URL, `db` its path part): not a folder, its folder writable
    (SQLite writes a journal beside the database)."""
    path = resolve(field, db, root, what="database file")
    if path.is_dir():
        _refuse(field, given, f"{path} is a folder, not a database file", "name a file, e.g. sqlite:///mlflow.db")
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        _refuse(field, given, f"the database {path} is not readable and writable by this user",
                "choose a database you can write to")
    _writable(field, given, _nearest_existing(field, given, path.parent))
    return path


def database_url(field: str, uri: str, root: Path | None = None) -> None:
    """A database URL: a SQLite one checked as `database_file`; no control characters in any."""
    db = sqlite_path(text(field, uri, fix="a URL such as sqlite:///mlflow.db"))
    if db is not None:
        database_file(field, uri, db, root)


def input_folder(field: str, given) -> Path:
    """A folder that must exist (read, not written)."""
    path = resolve(field, given, what="folder", inside=False)   # only read: anywhere
    if not path.is_dir():
        _refuse(field, given, "no such folder" if not path.exists() else "is not a folder", "give an existing folder")
    return path
