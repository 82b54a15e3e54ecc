"""Tensor parallelism over a JAX mesh: Megatron-style weight splits run under `jax.shard_map`.

Every parameter carries logical axis names (`PARAM_AXES`: `vocab`, `embed`, `heads`,
`kv_heads`, `mlp`) and one rules table (`RULES`) maps them to mesh axes, so a layout change is
one line (MaxText's way). With TP = N devices on the mesh axis `TP_AXIS`:

    wq, wk, wv, w_gate, w_up   split on their output axis (column parallel): each device
                               computes its own query/KV heads and its slice of the MLP
    wo, w_down                 split on their input axis (row parallel): each device's partial
                               sum, then one all-reduce (`all_reduce`)
    embed, lm_head             split on the vocabulary: a token's row comes from the device
                               that holds it (masked lookup + all-reduce), the logits are
                               gathered (`gather_vocab`)
    norms                      replicated
    KV pools, key statistics,  split on their KV-head axis (each device keeps its heads' pages);
    KV scales, selections      page tables, lengths and the selector clock replicated: the host
                               plans one step for all devices (`cache_specs`)

The model code (models/llama.py) runs per device on local shapes (`local_config`): a decoder
layer of a decode step has exactly two all-reduces (after wo and after w_down), the step one
more for the embedding and one all-gather for the logits (tests/test_parallel.py counts them in
the compiled HLO). Sampling runs replicated on the gathered logits, so every device draws the
same token. The vocabulary and the MLP are zero-padded to a multiple of N (`pad_params`: the
padded logits are dropped, a zero MLP column adds nothing); N must divide the KV heads.

LServe's head split (docs/design.md §7): a layer's KV heads are permuted at load time
(`head_order`, `permute_kv_heads`) so that every device holds the same number of dense heads,
dense ones first, and the dense/streaming pools split evenly; one program (`shard_map` traces
once) then serves every device with the same local head pattern (`local_attention`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from models.attention import AttentionConfig
from models.config import LlamaConfig
from models.kv_cache import KVCache
from models.weight_quant import Int8Weight

TP_AXIS = "tp"
DP_AXIS = "dp"

PARAM_AXES = {  # logical axes of every parameter (models/params.py)
    "embed": ("vocab", "embed"), "lm_head": ("embed", "vocab"), "final_norm": ("embed",),
    "attn_norm": ("embed",), "mlp_norm": ("embed",),
    "wq": ("embed", "heads"), "wk": ("embed", "kv_heads"), "wv": ("embed", "kv_heads"),
    "wo": ("heads", "embed"), "w_gate": ("embed", "mlp"), "w_up": ("embed", "mlp"),
    "w_down": ("mlp", "embed"),
}
RULES = (("vocab", TP_AXIS), ("heads", TP_AXIS), ("kv_heads", TP_AXIS), ("mlp", TP_AXIS),
         ("embed", None))


def logical_to_spec(axes: tuple[str, ...], rules=RULES) -> P:
    """Logical axis names -> the PartitionSpec of their mesh axes under `rules`."""
    table = dict(rules)
    unknown = [a for a in axes if a not in table]
    if unknown:
        raise ValueError(f"logical axes {unknown} have no rule in {rules}")
    return P(*(table[a] for a in axes))


@dataclasses.dataclass(frozen=True)
class Shard:
    """What the per-device model code needs to know of the split (a static jit argument): the
    mesh and its tensor-parallel axis."""

    mesh: Mesh
    axis: str = TP_AXIS

    @property
    def size(self) -> int:
        return self.mesh.shape[self.axis]


def make_mesh(tensor_parallel_size: int, devices=None) -> Mesh:
    """A 1-D mesh of the first `tensor_parallel_size` devices on the axis `TP_AXIS`."""
    devices = list(jax.devices() if devices is None else devices)
    if tensor_parallel_size > len(devices):
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} needs that many devices; "
                         f"{len(devices)} are visible ({devices[0].platform}). On the CPU, set "
                         "XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts")
    return Mesh(np.array(devices[:tensor_parallel_size]), (TP_AXIS,))


def request_host_devices(n: int) -> None:
    """Ask for n CPU host devices (`jax_num_cpu_devices`), so tensor parallelism can run on a
    machine without accelerators. Only possible before JAX starts its backends; afterwards
    (or with a GPU, whose devices are what counts) nothing changes."""
    try:
        if jax.config.jax_num_cpu_devices < n:
            jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # backends already started
        pass


def check_divisible(config: LlamaConfig, n: int) -> None:
    """N devices must each hold the same whole number of KV heads."""
    if config.num_kv_heads % n:
        raise ValueError(f"tensor_parallel_size={n} must divide the model's "
                         f"num_kv_heads={config.num_kv_heads} (each device holds whole KV heads "
                         "and their query heads; KV heads are not replicated)")


def _padded(size: int, n: int) -> int:
    return -(-size // n) * n


def local_config(config: LlamaConfig, n: int) -> LlamaConfig:
    """The config one of N devices runs (its heads, its slice of the padded MLP); the
    vocabulary stays global (logits are gathered, then cut to it)."""
    check_divisible(config, n)
    return dataclasses.replace(config, num_heads=config.num_heads // n,
                               num_kv_heads=config.num_kv_heads // n,
                               intermediate_size=_padded(config.intermediate_size, n) // n)


def pad_params(params: dict, config: LlamaConfig, n: int) -> dict:
    """Zero-pad the vocabulary (embed rows, lm_head columns) and the MLP width (w_gate, w_up
    columns, w_down rows) to multiples of n. Exact: padded logits are cut after the gather, and
    a zero MLP column gives silu(0) * 0 = 0. Float weights only (pad before quantizing)."""
    def pad(x, axis, size):
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, size - x.shape[axis])
        return jnp.pad(x, widths) if size != x.shape[axis] else x

    v, i = _padded(config.vocab_size, n), _padded(config.intermediate_size, n)
    out = {**params, "embed": pad(params["embed"], 0, v)}
    if "lm_head" in params:
        out["lm_head"] = pad(params["lm_head"], 1, v)
    out["layers"] = [{**layer, "w_gate": pad(layer["w_gate"], 1, i),
                      "w_up": pad(layer["w_up"], 1, i), "w_down": pad(layer["w_down"], 0, i)}
                     for layer in params["layers"]]
    return out


def head_order(streaming: tuple[bool, ...], n: int) -> tuple[int, ...]:
    """A layer's KV heads reordered so that device i of n holds dense heads then streaming
    heads, the same number of each on every device: new head j is old head order[j]. The
    layer's dense count must be a multiple of n (`head_pattern.balance_for_devices`)."""
    dense = [h for h, s in enumerate(streaming) if not s]
    stream = [h for h, s in enumerate(streaming) if s]
    if len(dense) % n or len(stream) % n:
        raise ValueError(f"{len(dense)} dense and {len(stream)} streaming heads do not split "
                         f"evenly over {n} devices; balance the pattern first")
    d, s = len(dense) // n, len(stream) // n
    return tuple(h for i in range(n) for h in dense[i * d:(i + 1) * d] + stream[i * s:(i + 1) * s])


