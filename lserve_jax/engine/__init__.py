"""The serving engine: host bookkeeping of page ownership and prefix caching (`pages`), request
scheduling with continuous batching, chunked prefill and preemption by recompute (`scheduler`),
the jitted device steps (`device`) and the `Engine` that joins them (`engine`).

`pages`, `scheduler` and `outputs` (what the engine returns) are plain Python and NumPy and
import without JAX; `Engine` is imported on first use.
"""

import importlib

from lserve_jax.engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from lserve_jax.engine.pages import NULL_PAGE, PagePool, block_hash, extra_digest
from lserve_jax.engine.scheduler import (PrefillWindow, Request, RequestStatus, ScheduledRow,
                                         Scheduler, StepPlan)

_LAZY = {"Engine": "lserve_jax.engine.engine"}

__all__ = ["CompletionOutput", "Logprob", "NULL_PAGE", "PagePool", "PrefillWindow", "Request",
           "RequestMetrics", "RequestOutput", "RequestStatus", "ScheduledRow", "Scheduler",
           "StepPlan", "block_hash", "extra_digest", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lserve_jax.engine' has no attribute {name!r}")
