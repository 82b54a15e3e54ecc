"""lserve_jax: LServe's unified sparse attention for long-sequence LLM serving, in JAX/Pallas."""

from lserve_jax.llm import LLM, GenerationStats, RequestOutput
from lserve_jax.sampling import SamplingParams
from lserve_jax.sparsity import SparsityConfig

__all__ = ["LLM", "GenerationStats", "RequestOutput", "SamplingParams", "SparsityConfig"]
