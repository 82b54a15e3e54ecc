"""Unified sparse prefill attention (LServe §4): Pallas kernel vs jnp reference vs naive masks.

`TestKernel` runs the Triton kernel in interpret mode on CPU with small tiles so that every tile
boundary (partial sink tile, window start, diagonal, seq_len tail) is exercised; `TestKernelGpu`
runs the same checks natively with the default tiles and longer prompts.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, lower_for_cuda

from pallas_kernels import (
    prefill_tile_counts,
    sparse_prefill_attention,
    sparse_prefill_attention_reference,
)
from pallas_kernels.sparse_prefill import _tile_plan


def make_inputs(seed, batch, t, num_q_heads, num_kv_heads, head_dim, dtype=jnp.float32):
    """Random q, k, v drawn with NumPy: eager jax.random ops would each cost a CPU compile."""
    rng = np.random.default_rng(seed)
    shapes = [(batch, t, h, head_dim) for h in (num_q_heads, num_kv_heads, num_kv_heads)]
    return tuple(jnp.asarray(rng.standard_normal(s, np.float32).astype(dtype)) for s in shapes)


def naive_mask(t, streaming, sink, local, seq_lens, group):
    """[B, Hq, T, T] visibility, written independently of the library (float64 NumPy)."""
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    flags = np.repeat(np.asarray(streaming).astype(bool), group)[None, :, None, None]
    lam = (j < sink) | (j > i - local)
    return (j <= i) & (lam | ~flags) & (j < np.asarray(seq_lens)[:, None, None, None])


def naive_attention(q, k, v, streaming, sink, local, seq_lens=None):
    """Full-mask softmax attention in float64; rows without a visible key come back 0."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, t, num_q_heads, d = q.shape
    group = num_q_heads // k.shape[2]
    seq_lens = np.full(batch, t) if seq_lens is None else seq_lens
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    mask = naive_mask(t, streaming, sink, local, seq_lens, group)
    s = np.where(mask, np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d), -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    p = np.where(mask, np.exp(s - np.where(np.isfinite(m), m, 0.0)), 0.0)
    p /= np.maximum(p.sum(-1, keepdims=True), 1e-300)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def assert_valid_rows_close(out, expected, seq_lens, dtype):
    """Rows inside seq_lens match; every row, padding included, is finite."""
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all(), "non-finite output"
    for b, length in enumerate(np.asarray(seq_lens)):
        assert_close(out[b, :length], np.asarray(expected, np.float32)[b, :length], dtype)


# --- host-side tile plan -------------------------------------------------------------------------