def permute_kv_heads(params: dict, config: LlamaConfig, orders) -> dict:
    """The same model with each layer's KV heads in `orders[layer]` (new head j = old head
    orders[layer][j]): the columns of wk and wv, the query-head groups of wq and the matching
    rows of wo move together, so the model computes the same function (float weights)."""
    d, g = config.head_dim, config.group_size
    layers = []
    for layer, order in zip(params["layers"], orders):
        order = np.asarray(order)
        kv_cols = (order[:, None] * d + np.arange(d)).reshape(-1)
        q_heads = (order[:, None] * g + np.arange(g)).reshape(-1)
        q_cols = (q_heads[:, None] * d + np.arange(d)).reshape(-1)
        layers.append({**layer, "wq": layer["wq"][:, q_cols], "wk": layer["wk"][:, kv_cols],
                       "wv": layer["wv"][:, kv_cols], "wo": layer["wo"][q_cols]})
    return {**params, "layers": layers}


def permute_pattern(streaming, orders) -> tuple[tuple[bool, ...], ...]:
    """Head flags [layer][kv_head] in the permuted order."""
    return tuple(tuple(row[h] for h in order) for row, order in zip(streaming, orders))


def split_model(params: dict, config: LlamaConfig, streaming_heads, n: int):
    """The model laid out for n devices: each layer's KV heads in `head_order` of its
    (balanced) flags, then the vocabulary and MLP padded (`pad_params`). Returns (params, the
    flags in the new order, the per-layer orders); without flags (every head dense) the heads
    keep their order and the last two are None. Float weights (quantize afterwards)."""
    orders = None
    if streaming_heads is not None:
        orders = [head_order(row, n) for row in streaming_heads]
        params = permute_kv_heads(params, config, orders)
        streaming_heads = permute_pattern(streaming_heads, orders)
    return pad_params(params, config, n), streaming_heads, orders


