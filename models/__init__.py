"""Functional Llama models: config, parameter pytree, paged KV cache, forward passes."""

from models.attention import AttentionConfig
from models.config import LlamaConfig, RopeScaling
from models.kv_cache import KVCache, KVCacheSpec
from models.params import init_params, param_shapes
from models.sparsity import SparsityConfig

__all__ = ["AttentionConfig", "KVCache", "KVCacheSpec", "LlamaConfig", "RopeScaling",
           "SparsityConfig", "init_params", "param_shapes"]
