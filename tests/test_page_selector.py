"""Page selector (LServe; Quest) against NumPy brute force: Quest bound, hierarchy, top-K rule."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.page_selector import (
    combine_query_heads,
    logical_page_scores,
    physical_page_scores,
    reference_select_pages,
    select_pages,
)


def _random_stats(rng, b, hkv, num_logical, d, empty_frac=0.3):
    """Random valid stats (kmax ≥ kmin) with some empty logical pages (−inf / +inf)."""
    a = rng.standard_normal((b, hkv, num_logical, d)).astype(np.float32)
    c = rng.standard_normal((b, hkv, num_logical, d)).astype(np.float32)
    kmax, kmin = np.maximum(a, c), np.minimum(a, c)
    empty = rng.random((b, hkv, num_logical)) < empty_frac
    kmax[empty], kmin[empty] = -np.inf, np.inf
    return kmax, kmin, empty


def _brute_logical_scores(q, kmax, kmin):
    b, hq, d = q.shape
    hkv, n = kmax.shape[1], kmax.shape[2]
    g = hq // hkv
    out = np.empty((b, hq, n), np.float32)
    for bi in range(b):
        for h in range(hq):
            for j in range(n):
                hi, lo = kmax[bi, h // g, j], kmin[bi, h // g, j]
                if np.isneginf(hi).all():
                    out[bi, h, j] = -np.inf
                else:
                    out[bi, h, j] = np.maximum(q[bi, h] * hi, q[bi, h] * lo).sum()
    return out


@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2), (8, 2)])  # G = 1, 3, 4
def test_logical_scores_match_brute_force(hq, hkv):
    rng = np.random.default_rng(hq * 10 + hkv)
    b, d, num_logical = 2, 16, 12
    kmax, kmin, empty = _random_stats(rng, b, hkv, num_logical, d)
    q = rng.standard_normal((b, hq, d)).astype(np.float32)
    q[0, 0, :] = 0.0          # an all-zero query head
    q[1, :, ::3] = 0.0        # zero channels: 0·(±inf) must not leak NaN
    got = np.asarray(jax.jit(logical_page_scores)(q, kmax, kmin))
    want = _brute_logical_scores(q, kmax, kmin)
    assert got.shape == (b, hq, num_logical) and got.dtype == np.float32
    assert not np.isnan(got).any()
    g = hq // hkv
    assert (np.isneginf(got) == np.repeat(empty, g, axis=1)).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # an all-zero query scores 0 on every non-empty page
    assert (got[0, 0][~empty[0, 0]] == 0.0).all()


@pytest.mark.parametrize("seed", range(5))
def test_logical_score_upper_bounds_every_key(seed):
    rng = np.random.default_rng(seed)
    b, hq, hkv, d, num_logical, lps = 2, 4, 2, 8, 6, 16
    keys = rng.standard_normal((b, hkv, num_logical, lps, d)).astype(np.float32) * 3
    kmax, kmin = keys.max(3), keys.min(3)
    q = rng.standard_normal((b, hq, d)).astype(np.float32)
    scores = np.asarray(logical_page_scores(q, kmax, kmin))  # [b, hq, j]
    kv_head = np.arange(hq) // (hq // hkv)
    qk = np.einsum("bhd,bhjtd->bhjt", q, keys[:, kv_head])  # every key of every page
    assert (scores[..., None] >= qk - 1e-4).all()


def test_physical_scores_are_max_over_logical_groups():
    rng = np.random.default_rng(0)
    b, h, p, lpp = 2, 3, 5, 4
    logical = rng.standard_normal((b, h, p * lpp)).astype(np.float32)
    logical[0, 0, 4:8] = -np.inf  # a fully empty physical page
    logical[1, 2, 19] = -np.inf   # a partially filled one
    got = np.asarray(jax.jit(physical_page_scores, static_argnums=1)(logical, lpp))
    want = np.array([[[logical[bi, hi, pi * lpp:(pi + 1) * lpp].max() for pi in range(p)]
                      for hi in range(h)] for bi in range(b)])
    np.testing.assert_array_equal(got, want)
    assert np.isneginf(got[0, 0, 1])


@pytest.mark.parametrize("reduce", ["max", "sum"])
def test_combine_query_heads(reduce):
    rng = np.random.default_rng(1)
    b, hq, hkv, p = 2, 8, 2, 7
    scores = rng.standard_normal((b, hq, p)).astype(np.float32)
    scores[:, :, -1] = -np.inf
    fn = jax.jit(functools.partial(combine_query_heads, reduce=reduce), static_argnums=1)
    got = np.asarray(fn(scores, hkv))
    grouped = scores.reshape(b, hkv, hq // hkv, p)
    want = grouped.max(2) if reduce == "max" else grouped.sum(2)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    with pytest.raises(ValueError):
        combine_query_heads(scores, hkv, reduce="mean")


def _check_selection(scores, num_pages, k, first=0):
    fn = jax.jit(select_pages, static_argnums=(2, 3))
    pages, valid = (np.asarray(x) for x in fn(jnp.asarray(scores), jnp.asarray(num_pages), k,
                                               first))
    ref_pages, ref_valid = reference_select_pages(scores, num_pages, k, first)
    np.testing.assert_array_equal(pages, ref_pages)
    np.testing.assert_array_equal(valid, ref_valid)
    assert pages.dtype == np.int32 and valid.dtype == bool and pages.shape == scores.shape[:2] + (k,)
    for bi, n in enumerate(num_pages):
        count = valid[bi].sum(-1)
        assert (count == min(n, k)).all()
        for hi in range(scores.shape[1]):
            sel = pages[bi, hi][valid[bi, hi]]
            assert (np.diff(sel) > 0).all()          # ascending, no duplicates
            assert (sel < n).all()                   # never a page without tokens
            assert (pages[bi, hi][~valid[bi, hi]] == 0).all()
            if n > 0:
                assert sel[-1] == n - 1              # the newest page is always kept
            assert set(range(min(first, n))) <= set(sel.tolist())  # and the first pages


@pytest.mark.parametrize("seed", range(4))
def test_select_keeps_first_pages(seed):
    """The attention-sink option: the first F pages are always selected, the rest of the rule
    (newest page, top scores, tie order, short histories) unchanged; F = 0 is the plain rule."""
    rng = np.random.default_rng(200 + seed)
    b, h, p, k = 6, 2, 16, int(rng.integers(3, 9))
    first = int(rng.integers(0, k))
    scores = rng.choice([-np.inf, -1.0, 0.0, 1.0, 2.5, np.nan], size=(b, h, p)).astype(np.float32)
    scores[:, :, :first] = -np.inf  # the first pages would never win on score
    num_pages = rng.integers(0, p + 1, b).astype(np.int32)
    _check_selection(scores, num_pages, k, first)
    scores = jnp.asarray([[[-1.0, 1.0, 2.0, 9.0, 0.0, 3.0]]])
    plain, _ = select_pages(scores, jnp.array([6], jnp.int32), 3)
    kept, _ = select_pages(scores, jnp.array([6], jnp.int32), 3, 1)
    np.testing.assert_array_equal(plain, [[[2, 3, 5]]])
    np.testing.assert_array_equal(kept, [[[0, 3, 5]]])
    with pytest.raises(ValueError, match="keep_first_pages"):
        select_pages(jnp.zeros((1, 1, 8)), jnp.array([5], jnp.int32), 3, 3)


@pytest.mark.parametrize("k", range(3, 9))
def test_select_matches_reference_with_ties(k):
    rng = np.random.default_rng(k)
    b, h, p = 8, 3, 12
    scores = rng.integers(0, 4, (b, h, p)).astype(np.float32)  # many ties
    # pages beyond num_pages hold garbage, including +inf and NaN
    num_pages = np.array([0, 1, k - 1, k, k + 1, p, rng.integers(0, p + 1), 2], np.int32)
    for bi, n in enumerate(num_pages):
        scores[bi, :, n:] = rng.choice([np.inf, np.nan, 100.0, -np.inf], size=(h, p - n))
    _check_selection(scores, num_pages, k)


@pytest.mark.parametrize("seed", range(4))
def test_select_random_lengths_and_special_scores(seed):
    rng = np.random.default_rng(100 + seed)
    b, h, p, k = 6, 2, 16, int(rng.integers(3, 9))
    scores = rng.choice([-np.inf, -1.0, -0.0, 0.0, 1.0, 2.5, np.nan], size=(b, h, p))
    num_pages = rng.integers(0, p + 1, b).astype(np.int32)
    _check_selection(scores.astype(np.float32), num_pages, k)


def test_select_tie_rule_prefers_lower_page_index():
    scores = np.array([[[1.0, 2.0, 2.0, 1.0, 2.0, 0.0, 9.0]]], np.float32)
    pages, valid = select_pages(jnp.asarray(scores), jnp.array([7], jnp.int32), 3)
    # newest = 6 regardless of its score; top 2 of pages 0..5 by (score desc, index asc) = 1, 2
    np.testing.assert_array_equal(pages, [[[1, 2, 6]]])
    assert np.asarray(valid).all()


def test_select_budget_not_smaller_than_capacity():
    scores = np.zeros((2, 1, 4), np.float32)
    _check_selection(scores, np.array([4, 2], np.int32), 5)
    _check_selection(scores, np.array([4, 3], np.int32), 4)


def test_budget_below_three_is_rejected():
    scores = jnp.zeros((1, 1, 8))
    with pytest.raises(ValueError, match="budget_pages"):
        select_pages(scores, jnp.array([5], jnp.int32), 2)
    with pytest.raises(ValueError, match="budget_pages"):
        jax.jit(select_pages, static_argnums=2)(scores, jnp.array([5], jnp.int32), 1)
    with pytest.raises(ValueError, match="budget_pages"):
        reference_select_pages(np.zeros((1, 1, 8)), np.array([5]), 2)
