"""lserve_jax: LServe's unified sparse attention for long-sequence LLM serving, in JAX/Pallas.

The public names are imported on first use, so host-only parts (`lserve_jax.engine`'s page pool
and scheduler, `lserve_jax.inputs`) load without JAX.
"""

import importlib

_PUBLIC = {"LLM": "lserve_jax.llm", "GenerationStats": "lserve_jax.llm",
           "Engine": "lserve_jax.engine.engine", "RequestOutput": "lserve_jax.engine.outputs",
           "CompletionOutput": "lserve_jax.engine.outputs", "Logprob": "lserve_jax.engine.outputs",
           "RequestMetrics": "lserve_jax.engine.outputs", "SamplingParams": "lserve_jax.sampling",
           "SparsityConfig": "lserve_jax.sparsity"}

__all__ = list(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'lserve_jax' has no attribute {name!r}")
