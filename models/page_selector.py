"""LServe's query-aware hierarchical page selector for dense heads in decode (LServe §4; Quest).

Quest (arXiv 2406.10774) keeps, per page and KV head, the element-wise max and min of the
post-RoPE keys and bounds `q·k` over the page from above by `Σ_d max(q_d·kmax_d, q_d·kmin_d)`.
LServe (arXiv 2502.14866, "hierarchical paging") keeps these statistics per *logical* page
(16 tokens) while KV pages stay 64 tokens for bandwidth, scores a physical page by the max over its
logical pages, and keeps the newest page plus the top K−1 of the rest.

All functions are pure jnp with static shapes; run-time lengths (`num_pages`) are arrays, capacities
and the budget are static Python ints. The NumPy `reference_select_pages` is the test oracle.

Shapes: B sequences, Hq query heads, Hkv KV heads, G = Hq // Hkv, D head dim, P = max physical pages
per sequence, L = logical pages per physical page, so P*L logical pages per sequence, in sequence
order. Einsum letters: b batch, h query head, k KV head, g query head within group, d head dim,
j logical page, p physical page.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

MIN_BUDGET_PAGES = 3  # LServe: K = max(3, token_budget / page_size)
COMBINE_REDUCTIONS = ("max", "sum")


def logical_page_scores(q: jax.Array, kmax: jax.Array, kmin: jax.Array) -> jax.Array:
    """Quest upper bound of `q·k` over every logical page, per query head.

    Args:
      q: [B, Hq, D] post-RoPE query of the new token.
      kmax, kmin: [B, Hkv, P*L, D] element-wise max/min of the post-RoPE keys of each logical page
        (LServe §4). Empty logical pages hold kmax = −inf, kmin = +inf; for every non-empty page
        kmax ≥ kmin element-wise (an invariant of the statistics, relied on below).

    Returns:
      [B, Hq, P*L] f32: `S_j = Σ_d max(q_d·kmax_{j,d}, q_d·kmin_{j,d})` (no 1/√D: it only ranks),
      −inf for empty pages. Query head h reads KV head h // G.
    """
    b, hq, d = q.shape
    hkv = kmax.shape[1]
    if hq % hkv:
        raise ValueError(f"num_query_heads={hq} must be a multiple of num_kv_heads={hkv}")
    # Empty pages are marked by −inf in kmax; zero their stats so no 0·inf = NaN can arise, and set
    # their score to −inf explicitly at the end.
    empty = jnp.any(jnp.isneginf(kmax), axis=-1)  # [b, k, j]
    kmax = jnp.where(empty[..., None], 0.0, kmax.astype(jnp.float32))
    kmin = jnp.where(empty[..., None], 0.0, kmin.astype(jnp.float32))
    qg = q.astype(jnp.float32).reshape(b, hkv, hq // hkv, d)
    # Since kmax ≥ kmin, max(q_d·kmax_d, q_d·kmin_d) = relu(q_d)·kmax_d + min(q_d, 0)·kmin_d: the
    # bound is two matmuls instead of a [B, Hq, P*L, D] broadcast, and q_d = 0 contributes 0.
    # bkgd,bkjd->bkgj
    scores = jnp.einsum("bkgd,bkjd->bkgj", jnp.maximum(qg, 0.0), kmax,
                        precision=jax.lax.Precision.HIGHEST)
    scores += jnp.einsum("bkgd,bkjd->bkgj", jnp.minimum(qg, 0.0), kmin,
                         precision=jax.lax.Precision.HIGHEST)
    scores = jnp.where(empty[:, :, None, :], -jnp.inf, scores)
    return scores.reshape(b, hq, -1)


def physical_page_scores(logical_scores: jax.Array, logical_pages_per_page: int) -> jax.Array:
    """Hierarchical paging (LServe, arXiv 2502.14866): a physical page scores its best logical page.

    Args:
      logical_scores: [B, H, P*L] (H query or KV heads), logical pages in sequence order.
      logical_pages_per_page: static L = page_size // logical_page_size.

    Returns:
      [B, H, P]; a page whose logical pages are all empty stays −inf.
    """
    b, h, n = logical_scores.shape
    if n % logical_pages_per_page:
        raise ValueError(f"{n=} logical pages is not a multiple of {logical_pages_per_page=}")
    return logical_scores.reshape(b, h, n // logical_pages_per_page, logical_pages_per_page).max(-1)


def combine_query_heads(scores: jax.Array, num_kv_heads: int, *, reduce: str = "max") -> jax.Array:
    """Per-KV-head selection: one page list for the G query heads of a GQA group.

    LServe scores per query head; sharing the list lets the decode kernel load each selected page
    once per group (the README measures both). The default `reduce="max"` keeps a page if it
    matters to *any* head of the group, so no head loses its single most relevant page to the
    others' consensus; `reduce="sum"` ranks by the group's total bound instead.

    Args:
      scores: [B, Hq, P] per-query-head physical page scores (query head h in group h // G).
      num_kv_heads: static Hkv.

    Returns:
      [B, Hkv, P].
    """
    if reduce not in COMBINE_REDUCTIONS:
        raise ValueError(f"{reduce=} must be one of {COMBINE_REDUCTIONS}")
    b, hq, p = scores.shape
    if hq % num_kv_heads:
        raise ValueError(f"num_query_heads={hq} must be a multiple of {num_kv_heads=}")
    grouped = scores.reshape(b, num_kv_heads, hq // num_kv_heads, p)  # [b, k, g, p]
    return grouped.max(2) if reduce == "max" else grouped.sum(2)


def _check_budget(budget_pages: int, keep_first_pages: int = 0) -> None:
    if budget_pages < MIN_BUDGET_PAGES:
        raise ValueError(f"{budget_pages=} must be >= {MIN_BUDGET_PAGES}")
    if not 0 <= keep_first_pages <= budget_pages - 1:
        raise ValueError(f"{keep_first_pages=} must be in [0, budget_pages - 1 = "
                         f"{budget_pages - 1}]")


def select_pages(scores: jax.Array, num_pages: jax.Array, budget_pages: int,
                 keep_first_pages: int = 0) -> tuple[jax.Array, jax.Array]:
    """Pick at most K = budget_pages physical pages per (sequence, head) (LServe, arXiv 2502.14866).

    Rule: with n = num_pages[b] (clipped to [0, P]),
      - n ≤ K: pages 0..n−1, no scoring;
      - n > K: the newest (partial) page n−1 always, plus the top K−1 by score among pages 0..n−2,
        where the first `keep_first_pages` pages (the attention sink) outrank every score.
    Tie rule: candidates are ranked by (score descending, page index ascending), i.e. among equal
    scores the lower page index wins. NaN counts as −inf and −0.0 equals +0.0. Pages ≥ n are never
    selected; their scores may be garbage. The result is sorted ascending by page index so the
    kernel reads KV in sequence order.

    Args:
      scores: [B, H, P] physical page scores (H query heads or KV heads).
      num_pages: [B] int32, physical pages holding tokens per sequence (the last may be partial).
      budget_pages: static K ≥ 3.
      keep_first_pages: static, 0 ≤ F ≤ K − 1 (0: LServe's rule).

    Returns:
      pages: [B, H, K] int32, ascending; unused slots hold page 0.
      valid: [B, H, K] bool, True for selected slots (a prefix of the K slots).
    """
    _check_budget(budget_pages, keep_first_pages)
    b, h, p = scores.shape
    k = budget_pages
    n = jnp.clip(num_pages.astype(jnp.int32), 0, p)[:, None, None]  # [b, 1, 1]

    # Short history (n ≤ K): every page, in order.
    slot = jnp.arange(k, dtype=jnp.int32)
    all_valid = jnp.broadcast_to(slot < n, (b, h, k))
    all_pages = jnp.where(all_valid, slot, 0)
    if k >= p:  # n ≤ P ≤ K: the scored branch can never be taken.
        return all_pages, all_valid

    # Long history (n > K): rank the older pages 0..n−2 lexicographically on (−score, index) with a
    # two-key sort. lax.top_k documents the same tie order, but the explicit second key makes the
    # rule hold by construction on every backend's lowering; P sorts cheaply and the selection runs
    # only every `selector_interval` steps. lax.sort already compares −0.0 equal to +0.0; NaN (which
    # it would rank last) is mapped to −inf here.
    page = jnp.arange(p, dtype=jnp.int32)
    older = page < n - 1
    neg = -jnp.where(older & ~jnp.isnan(scores), scores.astype(jnp.float32), -jnp.inf)
    neg = jnp.where(older & (page < keep_first_pages), -jnp.inf, neg)  # kept first pages lead
    # Non-older pages get key +inf; they have higher indices than every older page, so even older
    # pages scoring −inf rank before them, and n−1 ≥ K older pages fill the K−1 slots.
    _, order = jax.lax.sort((neg, jnp.broadcast_to(page, neg.shape)), dimension=-1, num_keys=2)
    top = jnp.sort(order[..., : k - 1], axis=-1)  # [b, h, K−1], all < n−1
    newest = jnp.broadcast_to(n - 1, (b, h, 1))
    top_pages = jnp.concatenate([top, newest], axis=-1).astype(jnp.int32)

    long = n > k
    pages = jnp.where(long, top_pages, all_pages)
    valid = jnp.where(long, True, all_valid)
    return pages, valid


def select_dense_pages(q: jax.Array, kmax: jax.Array, kmin: jax.Array, page_table: jax.Array,
                       num_pages: jax.Array, *, budget_pages: int, per_query_head: bool,
                       keep_first_pages: int = 0) -> jax.Array:
    """The whole selector for one layer: statistics of the sequences' pages -> chosen pages.

    Args:
      q: [B, Hd, G, D] post-RoPE queries of the layer's dense heads (G per KV head).
      kmax, kmin: [Hd, num_pages_in_pool, L, D] the layer's logical-page key statistics.
      page_table: [B, P] int32 the sequences' page-table rows.
      num_pages: [B] int32 physical pages holding tokens.
      budget_pages: static K. per_query_head: one page list per query head (LServe) instead of
        one per KV head (`combine_query_heads` with max).
      keep_first_pages: pages at the sequence start always selected (see `select_pages`).

    Returns:
      [B, Hd * G or Hd, K] int32 page-table *columns* (page numbers within the sequence),
      ascending; the first min(K, num_pages) are used.
    """
    b, hd, g, d = q.shape
    stats_per_page = kmax.shape[2]
    # [Hd, B, P, L, D] -> [B, Hd, P*L, D]: every logical page of each sequence, in order.
    seq_max = jnp.moveaxis(kmax[:, page_table], 1, 0).reshape(b, hd, -1, d)
    seq_min = jnp.moveaxis(kmin[:, page_table], 1, 0).reshape(b, hd, -1, d)
    scores = logical_page_scores(q.reshape(b, hd * g, d), seq_max, seq_min)  # [B, Hd*G, P*L]
    scores = physical_page_scores(scores, stats_per_page)  # [B, Hd*G, P]
    if not per_query_head:
        scores = combine_query_heads(scores, hd)  # [B, Hd, P]
    pages, _ = select_pages(scores, num_pages, budget_pages, keep_first_pages)
    return pages


def reference_select_pages(scores: np.ndarray, num_pages: np.ndarray, budget_pages: int,
                           keep_first_pages: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force NumPy oracle of `select_pages`, same arguments, results and tie rule."""
    _check_budget(budget_pages, keep_first_pages)
    scores = np.asarray(scores, np.float32)
    b, h, p = scores.shape
    k = budget_pages
    pages = np.zeros((b, h, k), np.int32)
    valid = np.zeros((b, h, k), bool)
    for bi in range(b):
        n = int(min(max(int(num_pages[bi]), 0), p))
        for hi in range(h):
            if n <= k:
                chosen = list(range(n))
            else:
                def key(j):
                    s = float(scores[bi, hi, j])
                    if j < keep_first_pages:
                        return (-np.inf, j)
                    return (-(-np.inf if np.isnan(s) else s), j)
                chosen = sorted(sorted(range(n - 1), key=key)[: k - 1]) + [n - 1]
            pages[bi, hi, : len(chosen)] = chosen
            valid[bi, hi, : len(chosen)] = True
    return pages, valid
