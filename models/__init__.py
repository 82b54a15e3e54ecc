"""Functional Llama models: config, parameter pytree, paged KV cache, forward passes."""

from models.attention import AttentionConfig
from models.config import LlamaConfig, RopeScaling
from models.kv_cache import KVCache, KVCacheSpec
from models.params import init_params, param_shapes

__all__ = ["AttentionConfig", "KVCache", "KVCacheSpec", "LlamaConfig", "RopeScaling",
           "init_params", "param_shapes"]
