"""LServe's decode page selector as two row-gated kernels: Quest page scores, then top-K pages
(LServe §4; Quest).

Quest (arXiv 2406.10774) bounds `q·k` over a page from above by `Σ_d max(q_d·kmax_d, q_d·kmin_d)`
with the page's element-wise key max/min. LServe (arXiv 2502.14866, §4, "hierarchical paging")
keeps these statistics per *logical* page (L of them per physical KV page), scores a physical
page by its best logical page and attends to the newest page plus the top K−1 of the others.

The selector only has to run for the sequences whose selection is due (selector reuse). Both
kernels take that decision per row *inside* the kernel, from a `need` [B] mask: a program whose
row is not due writes a constant and returns without reading its inputs. So a decode step
needs no `lax.cond` around the selector (XLA:GPU syncs with the host on each one).

- `page_scores`: program (b, KV head, block of `block_pages` page-table columns) gathers the
  statistics of its pages through the page table (the whole statistics array is the block:
  Triton blocks are only pointers, nothing is copied) and writes their f32 physical-page
  scores. A 256K context (P = 4096 pages) with Hd = 4 and the default 64-page blocks is
  B * 256 programs. Blocks past `num_pages[b]` read nothing either.
- `select_top_pages`: program (b, h) turns one row of scores into the K page-table columns
  of `select_pages`' rule with a radix select on order-preserving integer keys (32 masked
  counts, no sort) and a prefix-sum compaction into ascending order.

Layers: `_scores_kernel` / `_select_kernel` -> `_pallas_scores` / `_pallas_select` (grid and
BlockSpecs) -> `page_scores` / `select_top_pages` (public jitted ops, `impl="triton" | "xla"`, pallas_kernels/impls.py).
The plain-jnp `page_scores_reference` / `select_top_pages_reference` are the XLA path and the
tests' oracle (they compute every row and mask with `need`).

Shapes: B sequences, Hd dense KV heads of the layer, G query heads per KV head, D head dim,
P page-table columns per sequence, P_pool pages in the pool, L logical pages per physical page,
H score rows per sequence (Hd * G or Hd), K = budget_pages; BP, Dp, Pp, Kp padded tile sizes
(powers of two).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.impls import check_impl

_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
MIN_BUDGET_PAGES = 3  # LServe: K = max(3, token_budget / page_size)
# One program holds a whole row of keys in registers; 16384 pages (1M tokens of 64-token pages)
# is 32 int32 per thread with 16 warps. Longer rows should use impl="xla".
MAX_SELECT_PAGES = 16384
_INT32_MIN = np.int32(np.iinfo(np.int32).min)
_INT32_MAX = np.int32(np.iinfo(np.int32).max)


# --- page scores ---------------------------------------------------------------------------------

def _scores_kernel(need_ref, count_ref, table_ref, q_ref, kmax_ref, kmin_ref, o_ref, *,
                   block_pages, per_query_head):
    """One block of BP page-table columns of one (sequence, KV head).

    need_ref, count_ref [] int32 (row due, pages holding tokens); table_ref [P] int32 the row
    of the page table; q_ref [G, D] the group's queries; kmax_ref, kmin_ref [Hd, P_pool, L, D]
    (whole arrays, gathered below); o_ref [G, P] (per query head) or [P] f32, the (b, head)
    row of the scores, of which this program writes columns [start, start + BP).
    """
    group, d = q_ref.shape
    num_cols = table_ref.shape[0]
    num_pool_pages, logical_per_page = kmax_ref.shape[1], kmax_ref.shape[2]
    d_pad = pl.next_power_of_2(d)
    head = pl.program_id(1)
    start = pl.program_id(2) * block_pages
    cols = start + lax.broadcasted_iota(jnp.int32, (block_pages,), 0)  # [BP]
    count = jnp.clip(count_ref[...], 0, num_cols)
    in_row = cols < num_cols

    # Static indices into refs below are int32 scalars: interpret mode's discharge of a
    # masked store rejects Python ints.
    def store(rows):
        # Columns past P exist only in the last block; the mask keeps them out of memory.
        if per_query_head:
            for g, row in enumerate(rows):
                plgpu.store(o_ref.at[jnp.int32(g), pl.ds(start, block_pages)], row, mask=in_row)
        else:
            plgpu.store(o_ref.at[pl.ds(start, block_pages)], functools.reduce(jnp.maximum, rows),
                        mask=in_row)

    # The gate is per program, around every load of the statistics: a row that is not due,
    # or a block past the row's last page, reads nothing and writes -inf.
    active = (need_ref[...] != 0) & (start < count)

    @pl.when(active)
    def _():
        live = cols < count  # [BP]
        pages = plgpu.load(table_ref.at[pl.ds(start, block_pages)], mask=live, other=0)
        # In range, so a corrupt table entry cannot read outside the pool on the GPU (the
        # reference's gather clamps the same way).
        pages = jnp.clip(pages, 0, num_pool_pages - 1)
        dim = lax.broadcasted_iota(jnp.int32, (d_pad,), 0)  # [Dp]
        # A power-of-two D keeps the plain iota, so Triton sees contiguous rows; otherwise the
        # padded lanes repeat column D-1 and are masked to 0.
        dim_index = dim if d_pad == d else jnp.minimum(dim, d - 1)
        dim_ok = dim < d
        qs = [plgpu.load(q_ref.at[jnp.int32(g), dim_index], mask=dim_ok, other=0.0)
              .astype(jnp.float32) for g in range(group)]  # G x [Dp]
        q_pos = [jnp.maximum(q, 0.0)[None, :] for q in qs]
        q_neg = [jnp.minimum(q, 0.0)[None, :] for q in qs]
        # Only live pages are loaded; dead lanes and padded columns read as 0.
        mask = live[:, None] & dim_ok[None, :]  # [BP, Dp]
        best = [jnp.full((block_pages,), -jnp.inf, jnp.float32) for _ in range(group)]
        for j in range(logical_per_page):
            index = (head, pages[:, None], jnp.int32(j), dim_index[None, :])
            # Stats stay in their storage dtype in memory; the bound is accumulated in f32.
            kmax = plgpu.load(kmax_ref.at[index], mask=mask, other=0.0).astype(jnp.float32)
            kmin = plgpu.load(kmin_ref.at[index], mask=mask, other=0.0).astype(jnp.float32)
            # An empty logical page holds kmax = -inf (any column marks it): its score is -inf,
            # whatever 0 * inf = nan the bound below produced for it.
            empty = jnp.min(kmax, axis=1) == -jnp.inf  # [BP]
            for g in range(group):
                # Quest's bound: since kmax >= kmin, max(q·kmax, q·kmin) per column equals
                # relu(q)·kmax + min(q, 0)·kmin. Elementwise products and a row sum, not a dot:
                # G is far below the 16 rows a Triton dot needs, and it stays IEEE f32 (Triton's
                # f32 dot defaults to TF32).
                bound = jnp.sum(q_pos[g] * kmax + q_neg[g] * kmin, axis=1)  # [BP]
                best[g] = jnp.maximum(best[g], jnp.where(empty, -jnp.inf, bound))
        store([jnp.where(live, row, -jnp.inf) for row in best])

    @pl.when(jnp.logical_not(active))
    def _():
        store([jnp.full((block_pages,), -jnp.inf, jnp.float32)] * group)


def _pallas_scores(q, kmax, kmin, page_table, num_pages, need, *, per_query_head, block_pages,
                   num_warps, num_stages, interpret):
    """Grid (B, Hd, ceil(P / BP)) and BlockSpecs. q [B, Hd, G, D]; kmax, kmin
    [Hd, P_pool, L, D]; page_table [B, P]; num_pages, need [B] int32. Returns f32
    [B, Hd, G, P] (per query head) or [B, Hd, P]."""
    batch, num_heads, group, d = q.shape
    num_cols = page_table.shape[1]
    grid = (batch, num_heads, pl.cdiv(num_cols, block_pages))
    row_spec = pl.BlockSpec((None,), lambda b, h, j: (b,))
    stats_spec = pl.BlockSpec(kmax.shape, lambda b, h, j: (0, 0, 0, 0))
    if per_query_head:
        out_shape = (batch, num_heads, group, num_cols)
        out_spec = pl.BlockSpec((None, None, group, num_cols), lambda b, h, j: (b, h, 0, 0))
    else:
        out_shape = (batch, num_heads, num_cols)
        out_spec = pl.BlockSpec((None, None, num_cols), lambda b, h, j: (b, h, 0))
    kernel = functools.partial(_scores_kernel, block_pages=block_pages,
                               per_query_head=per_query_head)
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[
            row_spec, row_spec,  # need, num_pages
            pl.BlockSpec((None, num_cols), lambda b, h, j: (b, 0)),  # page_table
            pl.BlockSpec((None, None, group, d), lambda b, h, j: (b, h, 0, 0)),  # q
            stats_spec, stats_spec,
        ],
        out_specs=out_spec,
        out_shape=jax.ShapeDtypeStruct(out_shape, jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="page_scores",
    )(need, num_pages, page_table, q, kmax, kmin)


def page_scores_reference(q, kmax, kmin, page_table, num_pages, need=None, *,
                          per_query_head: bool):
    """Plain-jnp reference and CPU path: same contract as `page_scores`.

    Gathers every row's statistics ([B, Hd, P*L, D], in f32) and scores all rows; columns at or
    past `num_pages` and rows with `need` False are then masked to -inf.
    """
    batch, num_heads, group, d = q.shape
    num_cols = page_table.shape[1]
    logical_per_page = kmax.shape[2]
    # [Hd, B, P, L, D] -> [B, Hd, P*L, D]: every logical page of each row, in sequence order.
    seq_max = jnp.moveaxis(kmax[:, page_table], 1, 0).reshape(batch, num_heads, -1, d)
    seq_min = jnp.moveaxis(kmin[:, page_table], 1, 0).reshape(batch, num_heads, -1, d)
    # Empty logical pages (any kmax = -inf) are zeroed so no 0·inf = nan arises, then scored -inf.
    empty = jnp.any(jnp.isneginf(seq_max), axis=-1)  # [B, Hd, P*L]
    seq_max = jnp.where(empty[..., None], 0.0, seq_max.astype(jnp.float32))
    seq_min = jnp.where(empty[..., None], 0.0, seq_min.astype(jnp.float32))
    qf = q.astype(jnp.float32)
    # Quest's bound as relu(q)·kmax + min(q, 0)·kmin (kmax >= kmin). bkgd,bkjd->bkgj
    scores = jnp.einsum("bkgd,bkjd->bkgj", jnp.maximum(qf, 0.0), seq_max,
                        precision=lax.Precision.HIGHEST)
    scores += jnp.einsum("bkgd,bkjd->bkgj", jnp.minimum(qf, 0.0), seq_min,
                         precision=lax.Precision.HIGHEST)
    scores = jnp.where(empty[:, :, None, :], -jnp.inf, scores)
    # LServe's hierarchical paging: a physical page scores its best logical page.
    scores = scores.reshape(batch, num_heads, group, num_cols, logical_per_page).max(-1)
    if not per_query_head:
        scores = scores.max(2)  # [B, Hd, P]: the page list is shared by the group
    keep = jnp.arange(num_cols) < jnp.clip(num_pages, 0, num_cols)[:, None]  # [B, P]
    if need is not None:
        keep &= need[:, None]
    keep = keep[:, None, None] if per_query_head else keep[:, None]
    scores = jnp.where(keep, scores, -jnp.inf)
    return scores.reshape(batch, num_heads * group, num_cols) if per_query_head else scores


def _validate_scores(q, kmax, kmin, page_table, num_pages, need, impl, block_pages):
    if q.ndim != 4:
        raise ValueError(f"q must be [B, Hd, G, D]; got {q.shape=}")
    batch, num_heads, _, d = q.shape
    if kmax.ndim != 4 or kmax.shape != kmin.shape:
        raise ValueError(f"kmax and kmin must both be [Hd, P_pool, L, D]; got {kmax.shape=} "
                         f"{kmin.shape=}")
    if kmax.shape[0] != num_heads or kmax.shape[3] != d:
        raise ValueError(f"kmax/kmin [Hd, P_pool, L, D] must match q's Hd={num_heads} and "
                         f"D={d}; got {kmax.shape=} {q.shape=}")
    if kmax.shape[1] < 1 or kmax.shape[2] < 1:
        raise ValueError(f"kmax/kmin need at least one page and one logical page; got "
                         f"{kmax.shape=}")
    if jnp.dtype(q.dtype) not in _DTYPES:
        raise ValueError(f"q.dtype={q.dtype} must be float32, bfloat16 or float16")
    if kmax.dtype != kmin.dtype or jnp.dtype(kmax.dtype) not in _DTYPES:
        raise ValueError(f"kmax and kmin must share one of float32/bfloat16/float16; got "
                         f"{kmax.dtype=} {kmin.dtype=}")
    if page_table.ndim != 2 or page_table.shape[0] != batch or page_table.dtype != jnp.int32:
        raise ValueError(f"page_table must be int32 [B={batch}, P]; got {page_table.shape=} "
                         f"{page_table.dtype=}")
    _check_rows(num_pages, need, batch)
    if block_pages < 1 or block_pages & (block_pages - 1):
        raise ValueError(f"{block_pages=} must be a power of two")


@functools.partial(jax.jit, static_argnames=(
    "per_query_head", "impl", "interpret", "block_pages", "num_warps", "num_stages"))
def page_scores(q, kmax, kmin, page_table, num_pages, need=None, *, per_query_head: bool,
                impl="triton", interpret=False, block_pages=64, num_warps=4, num_stages=2):
    """Quest/LServe physical-page scores of the rows that are due, gated per row in the kernel.

    Args:
      q: [B, Hd, G, D] float32/bfloat16/float16, post-RoPE queries of the layer's dense KV heads
        (G query heads per KV head).
      kmax, kmin: [Hd, P_pool, L, D] float32/bfloat16/float16 (one dtype for both), per logical
        page the element-wise max/min of its post-RoPE keys; an empty logical page holds
        kmax = -inf (kmin = +inf).
      page_table: [B, P] int32 physical page of each page-table column (unused columns on page 0;
        ids are clamped into [0, P_pool)).
      num_pages: [B] int32 pages holding tokens (clipped to [0, P]).
      need: [B] bool rows to score; None: every row.
      per_query_head: static. True: one score row per query head; False: one per KV head, the
        max over its G query heads (`combine_query_heads(..., reduce="max")`).
      impl: "triton" (the kernel) or "xla" (`page_scores_reference`, the CPU path).
      interpret: run the Pallas kernel in interpret mode (CPU testing).
      block_pages: page-table columns per program (a power of two); num_warps, num_stages:
        Triton launch settings.

    Returns:
      f32 [B, Hd*G, P] (query head h reads KV head h // G) if per_query_head else [B, Hd, P]:
      column p scores max over its L logical pages of Σ_d max(q_d·kmax_d, q_d·kmin_d), computed
      from the statistics in their storage dtype with f32 accumulation; -inf for empty pages,
      for columns p >= num_pages[b] and for every column of a row with need[b] False.
    """
    impl = check_impl(impl, "page_scores")
    _validate_scores(q, kmax, kmin, page_table, num_pages, need, impl, block_pages)
    batch, num_heads, group, _ = q.shape
    num_cols = page_table.shape[1]
    if impl == "xla":
        return page_scores_reference(q, kmax, kmin, page_table, num_pages, need,
                                     per_query_head=per_query_head)
    if num_cols == 0:
        return jnp.zeros((batch, num_heads * group if per_query_head else num_heads, 0),
                         jnp.float32)
    need = jnp.ones((batch,), jnp.int32) if need is None else need.astype(jnp.int32)
    scores = _pallas_scores(q, kmax, kmin, page_table, num_pages, need,
                            per_query_head=per_query_head,
                            block_pages=min(block_pages, pl.next_power_of_2(num_cols)),
                            num_warps=num_warps, num_stages=num_stages, interpret=interpret)
    return scores.reshape(batch, num_heads * group, num_cols) if per_query_head else scores


# --- top-K page selection ------------------------------------------------------------------------

def _order_keys(scores):
    """f32 -> int32 keys with the same order: NaN ranks as -inf and -0.0 equals +0.0.

    A non-negative float's bits already order as an int32; a negative one's order is reversed
    by flipping its magnitude bits (the sign bit keeps it below every non-negative key).
    """
    scores = jnp.where(jnp.isnan(scores), -jnp.inf, scores)
    scores = jnp.where(scores == 0.0, 0.0, scores)
    bits = lax.bitcast_convert_type(scores, jnp.int32)
    return jnp.where(bits < 0, bits ^ _INT32_MAX, bits)


def _select_kernel(need_ref, count_ref, scores_ref, o_ref, *, budget_pages, keep_first_pages):
    """One (sequence, head) row: need_ref, count_ref [] int32; scores_ref [P] f32; o_ref [K]
    int32 page-table columns, ascending (every slot written once, by exactly one branch)."""
    num_cols = scores_ref.shape[0]
    k = budget_pages
    cols_pad, k_pad = pl.next_power_of_2(num_cols), pl.next_power_of_2(k)
    count = jnp.clip(count_ref[...], 0, num_cols)
    need = need_ref[...] != 0
    slot = lax.broadcasted_iota(jnp.int32, (k_pad,), 0)

    @pl.when(jnp.logical_not(need))
    def _():
        # Rows that are not due: the caller keeps their stored selection.
        plgpu.store(o_ref.at[pl.ds(0, k_pad)], jnp.zeros((k_pad,), jnp.int32), mask=slot < k)

    @pl.when(need & (count <= k))
    def _():
        # Short history: every page, no scores read.
        plgpu.store(o_ref.at[pl.ds(0, k_pad)], jnp.where(slot < count, slot, 0), mask=slot < k)

    @pl.when(need & (count > k))
    def _():
        col = lax.broadcasted_iota(jnp.int32, (cols_pad,), 0)
        scores = plgpu.load(scores_ref.at[pl.ds(0, cols_pad)], mask=col < num_cols,
                            other=-jnp.inf)
        key = _order_keys(scores)
        # The attention sink outranks every score (ties with a +inf score go to the lower
        # index, i.e. to the sink, as in `select_pages`); the newest page n-1 is added below
        # and pages >= n-1 are no candidates: the lowest key, below -inf's.
        key = jnp.where(col < keep_first_pages, _INT32_MAX, key)
        key = jnp.where(col < count - 1, key, _INT32_MIN)

        def count_at_least(threshold):
            return jnp.sum((key >= threshold).astype(jnp.int32))

        # Radix select of the (K-1)-th largest key: the largest t with #(key >= t) >= K-1, one
        # bit at a time from the top. Bits are built in unsigned order (u = t ^ INT32_MIN), so
        # the loop is plain int32. n-1 >= K candidates exist, so t is a candidate's key.
        def bit_step(i, bits):
            trial = bits | jnp.left_shift(jnp.int32(1), 31 - i)
            return jnp.where(count_at_least(trial ^ _INT32_MIN) >= k - 1, trial, bits)

        threshold = lax.fori_loop(0, 32, bit_step, jnp.int32(0)) ^ _INT32_MIN
        above = key > threshold
        ties = key == threshold
        # Ties at the threshold go to the lowest page indices: a prefix count over the ties.
        room = (k - 1) - jnp.sum(above.astype(jnp.int32))
        chosen = above | (ties & (jnp.cumsum(ties.astype(jnp.int32)) <= room))  # K-1 pages
        # Compaction: a chosen page's slot is the number of chosen pages before it, so the K-1
        # slots come out ascending. Unchosen lanes are masked; their (unused) address is slot
        # K-1, which the newest page's store below owns (interpret mode writes masked lanes
        # back unchanged, so no real slot may be their address).
        rank = jnp.cumsum(chosen.astype(jnp.int32)) - 1
        plgpu.store(o_ref.at[jnp.where(chosen, rank, k - 1)], col, mask=chosen)
        o_ref[k - 1] = count - 1


def _pallas_select(scores, num_pages, need, *, budget_pages, keep_first_pages, num_warps,
                   num_stages, interpret):
    """Grid (B, H) and BlockSpecs. scores [B, H, P] f32; num_pages, need [B] int32. Returns
    [B, H, K] int32."""
    batch, num_rows, num_cols = scores.shape
    row_spec = pl.BlockSpec((None,), lambda b, h: (b,))
    kernel = functools.partial(_select_kernel, budget_pages=budget_pages,
                               keep_first_pages=keep_first_pages)
    return pl.pallas_call(
        kernel,
        grid=(batch, num_rows),
        in_specs=[row_spec, row_spec,  # need, num_pages
                  pl.BlockSpec((None, None, num_cols), lambda b, h: (b, h, 0))],
        out_specs=pl.BlockSpec((None, None, budget_pages), lambda b, h: (b, h, 0)),
        out_shape=jax.ShapeDtypeStruct((batch, num_rows, budget_pages), jnp.int32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="select_top_pages",
    )(need, num_pages, scores)


def _all_pages(num_pages, shape):
    """[B] -> [B, H, K] columns 0..n-1 then 0-padding (the short-history selection)."""
    slot = jnp.arange(shape[2], dtype=jnp.int32)
    return jnp.broadcast_to(jnp.where(slot < num_pages[:, None], slot, 0)[:, None], shape)


def select_top_pages_reference(scores, num_pages, need=None, *, budget_pages: int,
                               keep_first_pages: int = 0):
    """Plain-jnp reference and CPU path: same contract as `select_top_pages`, by a two-key sort
    on (−score, page index) over every row."""
    _check_budget(budget_pages, keep_first_pages)
    batch, num_rows, num_cols = scores.shape
    k = budget_pages
    n = jnp.clip(num_pages.astype(jnp.int32), 0, num_cols)
    short = _all_pages(n, (batch, num_rows, k))
    if k >= num_cols:  # n <= P <= K: the scored rule never applies
        pages = short
    else:
        n3 = n[:, None, None]
        page = jnp.arange(num_cols, dtype=jnp.int32)
        older = page < n3 - 1
        scores = scores.astype(jnp.float32)
        # NaN ranks as -inf; lax.sort already compares -0.0 equal to +0.0. Kept first pages
        # get key -inf (lead); non-candidates +inf, behind every older page (higher indices).
        neg = -jnp.where(older & ~jnp.isnan(scores), scores, -jnp.inf)
        neg = jnp.where(older & (page < keep_first_pages), -jnp.inf, neg)
        _, order = lax.sort((neg, jnp.broadcast_to(page, neg.shape)), dimension=-1, num_keys=2)
        top = jnp.sort(order[..., : k - 1], axis=-1)  # [B, H, K-1], all < n-1
        newest = jnp.broadcast_to(n3 - 1, (batch, num_rows, 1))
        pages = jnp.where(n3 > k, jnp.concatenate([top, newest], axis=-1), short)
    if need is not None:
        pages = jnp.where(need[:, None, None], pages, 0)
    return pages.astype(jnp.int32)


def _validate_select(scores, num_pages, need, budget_pages, keep_first_pages, impl):
    if scores.ndim != 3:
        raise ValueError(f"scores must be [B, H, P]; got {scores.shape=}")
    if jnp.dtype(scores.dtype) not in _DTYPES:
        raise ValueError(f"scores.dtype={scores.dtype} must be float32, bfloat16 or float16")
    _check_rows(num_pages, need, scores.shape[0])
    _check_budget(budget_pages, keep_first_pages)
    if impl == "triton" and scores.shape[2] > MAX_SELECT_PAGES:
        raise ValueError(f"P={scores.shape[2]} pages per row exceeds the Pallas kernel's "
                         f"{MAX_SELECT_PAGES} (one row per program, in registers); use "
                         f"impl='xla'")


def default_select_num_warps(num_cols: int) -> int:
    """Warps of one selection program: the row's keys live in registers, so about 1024 pages
    per warp (32 per thread), in [4, 16]."""
    return int(min(16, max(4, pl.next_power_of_2(num_cols) // 1024)))


@functools.partial(jax.jit, static_argnames=(
    "budget_pages", "keep_first_pages", "impl", "interpret", "num_warps", "num_stages"))
def select_top_pages(scores, num_pages, need=None, *, budget_pages: int,
                     keep_first_pages: int = 0, impl="triton", interpret=False, num_warps=None,
                     num_stages=1):
    """K page-table columns per (sequence, row) by `models.page_selector.select_pages`' rule,
    gated per row in the kernel.

    Rule, with n = num_pages[b] clipped to [0, P] and K = budget_pages:
      - n <= K: columns 0..n-1, then 0-padding (scores not read);
      - n > K: the newest page n-1 always, plus the top K-1 of pages 0..n-2 ranked by (score
        descending, index ascending), where the first `keep_first_pages` pages (the attention
        sink) outrank every score. NaN ranks as -inf, -0.0 equals +0.0; pages >= n are never
        chosen (their scores may be garbage).
    The columns come out ascending, so attention reads the KV in sequence order.

    Args:
      scores: [B, H, P] float32 (or bfloat16/float16, widened exactly) physical page scores.
      num_pages: [B] int32 pages holding tokens.
      need: [B] bool rows to select; None: every row. A row with need False comes out all 0
        (the caller keeps its stored selection).
      budget_pages: static K >= 3. keep_first_pages: static, in [0, K-1].
      impl: "triton" (the kernel, P <= MAX_SELECT_PAGES) or "xla"
        (`select_top_pages_reference`, the CPU path).
      interpret: run the Pallas kernel in interpret mode (CPU testing).
      num_warps: None: `default_select_num_warps(P)`; num_stages: Triton launch settings.

    Returns:
      [B, H, K] int32 columns, ascending; the first min(K, n) are used, the rest hold 0.
    """
    impl = check_impl(impl, "select_top_pages")
    _validate_select(scores, num_pages, need, budget_pages, keep_first_pages, impl)
    batch, num_rows, num_cols = scores.shape
    if impl == "xla":
        return select_top_pages_reference(scores, num_pages, need, budget_pages=budget_pages,
                                          keep_first_pages=keep_first_pages)
    n = jnp.clip(num_pages, 0, num_cols)
    if budget_pages >= num_cols:
        # n <= P <= K: the selection is every page, known without a launch.
        pages = _all_pages(n, (batch, num_rows, budget_pages))
        return pages if need is None else jnp.where(need[:, None, None], pages, 0)
    need = jnp.ones((batch,), jnp.int32) if need is None else need.astype(jnp.int32)
    num_warps = default_select_num_warps(num_cols) if num_warps is None else num_warps
    return _pallas_select(scores.astype(jnp.float32), n, need, budget_pages=budget_pages,
                          keep_first_pages=keep_first_pages, num_warps=num_warps,
                          num_stages=num_stages, interpret=interpret)


# --- argument checks -----------------------------------------------------------------------------


def _check_rows(num_pages, need, batch):
    if num_pages.shape != (batch,) or num_pages.dtype != jnp.int32:
        raise ValueError(f"num_pages must be int32 [B={batch}]; got {num_pages.shape=} "
                         f"{num_pages.dtype=}")
    if need is not None and (need.shape != (batch,) or need.dtype != jnp.bool_):
        raise ValueError(f"need must be bool [B={batch}]; got {need.shape=} {need.dtype=}")


def _check_budget(budget_pages, keep_first_pages):
    if budget_pages < MIN_BUDGET_PAGES:
        raise ValueError(f"{budget_pages=} must be >= {MIN_BUDGET_PAGES}")
    if not 0 <= keep_first_pages <= budget_pages - 1:
        raise ValueError(f"{keep_first_pages=} must be in [0, budget_pages - 1 = "
                         f"{budget_pages - 1}]")
