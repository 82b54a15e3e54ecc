"""Paged decode attention (LServe §4): split-K kernel vs jnp reference vs brute force.

Page lists are built the way the model builds them: shuffled physical pages, dense-style entries
covering a ragged length, a ring-style suffix [x, S) and prefix [0, y), and trailing padding
entries on the null page 0. `TestKernel` runs the Triton kernel in interpret mode on CPU;
`TestKernelGpu` runs the same checks natively plus a long list.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, lower_for_cuda

from pallas_kernels import (
    quant,
    default_num_splits,
    paged_decode_attention,
    paged_decode_attention_reference,
    pooled_decode_attention,
)
from pallas_kernels.paged_decode import _merge_splits


def make_case(seed, *, batch=2, num_kv_heads=2, group=4, per_query_head=False, head_dim=64,
              page_size=16, num_entries=7, dtype=jnp.float32):
    """Random q, pools and page lists (NumPy: eager jax.random ops would each cost a compile).

    per_query_head=False: H = Hkv lists of G = group rows; True: H = Hq lists of one row.
    List (batch - 1, 0) is all padding. Returns (q, k_pages, v_pages, pages, lo, hi).
    """
    rng = np.random.default_rng(seed)
    num_lists = num_kv_heads * (group if per_query_head else 1)
    rows = 1 if per_query_head else group
    num_pages = 1 + batch * num_lists * num_entries
    q = rng.standard_normal((batch, num_lists, rows, head_dim), np.float32)
    pools = rng.standard_normal((2, num_kv_heads, num_pages, page_size, head_dim), np.float32)
    pools[:, :, 0] *= 100.0  # the null page: would be visible in the output if it leaked in
    free = iter(rng.permutation(np.arange(1, num_pages)))
    pages, lo, hi = (np.zeros((batch, num_lists, num_entries), np.int32) for _ in range(3))
    for b in range(batch):
        for h in range(num_lists):
            entries = []
            if (b, h) != (batch - 1, 0):
                length = int(rng.integers(1, (num_entries - 2) * page_size + 1))
                for start in range(0, length, page_size):  # dense-style, ragged last page
                    entries.append((next(free), 0, min(page_size, length - start)))
                if rng.random() < 0.7:  # ring-style: oldest page's suffix, newest's prefix
                    entries.append((next(free), int(rng.integers(0, page_size)), page_size))
                    entries.append((next(free), 0, int(rng.integers(1, page_size + 1))))
                entries = [entries[i] for i in rng.permutation(len(entries))]
            # Padding: empty (lo == hi) and reversed (hi < lo) entries on the null page.
            entries += [(0, 0, 0) if i % 2 else (0, page_size, 3)
                        for i in range(num_entries - len(entries))]
            pages[b, h], lo[b, h], hi[b, h] = np.array(entries, np.int32).T
    return (jnp.asarray(q.astype(dtype)), jnp.asarray(pools[0].astype(dtype)),
            jnp.asarray(pools[1].astype(dtype)), jnp.asarray(pages), jnp.asarray(lo),
            jnp.asarray(hi))


def brute_force(q, k_pages, v_pages, pages, lo, hi, sm_scale=None):
    """Explicit list of visible (page, offset) keys per list, plain softmax in float64."""
    q, k_pages, v_pages = (np.asarray(x, np.float64) for x in (q, k_pages, v_pages))
    pages, lo, hi = (np.asarray(x) for x in (pages, lo, hi))
    batch, num_lists, rows, d = q.shape
    group = num_lists // k_pages.shape[0]
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    out = np.zeros(q.shape)
    for b in range(batch):
        for h in range(num_lists):
            keys = [(p, o) for p, a, z in zip(pages[b, h], lo[b, h], hi[b, h])
                    for o in range(a, z)]
            if not keys:
                continue
            k = np.stack([k_pages[h // group, p, o] for p, o in keys])  # [N, D]
            v = np.stack([v_pages[h // group, p, o] for p, o in keys])
            s = q[b, h] @ k.T * sm_scale  # [G, N]
            w = np.exp(s - s.max(-1, keepdims=True))
            out[b, h] = (w / w.sum(-1, keepdims=True)) @ v
    return out


def poison_invisible(case):
    """The case with NaN in every key and value slot no list sees (outside each entry's
    [lo, hi), the null page included): stale or non-finite data of freed pages."""
    q, k_pages, v_pages, pages, lo, hi = case
    seen = np.zeros(k_pages.shape[1:3], bool)  # [P, S]
    for p, a, z in zip(np.asarray(pages).ravel(), np.asarray(lo).ravel(), np.asarray(hi).ravel()):
        seen[p, a:max(a, z)] = True
    poison = lambda x: jnp.where(jnp.asarray(seen)[None, :, :, None], x, jnp.nan)  # noqa: E731
    return q, poison(k_pages), poison(v_pages), pages, lo, hi


reference = jax.jit(paged_decode_attention_reference, static_argnames=("sm_scale",))


def quantize_pools(k_pages, v_pages, kv_format, seed=0):
    """Float pools as an int8, fp8 or int4 pool tuple (the formats of
    `pooled_decode_attention`), with random per-(head, channel) factors: int8 / fp8 scales,
    int4 smoothing factors."""
    rng = np.random.default_rng(seed)
    heads, d = k_pages.shape[0], k_pages.shape[3]
    if kv_format in ("int8", "fp8"):  # about 4 standard deviations of N(0, 1) at 127 (or 448)
        ks, vs = (quant.static_scale(kv_format, jnp.asarray(rng.uniform(0.02, 0.04, (heads, d)),
                                                            jnp.float32)) for _ in "kv")
        dtype = quant.pool_dtype(kv_format)
        return (quant.quantize_scaled(k_pages, ks[:, None, None], dtype),
                quant.quantize_scaled(v_pages, vs[:, None, None], dtype), ks, vs)
    ks, vs = (jnp.asarray(rng.uniform(0.5, 2.0, (heads, d)), jnp.float32) for _ in "kv")
    kp, ka, kz = quant.quantize_int4(k_pages.astype(jnp.float32) / ks[:, None, None])
    vp, va, vz = quant.quantize_int4(v_pages.astype(jnp.float32) / vs[:, None, None])
    return kp, vp, jnp.stack([ka, kz], -1), jnp.stack([va, vz], -1), ks, vs


def dequantize_pools(pool):
    """The float (k, v) pools a quantized pool tuple stands for (f32)."""
    if len(pool) == 4:
        return tuple(quant.dequantize_int8(x, f[:, None, None]) for x, f in
                     ((pool[0], pool[2]), (pool[1], pool[3])))
    return tuple(quant.dequantize_int4(x, m[..., 0], m[..., 1]) * f[:, None, None]
                 for x, m, f in ((pool[0], pool[2], pool[4]), (pool[1], pool[3], pool[5])))


# --- the XLA reference against brute force -------------------------------------------------------

@pytest.mark.parametrize("group,per_query_head,page_size,head_dim", [
    (1, False, 4, 8), (3, False, 8, 16), (4, True, 16, 8), (2, True, 5, 12),
])
def test_reference_matches_brute_force(group, per_query_head, page_size, head_dim):
    case = make_case(10 + group, batch=3, num_kv_heads=2, group=group,
                     per_query_head=per_query_head, head_dim=head_dim, page_size=page_size,
                     num_entries=6)
    out = reference(*case)
    assert np.isfinite(np.asarray(out)).all()
    assert_close(out, brute_force(*case), jnp.float32)
    assert_close(reference(*case, sm_scale=0.3), brute_force(*case, sm_scale=0.3), jnp.float32)


@pytest.mark.parametrize("kv_format", ["int8", "int4", "fp8"])
def test_reference_reads_quantized_pages(kv_format):
    """The XLA path over int8 / int4 pages equals brute force over their dequantized values."""
    q, k, v, pages, lo, hi = make_case(15, batch=3, group=2, head_dim=16, page_size=8)
    pool = quantize_pools(k, v, kv_format)
    sources = tuple((0, h) for h in range(q.shape[1]))  # one list per KV head
    out = pooled_decode_attention(q, (pool,), pages, lo, hi, sources=sources, impl="xla")
    assert_close(out, brute_force(q, *dequantize_pools(pool), pages, lo, hi), jnp.float32)


def test_reference_ignores_nan_in_slots_no_list_sees():
    case = make_case(34, group=2)
    assert_close(reference(*poison_invisible(case)), reference(*case), jnp.float32)


def test_hi_past_page_end_is_the_page_end():
    """A full-page entry written as [0, S + 5) reads the same keys as [0, S)."""
    q, k, v, pages, lo, hi = make_case(11, page_size=8, head_dim=16)
    out = paged_decode_attention(q, k, v, pages, lo, jnp.where(hi == 8, 13, hi), impl="xla")
    assert_close(out, reference(q, k, v, pages, lo, hi), jnp.float32)


def truncate(case, num_entries):
    """The case with every entry at or past `num_entries` [B, H] turned into a live-looking
    entry (a real page, lo < hi) that only `num_entries` keeps out, plus the brute force of
    what should be read."""
    q, k, v, pages, lo, hi = case
    column = np.arange(pages.shape[2])
    dead = column[None, None, :] >= np.asarray(num_entries)[..., None]
    garbage = np.where(dead, 1 + column % (k.shape[1] - 1), np.asarray(pages))
    expected = brute_force(q, k, v, pages, lo, np.where(dead, 0, np.asarray(hi)))
    trap = (q, k, v, jnp.asarray(garbage, jnp.int32), jnp.where(dead, 0, lo),
            jnp.where(dead, k.shape[2], hi))
    return trap, expected


def two_pool_case(seed, *, batch=2, group=4, per_query_head=False, head_dim=64, page_size=16,
                  dtype=jnp.float32):
    """A layer of 3 KV heads, 0 and 2 in a "dense" pool of 2 heads, 1 in a "streaming" pool of
    1 head with a different page count. Returns (q, pools, pages, lo, hi, num_entries,
    sources, expected), expected by brute force per pool."""
    rng = np.random.default_rng(seed)
    dense = make_case(seed, batch=batch, num_kv_heads=2, group=group,
                      per_query_head=per_query_head, head_dim=head_dim, page_size=page_size,
                      num_entries=7, dtype=dtype)
    stream = make_case(seed + 1, batch=batch, num_kv_heads=1, group=group,
                       per_query_head=per_query_head, head_dim=head_dim, page_size=page_size,
                       num_entries=7, dtype=dtype)
    lists = group if per_query_head else 1  # lists per KV head
    # KV-head order 0 (dense 0), 1 (stream 0), 2 (dense 1); lists of a head are consecutive.
    parts = [(dense, 0), (stream, 0), (dense, 1)]
    sources = tuple((int(case is stream), head) for case, head in parts for _ in range(lists))
    index = [slice(head * lists, (head + 1) * lists) for _, head in parts]
    q, pages, lo, hi = (jnp.concatenate([case[i][:, sl] for (case, _), sl in zip(parts, index)],
                                        axis=1) for i in (0, 3, 4, 5))
    num_entries = jnp.asarray(rng.integers(0, 8, (batch, q.shape[1])), jnp.int32)
    expected = np.zeros(q.shape)
    live = np.arange(7)[None, None, :] < np.asarray(num_entries)[..., None]
    for h, (pool, head) in enumerate(sources):
        case = stream if pool else dense
        expected[:, h:h + 1] = brute_force(
            q[:, h:h + 1], case[1][head:head + 1], case[2][head:head + 1], pages[:, h:h + 1],
            lo[:, h:h + 1], np.where(live[:, h:h + 1], hi[:, h:h + 1], 0))
    pools = ((dense[1], dense[2]), (stream[1], stream[2]))
    return q, pools, pages, lo, hi, num_entries, sources, expected


def test_reference_num_entries_and_two_pools():
    case = make_case(13, batch=3, group=2, num_entries=6)
    num_entries = jnp.asarray(np.random.default_rng(0).integers(0, 7, (3, 2)), jnp.int32)
    trap, expected = truncate(case, num_entries)
    assert_close(reference(*trap, num_entries), expected, jnp.float32)
    for per_query_head in (False, True):
        q, pools, pages, lo, hi, n, sources, expected = two_pool_case(
            14, per_query_head=per_query_head)
        out = pooled_decode_attention(q, pools, pages, lo, hi, n, sources=sources, impl="xla")
        assert_close(out, expected, jnp.float32)


# --- split merge and split counts ----------------------------------------------------------------

def test_merge_splits_by_hand():
    """Row 0: logits (log2 units) 1, 2 in split 0, none in split 1, 3 in split 2; row 1: none."""
    v1, v2, v3 = np.array([1.0, 0.0]), np.array([0.0, 1.0]), np.array([2.0, 2.0])
    o = np.zeros((3, 2, 2), np.float32)  # [splits, rows, D]
    m = np.full((3, 2), -np.inf, np.float32)
    l = np.zeros((3, 2), np.float32)
    o[0, 0], m[0, 0], l[0, 0] = 0.5 * v1 + v2, 2.0, 1.5  # 2**(1-2) v1 + 2**(2-2) v2
    o[2, 0], m[2, 0], l[2, 0] = v3, 3.0, 1.0
    out = np.asarray(_merge_splits(jnp.asarray(o), jnp.asarray(m), jnp.asarray(l)))
    expected = (2 * v1 + 4 * v2 + 8 * v3) / 14
    np.testing.assert_allclose(out[0], expected, rtol=1e-6)
    np.testing.assert_array_equal(out[1], 0.0)


@pytest.mark.parametrize("batch,num_lists,num_entries,expected", [
    (1, 1, 100, 100),  # one list: one entry per split, 100 programs
    (1, 8, 64, 32),  # 33 asked for, 2 entries per split -> 32
    (4, 8, 64, 8),  # 9 asked for, 8 entries per split -> 8
    (1, 2, 5, 5),
    (32, 9, 1000, 1),  # 288 programs already fill 132 SMs
    (2, 3, 1, 1),
])
def test_default_num_splits(batch, num_lists, num_entries, expected):
    assert default_num_splits(batch, num_lists, num_entries) == expected


# --- the kernel ----------------------------------------------------------------------------------

class TestKernel:
    """Kernel (interpret mode) vs the jnp reference on shuffled, ragged, ring-style page lists."""

    interpret = True
    batch = 2
    num_entries = 7

    def run(self, *case, **kwargs):
        return paged_decode_attention(*case, impl="pallas", interpret=self.interpret, **kwargs)

    def check(self, case, dtype, **kwargs):
        out = self.run(*case, **kwargs)
        q = case[0]
        assert out.shape == q.shape and out.dtype == q.dtype
        assert np.isfinite(np.asarray(out, np.float32)).all(), "non-finite output"
        assert_close(out, reference(*case, sm_scale=kwargs.get("sm_scale")), dtype)
        # The all-padding list of make_case comes back exactly zero.
        np.testing.assert_array_equal(np.asarray(out[self.batch - 1, 0], np.float32), 0.0)
        return out

    @pytest.mark.parametrize("group,per_query_head,head_dim,page_size,num_splits,dtype", [
        (1, False, 64, 16, 1, jnp.float32),
        (3, False, 96, 16, 2, jnp.float32),
        (4, False, 128, 16, 3, jnp.float32),  # 3 splits of K = 7: 3 + 3 + 1 entries
        (8, True, 64, 16, 2, jnp.float32),
        (4, True, 128, 64, 3, jnp.bfloat16),
        (3, True, 96, 64, 3, jnp.bfloat16),
        (8, False, 64, 64, None, jnp.bfloat16),
        (4, False, 64, 16, 2, jnp.float16),
    ])
    def test_matches_reference(self, group, per_query_head, head_dim, page_size, num_splits,
                               dtype):
        case = make_case(20 + group, batch=self.batch, group=group, per_query_head=per_query_head,
                         head_dim=head_dim, page_size=page_size, num_entries=self.num_entries,
                         dtype=dtype)
        self.check(case, dtype, num_splits=num_splits)

    @pytest.mark.parametrize("num_splits", [1, 3, None])
    def test_num_entries_bound_the_loop(self, num_splits):
        """Entries at or past num_entries are never read, even when they name real pages with
        lo < hi; the live entries are spread over the splits at run time."""
        case = make_case(31, batch=self.batch, group=4, num_entries=self.num_entries)
        num_entries = jnp.asarray([[7, 2], [0, 5]], jnp.int32)
        trap, expected = truncate(case, num_entries)
        out = self.run(*trap, num_entries, num_splits=num_splits)
        assert np.isfinite(np.asarray(out)).all()
        assert_close(out, expected, jnp.float32)

    @pytest.mark.parametrize("per_query_head,dtype,num_splits", [
        (False, jnp.float32, 2), (True, jnp.float32, None), (False, jnp.bfloat16, 3)])
    def test_two_pools_in_one_launch(self, per_query_head, dtype, num_splits):
        """Dense and streaming lists of one layer in one launch, each reading its own pool,
        the output in list (KV-head) order."""
        q, pools, pages, lo, hi, n, sources, expected = two_pool_case(
            32, batch=self.batch, per_query_head=per_query_head, dtype=dtype)
        out = pooled_decode_attention(q, pools, pages, lo, hi, n, sources=sources,
                                      impl="pallas", interpret=self.interpret,
                                      num_splits=num_splits)
        assert out.shape == q.shape and np.isfinite(np.asarray(out, np.float32)).all()
        assert_close(out, expected, dtype)

    @pytest.mark.parametrize("num_splits", [1, 3])
    def test_slots_no_list_sees_may_hold_nan(self, num_splits):
        """NaN keys and values outside the visible ranges (a freed page's leftovers) change
        nothing: a masked weight is 0, and 0 * NaN would be NaN."""
        case = make_case(33, batch=self.batch, group=2, num_entries=self.num_entries)
        out = self.run(*poison_invisible(case), num_splits=num_splits)
        assert_close(out, reference(*case), jnp.float32)

    def test_more_splits_than_entries_and_custom_scale(self):
        """num_splits > K is cut to one entry per split; sm_scale reaches the kernel."""
        case = make_case(30, batch=self.batch, group=2, num_entries=self.num_entries)
        self.check(case, jnp.float32, num_splits=16, sm_scale=0.2)


    @pytest.mark.parametrize("kv_format,group,per_query_head,head_dim,num_splits,dtype", [
        *((fmt, 4, False, 64, 2, jnp.float32) for fmt in ("int8", "int4")),
        # head_dim padded in the kernel (int4: 4 -> 8 bytes)
        *((fmt, 2, True, 8, None, jnp.float32) for fmt in ("int8", "int4")),
        *((fmt, 4, False, 128, 3, jnp.bfloat16) for fmt in ("int8", "int4", "fp8")),
    ])
    def test_quantized_pages_match_reference(self, kv_format, group, per_query_head, head_dim,
                                             num_splits, dtype):
        """int8 / int4 pages dequantized in registers equal the reference, which dequantizes
        after its gather; shuffled ragged lists, ring-style entries, an all-padding list."""
        q, k, v, pages, lo, hi = make_case(50 + group, batch=self.batch, group=group,
                                           per_query_head=per_query_head, head_dim=head_dim,
                                           num_entries=self.num_entries, dtype=dtype)
        pool = quantize_pools(k, v, kv_format)
        sources = tuple((0, h // (q.shape[1] // 2)) for h in range(q.shape[1]))
        run = lambda impl: pooled_decode_attention(  # noqa: E731
            q, (pool,), pages, lo, hi, sources=sources, impl=impl, interpret=self.interpret,
            num_splits=num_splits)
        out = run("pallas")
        assert out.shape == q.shape and out.dtype == q.dtype
        assert np.isfinite(np.asarray(out, np.float32)).all()
        assert_close(out, run("xla"), dtype)
        np.testing.assert_array_equal(np.asarray(out[self.batch - 1, 0], np.float32), 0.0)

    @pytest.mark.parametrize("kv_format", ["int8", "int4", "fp8"])
    def test_quantized_two_pools_and_poisoned_scales(self, kv_format):
        """Dense and streaming lists over quantized pools in one launch; int4 (scale, zero)
        pairs of slots no list sees hold NaN (a freed page's leftovers) and change nothing."""
        q, pools, pages, lo, hi, n, sources, _ = two_pool_case(35, batch=self.batch)
        pools = tuple(quantize_pools(k, v, kv_format, seed=i) for i, (k, v) in enumerate(pools))
        want = pooled_decode_attention(q, pools, pages, lo, hi, n, sources=sources, impl="xla")
        if kv_format == "int4":
            poisoned = []
            for p, pool in enumerate(pools):
                seen = np.zeros(pool[0].shape[1:3], bool)  # [P, S]
                live = np.arange(7)[None, None] < np.asarray(n)[..., None]
                for h, (src, _) in enumerate(sources):
                    if src != p:
                        continue
                    for pg, a, z, ok in zip(*(np.asarray(x)[:, h].ravel()
                                               for x in (pages, lo, hi, live))):
                        seen[pg, a:max(a, z)] |= bool(ok)
                nan = lambda m: jnp.where(  # noqa: E731
                    jnp.asarray(seen)[None, :, :, None], m, jnp.nan).astype(m.dtype)
                poisoned.append(pool[:2] + (nan(pool[2]), nan(pool[3])) + pool[4:])
            pools = tuple(poisoned)
        out = pooled_decode_attention(q, pools, pages, lo, hi, n, sources=sources,
                                      impl="pallas", interpret=self.interpret, num_splits=2)
        assert np.isfinite(np.asarray(out)).all()
        assert_close(out, want, jnp.float32)


@pytest.mark.gpu
class TestKernelGpu(TestKernel):
    """The same checks natively on the GPU, plus a long bf16 list with the default splits."""

    interpret = False

    @pytest.mark.parametrize("head_dim,per_query_head", [(64, False), (128, False), (128, True)])
    def test_long_list_bf16(self, head_dim, per_query_head):
        case = make_case(40, batch=self.batch, num_kv_heads=4, group=4,
                         per_query_head=per_query_head, head_dim=head_dim, page_size=64,
                         num_entries=64, dtype=jnp.bfloat16)
        self.check(case, jnp.bfloat16)


@pytest.mark.parametrize("dtype,head_dim,rows,num_splits", [
    (jnp.bfloat16, 128, 4, None), (jnp.float16, 64, 1, 3), (jnp.float32, 96, 8, 2),
])
def test_kernel_lowers_to_triton(dtype, head_dim, rows, num_splits):
    """The Triton lowering runs without a GPU: catches unsupported ops and types on CPU."""
    q = jax.ShapeDtypeStruct((2, 8, rows, head_dim), dtype)
    pool = jax.ShapeDtypeStruct((4, 100, 64, head_dim), dtype)
    stream = jax.ShapeDtypeStruct((2, 15, 64, head_dim), dtype)
    ints = jax.ShapeDtypeStruct((2, 8, 7), jnp.int32)
    counts = jax.ShapeDtypeStruct((2, 8), jnp.int32)
    sources = tuple((h % 2, h // 2 % 2) for h in range(8))
    factor = lambda h: jax.ShapeDtypeStruct((h, head_dim), jnp.float32)  # noqa: E731
    scaled = lambda dt: lambda h, p: (  # noqa: E731
        jax.ShapeDtypeStruct((h, p, 64, head_dim), dt),) * 2 + (factor(h),) * 2
    int4 = lambda h, p: (jax.ShapeDtypeStruct((h, p, 64, head_dim // 2), jnp.uint8),) * 2 + (
        jax.ShapeDtypeStruct((h, p, 64, 2), jnp.float16),) * 2 + (factor(h),) * 2  # noqa
    for traced in (
        paged_decode_attention.trace(q, pool, pool, ints, ints, ints, num_splits=num_splits),
        pooled_decode_attention.trace(q, ((pool, pool), (stream, stream)), ints, ints, ints,
                                      counts, sources=sources, num_splits=num_splits),
        *(pooled_decode_attention.trace(q, (kind(4, 100), kind(2, 15)), ints, ints, ints,
                                        counts, sources=sources, num_splits=num_splits)
          for kind in (scaled(jnp.int8), scaled(jnp.float8_e4m3fn), int4)),
    ):
        assert "triton" in lower_for_cuda(traced)


# --- argument checking ---------------------------------------------------------------------------

@pytest.mark.parametrize("change,match", [
    (dict(impl="cuda"), "impl"),
    (dict(q=jnp.zeros((2, 3, 4, 16))), "multiple of"),
    (dict(q=jnp.zeros((2, 4, 16))), r"\[B, H, G, D\]"),
    (dict(v_pages=jnp.zeros((2, 5, 16, 8))), "k_pages and v_pages"),
    (dict(k_pages=jnp.zeros((2, 5, 16, 8)), v_pages=jnp.zeros((2, 5, 16, 8))), "head_dim"),
    (dict(q=jnp.zeros((2, 4, 4, 16), jnp.bfloat16)), "share one of"),
    (dict(q=jnp.zeros((2, 4, 4, 16), jnp.int32)), "share one of"),
    (dict(pages=jnp.zeros((2, 4, 5), jnp.int32)), "equal pages.shape"),
    (dict(lo=jnp.zeros((2, 4, 2), jnp.int32)), "lo.shape"),
    (dict(hi=jnp.zeros((1, 4, 3), jnp.int32)), "hi.shape"),
    (dict(pages=jnp.zeros((2, 4, 3), jnp.int16)), "int32"),
    (dict(lo=jnp.zeros((2, 4, 3), jnp.float32)), "int32"),
    (dict(k_pages=jnp.zeros((2, 5, 24, 16)), v_pages=jnp.zeros((2, 5, 24, 16))), "power of two"),
    (dict(k_pages=jnp.zeros((2, 5, 8, 16)), v_pages=jnp.zeros((2, 5, 8, 16))), "power of two"),
    (dict(num_splits=0), "num_splits"),
])
def test_bad_arguments(change, match):
    ints = jnp.zeros((2, 4, 3), jnp.int32)
    args = dict(q=jnp.zeros((2, 4, 4, 16)), k_pages=jnp.zeros((2, 5, 16, 16)),
                v_pages=jnp.zeros((2, 5, 16, 16)), pages=ints, lo=ints, hi=ints, interpret=True)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        paged_decode_attention(**args)


@pytest.mark.parametrize("kv_format,change,match", [
    ("int8", dict(length=3), "all of one kind"),
    ("int8", dict(mixed=True), "all of one kind"),
    ("int8", dict(index=0, dtype=jnp.uint8), "int8"),
    ("int8", dict(index=2, shape=(2, 8)), "factors"),
    ("int4", dict(index=2, shape=(2, 5, 16, 3)), "scale, zero"),
    ("int4", dict(index=5, shape=(2, 15)), "factors"),
    ("int4", dict(odd=True), "even"),
])
def test_bad_quantized_pools(kv_format, change, match):
    q, k, v, pages, lo, hi = make_case(16, head_dim=16, num_entries=3, num_kv_heads=2, group=2)
    pool = list(quantize_pools(k, v, kv_format))
    pools = [tuple(pool)]
    if "length" in change:
        pools = [tuple(pool[:change["length"]])]
    elif change.get("mixed"):
        pools = [tuple(pool), (k, v)]
    elif change.get("odd"):
        q = jnp.zeros(q.shape[:3] + (15,))
    else:
        x = pool[change["index"]]
        pool[change["index"]] = jnp.zeros(change.get("shape", x.shape),
                                          change.get("dtype", x.dtype))
        pools = [tuple(pool)]
    sources = tuple((0, h) for h in range(q.shape[1]))
    with pytest.raises(ValueError, match=match):
        pooled_decode_attention(q, tuple(pools), pages, lo, hi, sources=sources,
                                interpret=True)


def test_xla_impl_accepts_any_page_size():
    """Only the Pallas kernel needs power-of-two pages; the CPU path takes e.g. S = 8 or 24."""
    q, k, v, pages, lo, hi = make_case(12, page_size=24, head_dim=16)
    out = paged_decode_attention(q, k, v, pages, lo, hi, impl="xla")
    assert_close(out, brute_force(q, k, v, pages, lo, hi), jnp.float32)


def test_pool_too_large_for_int32_offsets_is_refused():
    """The kernel addresses a pool with int32 element offsets: a larger pool is a clear error,
    never a silent wrap-around (traced only, nothing is allocated)."""
    q = jax.ShapeDtypeStruct((1, 8, 4, 128), jnp.bfloat16)
    pool = jax.ShapeDtypeStruct((8, 2**15 + 1, 64, 128), jnp.bfloat16)
    ints = jax.ShapeDtypeStruct((1, 8, 7), jnp.int32)
    with pytest.raises(ValueError, match="int32 offsets"):
        paged_decode_attention.trace(q, pool, pool, ints, ints, ints)
    assert paged_decode_attention.trace(q, pool, pool, ints, ints, ints, impl="xla")
