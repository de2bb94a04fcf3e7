"""The code version a tracked run records (tag schema.TAG_CODE_VERSION): which code produced it."""

from __future__ import annotations

import functools
import subprocess
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "attamba-scaling"   # pyproject.toml's project name
CHECKOUT = Path(__file__).resolve().parents[2]


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The git commit of the checkout this code runs from ("<sha>-dirty" when tracked files are modified);
    without a git checkout (an installed wheel, a copied working folder) the package version, e.g.
    "attamba-scaling 0.1.0"; "unknown" when neither is known. Computed once per process."""
    if (CHECKOUT / ".git").exists():
        try:
            git = ["git", "-C", str(CHECKOUT)]
            sha = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                 check=True).stdout.strip()
            dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                   text=True, timeout=10, check=True).stdout.strip()
            if sha:
                return f"{sha}-dirty" if dirty else sha
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        return f"{DISTRIBUTION} {metadata.version(DISTRIBUTION)}"
    except metadata.PackageNotFoundError:
        return "unknown"
