"""Where a measured figure came from: the commit it measured."""

from __future__ import annotations

import os
import pathlib
import subprocess


def git_commit() -> str:
    """Short commit of the tree; `LSERVE_COMMIT` overrides where the tree travels without .git."""
    if os.environ.get("LSERVE_COMMIT"):
        return os.environ["LSERVE_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=pathlib.Path(__file__).parent, check=True)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
