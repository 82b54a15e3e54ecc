"""Provenance and output of benchmark records (STYLE §12)."""

import json

from lserve_jax.provenance import git_commit

__all__ = ["emit", "git_commit"]


def emit(records: list, f, record: dict) -> None:
    """Keep a record, print it as one JSON line and append that line to the open file `f`."""
    records.append(record)
    line = json.dumps(record)
    print(line, flush=True)
    f.write(line + "\n")