def local_attention(attention: AttentionConfig, n: int) -> AttentionConfig:
    """The attention config every device runs: the first device's block of each layer's
    (permuted) head flags, which must equal every other device's."""
    if attention.streaming_heads is None:
        return attention
    local = []
    for layer, row in enumerate(attention.streaming_heads):
        h = len(row) // n
        blocks = {tuple(row[i * h:(i + 1) * h]) for i in range(n)}
        if len(blocks) != 1:
            raise ValueError(f"layer {layer}: devices would hold different head patterns "
                             f"{sorted(blocks)}; permute the heads first (head_order)")
        local.append(tuple(row[:h]))
    return dataclasses.replace(attention, streaming_heads=tuple(local))


# ---------------------------------------------------------------------------- specs
def param_specs(params: dict) -> dict:
    """The PartitionSpec of every leaf of a params pytree (float arrays or Int8Weights: q as
    the weight, its per-output-channel scale as the weight's output axis)."""
    def spec(name, x):
        s = logical_to_spec(PARAM_AXES[name])
        if isinstance(x, Int8Weight):
            return Int8Weight(q=s, scale=P(s[1]))
        return s

    out = {name: spec(name, x) for name, x in params.items() if name != "layers"}
    out["layers"] = [{name: spec(name, x) for name, x in layer.items()}
                     for layer in params["layers"]]
    return out


def cache_specs(cache: KVCache) -> KVCache:
    """The PartitionSpec of every leaf of a KV cache: pools, statistics, scales and smoothing
    factors on their KV-head axis (the first), selections on theirs (the second), everything
    else replicated."""
    # A pool of a layer without heads of its kind is empty: replicated (XLA returns empty
    # arrays unsplit, and a step's outputs must come back as its inputs went in).
    def split(x, axis):
        return P(*(None,) * axis, TP_AXIS) if x.shape[axis] else P()

    by_field = {f.name: P() for f in dataclasses.fields(cache)}
    for name in ("k", "v", "kmax", "kmin", "sk", "sv", "k_scale", "v_scale", "sk_scale",
                 "sv_scale", "k_smooth", "v_smooth", "sk_smooth", "sv_smooth"):
        by_field[name] = tuple(split(x, 0) for x in getattr(cache, name))
    by_field["selected"] = tuple(split(x, 1) for x in cache.selected)
    return cache.replace(**by_field)


def place(tree, specs, mesh: Mesh):
    """`tree` put on `mesh` as `specs` say (NamedShardings)."""
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                             is_leaf=lambda x: isinstance(x, P))
    return jax.device_put(tree, shardings)


# ---------------------------------------------------------------------------- collectives
def all_reduce(x: jax.Array, shard: Shard | None) -> jax.Array:
    """Sum of the devices' partial results (row-parallel wo and w_down); x itself at TP=1."""
    return x if shard is None else jax.lax.psum(x, shard.axis)


def embed_tokens(embed: jax.Array, tokens: jax.Array, shard: Shard | None) -> jax.Array:
    """embed [V(/N), E] rows of tokens [...] -> [..., E]: each device looks up the tokens in its
    slice of the vocabulary (zeros for the others) and the slices are summed."""
    if shard is None:
        return embed[tokens]
    rows = embed.shape[0]
    local = tokens - jax.lax.axis_index(shard.axis) * rows
    inside = (local >= 0) & (local < rows)
    x = jnp.where(inside[..., None], embed[jnp.clip(local, 0, rows - 1)], 0)
    return jax.lax.psum(x, shard.axis)


def gather_vocab(logits: jax.Array, shard: Shard | None, vocab_size: int) -> jax.Array:
    """logits [..., V/N] of this device's vocabulary slice -> [..., V] on every device."""
    if shard is None:
        return logits
    full = jax.lax.all_gather(logits, shard.axis, axis=logits.ndim - 1, tiled=True)
    return full[..., :vocab_size]