@pytest.mark.parametrize("block_q,block_k", [(16, 16), (32, 16), (16, 32), (64, 32)])
@pytest.mark.parametrize("streaming", [False, True])
def test_tile_plan_visits_exactly_the_needed_tiles(block_q, block_k, streaming):
    """Every tile with a visible key is visited once; unmasked tiles are fully visible."""
    rng = np.random.default_rng(block_q * 7 + block_k + streaming)
    for _ in range(40):
        t_pad = int(rng.integers(1, 9)) * max(block_q, block_k)
        seq_len = int(rng.integers(0, t_pad + 1))
        sink = int(rng.integers(0, t_pad)) if streaming else 0
        local = int(rng.integers(1, t_pad + 1)) if streaming else t_pad
        mask = naive_mask(t_pad, [True], sink, local, [seq_len], 1)[0, 0]
        for q_start in range(0, t_pad, block_q):
            plan = _tile_plan(q_start, seq_len, sink, local, block_q=block_q, block_k=block_k,
                              div=np.floor_divide, xp=np)
            sink_full, sink_end, local_lo, mid_lo, mid_hi, end = (int(x) for x in plan)
            assert 0 <= sink_full <= sink_end <= local_lo <= mid_lo <= mid_hi <= end
            visited = list(range(sink_end)) + list(range(local_lo, end))
            unmasked = set(range(sink_full)) | set(range(mid_lo, mid_hi))
            rows = mask[q_start:q_start + block_q]
            tiles = [rows[:, c * block_k:(c + 1) * block_k] for c in range(t_pad // block_k)]
            needed = [c for c, tile in enumerate(tiles) if tile.any() and q_start < seq_len]
            assert visited == needed, (q_start, seq_len, sink, local)
            assert all(tiles[c].all() for c in unmasked), (q_start, seq_len, sink, local)


def test_tile_counts():
    """Counts equal the number of (q-tile, k-tile) pairs holding at least one visible key."""
    t, bq, bk, sink, local = 1000, 128, 64, 100, 300
    def brute(streaming):
        mask = np.pad(naive_mask(t, [streaming], sink, local, [t], 1)[0, 0], (0, 24))
        return int(mask.reshape(1024 // bq, bq, 1024 // bk, bk).any(axis=(1, 3)).sum())
    assert prefill_tile_counts(t, [0, 1, 1], sink, local, bq, bk) == (brute(0), 2 * brute(1))
    assert brute(1) < brute(0)
    causal = prefill_tile_counts(t, [0], 0, 1, bq, bk)[0]
    assert prefill_tile_counts(t, [1], 64, t - 64, bq, bk) == (0, causal)


# --- the XLA reference against naive masks -------------------------------------------------------

@pytest.mark.parametrize("group,sink,local", [(1, 4, 9), (2, 0, 1), (3, 17, 30), (4, 80, 80)])
def test_reference_matches_naive(group, sink, local):
    q, k, v = make_inputs(1, 2, 77, 2 * group, 2, 16)
    streaming, seq_lens = jnp.array([1, 0]), jnp.array([77, 40], jnp.int32)
    out = jax.jit(sparse_prefill_attention_reference, static_argnames=("sink_tokens",
                  "local_tokens"))(q, k, v, streaming, sink_tokens=sink, local_tokens=local,
                                   seq_lens=seq_lens)
    expected = naive_attention(q, k, v, streaming, sink, local, seq_lens)
    assert_valid_rows_close(out, expected, seq_lens, jnp.float32)


def _largest_intermediate(jaxpr) -> int:
    largest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            largest = max(largest, int(np.prod(getattr(var.aval, "shape", ()))))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    largest = max(largest, _largest_intermediate(sub))
    return largest


def test_xla_impl_long_prompt_is_blockwise():
    """T = 2048: no [T, T] score matrix in the program, and the last rows match a naive check."""
    t, sink, local = 2048, 16, 500
    q, k, v = make_inputs(2, 1, t, 2, 1, 32)
    streaming = jnp.array([1])
    op = lambda q, k, v: sparse_prefill_attention(
        q, k, v, streaming, sink_tokens=sink, local_tokens=local, impl="xla")
    assert _largest_intermediate(jax.make_jaxpr(op)(q, k, v).jaxpr) < t * t
    out = np.asarray(op(q, k, v))
    assert np.isfinite(out).all()
    q, k, v = (np.asarray(x, np.float64)[0] for x in (q, k, v))
    rows = slice(t - 64, t)  # naive attention for the last 64 query rows only
    i = np.arange(t)[rows, None]
    j = np.arange(t)[None, :]
    mask = (j <= i) & ((j < sink) | (j > i - local))
    s = np.where(mask, np.einsum("qhd,kd->hqk", q[rows], k[:, 0]) / np.sqrt(32), -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    expected = np.einsum("hqk,kd->qhd", p / p.sum(-1, keepdims=True), v[:, 0])
    assert_close(out[0, rows], expected, jnp.float32)


# --- the kernel ----------------------------------------------------------------------------------

class TestKernel:
    """Kernel (interpret mode, small tiles) vs the reference, the naive mask and plain causal."""

    interpret = True
    t = 100  # not a multiple of any tile
    tiles = dict(block_q=16, block_k=32)

    def run(self, q, k, v, streaming, sink, local, seq_lens=None, **tiles):
        return sparse_prefill_attention(
            q, k, v, streaming, sink_tokens=sink, local_tokens=local, seq_lens=seq_lens,
            impl="pallas", interpret=self.interpret, **(tiles or self.tiles))

    def reference(self, q, k, v, streaming, sink, local, seq_lens=None):
        # On CPU the float64 naive attention is the oracle: no compile, and the jnp reference is
        # checked against it above. On GPU (subclass) the jnp reference, which scales to long T.
        return naive_attention(q, k, v, streaming, sink, local, seq_lens)

    def ragged(self, batch):
        # Lengths at T, mid-tile, on a tile edge, and an empty sequence (all rows padding).
        return jnp.array([self.t, self.t // 2 + 3, 32, 0][:batch], jnp.int32)

    @pytest.mark.parametrize("group,head_dim,dtype,tiles", [
        (1, 64, jnp.float32, dict(block_q=16, block_k=16)),
        (2, 128, jnp.float32, dict(block_q=32, block_k=16)),
        (3, 80, jnp.float32, dict(block_q=16, block_k=32)),
        (4, 64, jnp.bfloat16, dict(block_q=32, block_k=32)),
        (8, 64, jnp.float16, dict(block_q=16, block_k=16)),
    ])
    def test_mixed_heads_ragged(self, group, head_dim, dtype, tiles):
        """One streaming and one dense KV head per launch; every GQA group size; padded D."""
        num_kv_heads = 2
        q, k, v = make_inputs(3, 4, self.t, group * num_kv_heads, num_kv_heads, head_dim, dtype)
        streaming, seq_lens = jnp.array([1, 0]), self.ragged(4)
        sink, local = 20, 37  # partial sink tile; window start never tile-aligned
        out = self.run(q, k, v, streaming, sink, local, seq_lens, **tiles)
        assert out.shape == q.shape and out.dtype == dtype
        expected = self.reference(q, k, v, streaming, sink, local, seq_lens)
        assert_valid_rows_close(out, expected, seq_lens, dtype)

    @pytest.mark.parametrize("sink,local", [(0, 1), (32, 1), (1, 50)])
    def test_window_extremes(self, sink, local):
        q, k, v = make_inputs(4, 2, self.t, 4, 2, 64)
        streaming, seq_lens = jnp.array([1, 1]), self.ragged(2)
        out = self.run(q, k, v, streaming, sink, local, seq_lens)
        expected = naive_attention(q, k, v, streaming, sink, local, seq_lens)
        assert_valid_rows_close(out, expected, seq_lens, jnp.float32)

    def test_sink_plus_local_covering_prompt_is_dense(self):
        q, k, v = make_inputs(5, 2, self.t, 4, 2, 64)
        seq_lens = self.ragged(2)
        out = self.run(q, k, v, jnp.array([1, 1]), 30, self.t - 30, seq_lens)
        expected = naive_attention(q, k, v, [0, 0], 0, 1, seq_lens)
        assert_valid_rows_close(out, expected, seq_lens, jnp.float32)

    def test_all_dense_is_causal_attention(self):
        q, k, v = make_inputs(6, 2, self.t, 8, 2, 64)
        out = self.run(q, k, v, jnp.array([False, False]), 8, 16)
        causal = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="xla"))
        expected = causal(q, k, v)
        assert_valid_rows_close(out, expected, [self.t] * 2, jnp.float32)


@pytest.mark.gpu
class TestKernelGpu(TestKernel):
    """The same checks natively on the GPU with the default tiles and longer prompts."""

    interpret = False
    t = 1000
    tiles = dict(block_q=None, block_k=None)

    def ragged(self, batch):
        return jnp.array([self.t, self.t // 2 + 3, 128, 0][:batch], jnp.int32)

    def reference(self, q, k, v, streaming, sink, local, seq_lens=None):
        return sparse_prefill_attention(q, k, v, streaming, sink_tokens=sink, local_tokens=local,
                                        seq_lens=seq_lens, impl="xla")

    def run(self, q, k, v, streaming, sink, local, seq_lens=None, **tiles):
        del tiles  # natively the default tiles are the ones to check
        return super().run(q, k, v, streaming, sink, local, seq_lens)

    @pytest.mark.parametrize("head_dim", [64, 96, 128])
    def test_long_prompt_bf16(self, head_dim):
        t, sink, local = 4096, 128, 1000
        q, k, v = make_inputs(8, 2, t, 8, 4, head_dim, jnp.bfloat16)
        streaming = jnp.array([1, 0, 1, 0])
        seq_lens = jnp.array([t, 3001], jnp.int32)
        out = self.run(q, k, v, streaming, sink, local, seq_lens)
        expected = self.reference(q, k, v, streaming, sink, local, seq_lens)
        assert_valid_rows_close(out, expected, seq_lens, jnp.bfloat16)


@pytest.mark.parametrize("dtype,head_dim,tiles", [
    (jnp.bfloat16, 128, {}), (jnp.float16, 64, {}), (jnp.float32, 96, {}),
    (jnp.bfloat16, 64, dict(block_q=16, block_k=16)),
])
def test_kernel_lowers_to_triton(dtype, head_dim, tiles):
    """The Triton lowering runs without a GPU: catches unsupported ops and types on CPU."""
    q = jax.ShapeDtypeStruct((2, 1000, 8, head_dim), dtype)
    kv = jax.ShapeDtypeStruct((2, 1000, 2, head_dim), dtype)
    ints = jax.ShapeDtypeStruct((2,), jnp.int32)
    traced = sparse_prefill_attention.trace(q, kv, kv, ints, sink_tokens=20, local_tokens=37,
                                            seq_lens=ints, **tiles)
    assert "triton" in lower_for_cuda(traced)


# --- argument checking ---------------------------------------------------------------------------

@pytest.mark.parametrize("change,match", [
    (dict(k=jnp.zeros((1, 8, 3, 16)), v=jnp.zeros((1, 8, 3, 16))), "multiple of"),
    (dict(v=jnp.zeros((1, 8, 2, 8))), "same shape"),
    (dict(k=jnp.zeros((1, 9, 2, 16)), v=jnp.zeros((1, 9, 2, 16))), "must be"),
    (dict(q=jnp.zeros((1, 8, 4, 16), jnp.bfloat16)), "share one of"),
    (dict(q=jnp.zeros((1, 8, 4, 16), jnp.int32)), "share one of"),
    (dict(streaming=jnp.zeros((3,), jnp.int32)), "streaming.shape"),
    (dict(streaming=jnp.zeros((2,), jnp.float32)), "bool or integer"),
    (dict(seq_lens=jnp.zeros((2,), jnp.int32)), "seq_lens"),
    (dict(sink_tokens=-1), "sink_tokens"),
    (dict(local_tokens=0), "local_tokens"),
    (dict(impl="cuda"), "impl"),
    (dict(block_q=24), "power of two"),
    (dict(block_k=8), "power of two"),
])
def test_bad_arguments(change, match):
    args = dict(q=jnp.zeros((1, 8, 4, 16)), k=jnp.zeros((1, 8, 2, 16)),
                v=jnp.zeros((1, 8, 2, 16)), streaming=jnp.zeros((2,), jnp.int32),
                sink_tokens=4, local_tokens=4, interpret=True)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        sparse_prefill_attention(**args)
