"""Host bookkeeping of the serving engine: page ownership and prefix caching (`pages`), request
scheduling with continuous batching, chunked prefill and preemption by recompute (`scheduler`).

Plain Python and NumPy only; no JAX. The device step consumes one `StepPlan` per step.
"""

from lserve_jax.engine.pages import NULL_PAGE, PagePool, block_hash, extra_digest
from lserve_jax.engine.scheduler import (Request, RequestStatus, ScheduledRow, Scheduler,
                                         StepPlan)

__all__ = ["NULL_PAGE", "PagePool", "Request", "RequestStatus", "ScheduledRow", "Scheduler",
           "StepPlan", "block_hash", "extra_digest"]
