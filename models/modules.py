"""The Llama decoder as Flax NNX modules, used functionally: split into a graph and a state.

    model = modules.Llama.from_params(params)          # or Llama(config, rngs=nnx.Rngs(0))
    graph, state = nnx.split(model)                    # state: a pytree of nnx.Params
    specs = modules.partition_specs(state)             # mesh axes from the logical axes

    @jax.jit
    def step(state, cache, tokens, slots, active):
        return nnx.merge(graph, state).decode(cache, tokens, slots, active, config=config,
                                              attention=attention)

Every parameter carries its logical axis names (`models.parallel.PARAM_AXES`: vocab, embed,
heads, kv_heads, mlp) as NNX metadata, and `partition_specs` maps them to mesh axes through
the one rules table (`models.parallel.RULES`), so the module and the plain pytree of
`models/params.py` are split the same way. The modules hold parameters only: their methods
call the pure functions of models/llama.py (`layer_step` per layer, `prefill`, `decode`) on
`to_params(self)`, so the KV cache stays a pytree that goes in and comes out, and
`llama.forward` / `prefill` / `decode` keep working on a plain params pytree.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import PartitionSpec as P

from models import llama, parallel
from models.config import LlamaConfig
from models.params import LAYER_KEYS, init_params


def _param(value, name: str) -> nnx.Param:
    # Sharding is applied by whoever places the state (the engine, under its mesh), not when
    # the variable is made.
    return nnx.Param(value, sharding_names=parallel.PARAM_AXES[name], eager_sharding=False)


class DecoderLayer(nnx.Module):
    """One decoder layer's parameters (norms, attention and MLP weights) and its step."""

    def __init__(self, layer: dict):
        for name in LAYER_KEYS:
            setattr(self, name, _param(layer[name], name))

    def to_params(self) -> dict:
        return {name: getattr(self, name).value for name in LAYER_KEYS}

    def __call__(self, x, cache, step, *, config, attention, shard=None):
        """`llama.layer_step` on this layer's parameters: (x, the layer's cache view) ->
        (x, cache view)."""
        return llama.layer_step(self.to_params(), x, cache, step, config=config,
                                attention=attention, shard=shard)


class Llama(nnx.Module):
    """The whole decoder: embedding, layers, final norm and (untied) LM head."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs | None = None,
                 params: dict | None = None):
        if params is None:
            key = (rngs or nnx.Rngs(0)).params()
            params = init_params(config, key)
        self.embed = _param(params["embed"], "embed")
        self.final_norm = _param(params["final_norm"], "final_norm")
        self.lm_head = _param(params["lm_head"], "lm_head") if "lm_head" in params else None
        self.layers = nnx.List([DecoderLayer(layer) for layer in params["layers"]])

    @classmethod
    def from_params(cls, params: dict, config: LlamaConfig | None = None) -> Llama:
        """The modules holding a plain params pytree's arrays (not copied)."""
        return cls(config, params=params)

    def to_params(self) -> dict:
        """The plain params pytree (models/params.py) of the module's current values."""
        params = {"embed": self.embed.value, "final_norm": self.final_norm.value,
                  "layers": [layer.to_params() for layer in self.layers]}
        if self.lm_head is not None:
            params["lm_head"] = self.lm_head.value
        return params

    def prefill(self, cache, tokens, seq_lens, slots, **kwargs):
        return llama.prefill(self.to_params(), cache, tokens, seq_lens, slots, **kwargs)

    def prefill_chunk(self, cache, tokens, starts, chunk_lens, slots, **kwargs):
        return llama.prefill_chunk(self.to_params(), cache, tokens, starts, chunk_lens, slots,
                                   **kwargs)

    def decode(self, cache, tokens, slots, active, **kwargs):
        return llama.decode(self.to_params(), cache, tokens, slots, active, **kwargs)


def partition_specs(state: nnx.State, rules=parallel.RULES) -> nnx.State:
    """The PartitionSpec of every parameter of a split state, from its logical axis names
    through `rules`."""
    def spec(variable):
        names = variable.get_metadata().get("sharding_names") or variable.get_metadata().get(
            "out_sharding")
        return parallel.logical_to_spec(tuple(names), rules) if names else P()
    return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
