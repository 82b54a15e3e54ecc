"""Row-gated page selector kernels (LServe §4; Quest): `page_scores` and `select_top_pages`
against their jnp references, `models.page_selector` and its NumPy oracle.

Cases are built the way the model builds them: shuffled page tables with repeated physical pages
(exact score ties), ragged `num_pages` ending inside and on page blocks, empty and half-empty
pages, unused columns and gated-off rows pointing at NaN-filled statistics, scores with NaN,
±0.0 and ±inf. `TestKernels` runs the Triton kernels in interpret mode on CPU; `TestKernelsGpu`
runs the same checks natively plus long contexts.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, lower_for_cuda

from models.page_selector import (
    combine_query_heads,
    logical_page_scores,
    physical_page_scores,
    reference_select_pages,
    select_dense_pages,
    select_pages,
)
from pallas_kernels import (
    page_scores,
    page_scores_reference,
    select_top_pages,
    select_top_pages_reference,
)
from pallas_kernels.page_select import default_select_num_warps

NAN_PAGE, EMPTY_PAGE, HALF_EMPTY_PAGE = 1, 2, 3  # special pool pages of make_case


def make_case(seed, *, batch=4, num_kv_heads=2, group=3, head_dim=64, cols=12, logical=2,
              dtype=jnp.float32, q_dtype=None, integer=False):
    """Random queries, statistics and page table (NumPy, then device arrays).

    Pool page 1 holds NaN statistics, 2 is empty (every logical page kmax = -inf, kmin = +inf),
    3 has its last logical page empty. Rows: 0 full, 1 ragged, 2 short (2 pages), 3 full but
    not due (`need` False) with every column on the NaN page. Columns at or past num_pages also
    point at the NaN page; rows 0-2 repeat some physical pages (equal scores). `integer`: small
    integer values, so every bound is exact in f32 in any summation order and the kernels'
    selection must equal `select_dense_pages`' exactly, ties included.

    Returns (q, kmax, kmin, page_table, num_pages, need).
    """
    rng = np.random.default_rng(seed)
    pool = 4 + batch * cols
    if integer:
        a = rng.integers(-4, 5, (2, num_kv_heads, pool, logical, head_dim)).astype(np.float32)
        q = rng.integers(-3, 4, (batch, num_kv_heads, group, head_dim)).astype(np.float32)
    else:
        a = rng.standard_normal((2, num_kv_heads, pool, logical, head_dim)).astype(np.float32)
        q = rng.standard_normal((batch, num_kv_heads, group, head_dim)).astype(np.float32)
    q[0, 0, 0, ::4] = 0.0  # zero channels meet the empty pages' infinities: no NaN may leak
    kmax, kmin = a.max(0), a.min(0)
    kmax[:, NAN_PAGE], kmin[:, NAN_PAGE] = np.nan, np.nan
    kmax[:, EMPTY_PAGE], kmin[:, EMPTY_PAGE] = -np.inf, np.inf
    kmax[:, HALF_EMPTY_PAGE, -1], kmin[:, HALF_EMPTY_PAGE, -1] = -np.inf, np.inf
    num_pages = np.array([cols, cols - 3, 2, cols][:batch], np.int32)
    need = np.array([True, True, True, False][:batch])
    table = np.full((batch, cols), NAN_PAGE, np.int32)
    free = iter(rng.permutation(np.arange(4, pool)))
    for b in range(batch):
        if not need[b]:
            continue
        n = int(num_pages[b])
        table[b, :n] = [next(free) for _ in range(n)]
        if n > 4:
            table[b, 1] = EMPTY_PAGE
            table[b, 2] = HALF_EMPTY_PAGE
            table[b, n - 2] = table[b, 3]  # a repeated page: an exact tie
    return (jnp.asarray(q, q_dtype or dtype), jnp.asarray(kmax, dtype), jnp.asarray(kmin, dtype),
            jnp.asarray(table), jnp.asarray(num_pages), jnp.asarray(need))


def model_scores(q, kmax, kmin, table, *, per_query_head):
    """`models.page_selector`'s scores of every row (as in `select_dense_pages`)."""
    b, hd, g, d = q.shape
    seq_max = jnp.moveaxis(kmax[:, table], 1, 0).reshape(b, hd, -1, d)
    seq_min = jnp.moveaxis(kmin[:, table], 1, 0).reshape(b, hd, -1, d)
    s = physical_page_scores(logical_page_scores(q.reshape(b, hd * g, d), seq_max, seq_min),
                             kmax.shape[2])
    return s if per_query_head else combine_query_heads(s, hd)


def assert_scores(actual, expected):
    """Same -inf pattern, no NaN, finite scores within f32 tolerance (both accumulate in f32)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape and actual.dtype == np.float32
    assert not np.isnan(actual).any(), "NaN score"
    np.testing.assert_array_equal(np.isneginf(actual), np.isneginf(expected))
    finite = np.isfinite(expected)
    assert_close(actual[finite], expected[finite], jnp.float32)


def score_rows(scores, seed=0):
    """Scores with special values in fixed columns: ties, NaN, ±0.0, ±inf, runs of equal
    scores."""
    rng = np.random.default_rng(seed)
    s = np.array(scores, np.float32)
    s[..., 2] = s[..., 5]
    s[..., 6] = np.nan
    s[..., 7], s[..., 8] = -0.0, 0.0  # equal: the lower index must win
    s[..., 9] = np.inf
    s[..., 10] = -np.inf
    s[0, 0, 3] = -0.0
    s[..., 11:] = rng.choice([0.5, -0.5, 1.5], s[..., 11:].shape)  # many equal scores
    return s


def select_oracle(scores, num_pages, need, budget_pages, keep_first_pages):
    pages, _ = reference_select_pages(scores, num_pages, budget_pages, keep_first_pages)
    return np.where(np.asarray(need)[:, None, None], pages, 0)


# --- the references ------------------------------------------------------------------------------

@pytest.mark.parametrize("per_query_head", [True, False])
@pytest.mark.parametrize("group,head_dim,dtype", [
    (1, 64, jnp.float32), (3, 96, jnp.bfloat16), (4, 128, jnp.bfloat16)])
def test_scores_reference_matches_page_selector(per_query_head, group, head_dim, dtype):
    """The jnp reference is `models.page_selector`'s math on the rows due, -inf elsewhere."""
    q, kmax, kmin, table, n, need = make_case(1, group=group, head_dim=head_dim, dtype=dtype)
    got = jax.jit(page_scores_reference, static_argnames="per_query_head")(
        q, kmax, kmin, table, n, need, per_query_head=per_query_head)
    want = np.asarray(model_scores(q, kmax, kmin, table, per_query_head=per_query_head))
    keep = (np.arange(table.shape[1]) < np.asarray(n)[:, None]) & np.asarray(need)[:, None]
    want = np.where(keep[:, None], want, -np.inf)
    assert_scores(got, want)
    assert (np.asarray(got)[3] == -np.inf).all()  # the row not due


@pytest.mark.parametrize("budget_pages,keep_first_pages", [(4, 0), (5, 1), (6, 2), (12, 0)])
def test_select_reference_matches_select_pages(budget_pages, keep_first_pages):
    """Two-key-sort reference == `select_pages` == NumPy oracle; n <= K and n > K rows."""
    q, kmax, kmin, table, n, need = make_case(2, cols=13)
    scores = score_rows(model_scores(q, kmax, kmin, table, per_query_head=True))
    got = select_top_pages(scores, n, need, budget_pages=budget_pages,
                           keep_first_pages=keep_first_pages, impl="xla")
    want = select_oracle(scores, n, need, budget_pages, keep_first_pages)
    np.testing.assert_array_equal(got, want)
    pages, _ = jax.jit(select_pages, static_argnums=(2, 3))(scores, n, budget_pages,
                                                             keep_first_pages)
    np.testing.assert_array_equal(np.asarray(got)[:3], np.asarray(pages)[:3])


def test_xla_pipeline_matches_select_dense_pages():
    q, kmax, kmin, table, n, need = make_case(3, integer=True)
    for per_query_head in (True, False):
        s = page_scores(q, kmax, kmin, table, n, need, per_query_head=per_query_head,
                        impl="xla")
        got = select_top_pages(s, n, need, budget_pages=4, keep_first_pages=1, impl="xla")
        want = select_dense_pages(q, kmax, kmin, table, n, budget_pages=4,
                                  per_query_head=per_query_head, keep_first_pages=1)
        np.testing.assert_array_equal(np.asarray(got)[:3], np.asarray(want)[:3])


@pytest.mark.parametrize("num_cols,expected", [(1, 4), (3000, 4), (4096, 4), (8192, 8),
                                               (16384, 16)])
def test_default_select_num_warps(num_cols, expected):
    assert default_select_num_warps(num_cols) == expected


# --- the kernels ---------------------------------------------------------------------------------

class TestKernels:
    """Kernels (interpret mode) vs the references, `models.page_selector` and its oracle."""

    interpret = True

    def scores(self, *case, **kwargs):
        return page_scores(*case, impl="pallas", interpret=self.interpret, **kwargs)

    def select(self, *args, **kwargs):
        return select_top_pages(*args, impl="pallas", interpret=self.interpret, **kwargs)

    @pytest.mark.parametrize("group,head_dim,per_query_head,dtype,q_dtype,block_pages", [
        (1, 64, True, jnp.float32, None, 4),  # 3 blocks; row 1 ends inside block 2
        (3, 96, False, jnp.bfloat16, None, 4),  # padded head dim
        (4, 128, True, jnp.bfloat16, jnp.float32, 8),  # a partial last block
        (3, 128, True, jnp.float32, jnp.bfloat16, 64),  # one block wider than the row
        (4, 64, False, jnp.float16, None, 2),
    ])
    def test_scores_match_reference(self, group, head_dim, per_query_head, dtype, q_dtype,
                                    block_pages):
        case = make_case(10 + group, group=group, head_dim=head_dim, dtype=dtype,
                         q_dtype=q_dtype)
        got = self.scores(*case, per_query_head=per_query_head, block_pages=block_pages)
        want = page_scores_reference(*case, per_query_head=per_query_head)
        assert got.shape == (4, 2 * group if per_query_head else 2, 12)
        assert_scores(got, want)
        # Row 3 is not due and reads NaN statistics if it reads any: exactly -inf. Unused
        # columns of the ragged rows also point at the NaN page.
        assert (np.asarray(got)[3] == -np.inf).all()
        assert (np.asarray(got)[1, :, 9:] == -np.inf).all()
        assert (np.asarray(got)[2, :, 2:] == -np.inf).all()

    def test_scores_need_none_scores_every_row(self):
        q, kmax, kmin, table, n, _ = make_case(12, batch=3, group=2)
        got = self.scores(q, kmax, kmin, table, n, per_query_head=False, block_pages=8)
        assert_scores(got, page_scores_reference(q, kmax, kmin, table, n,
                                                 per_query_head=False))

    @pytest.mark.parametrize("budget_pages,keep_first_pages,num_cols", [
        (4, 0, 13),  # K a power of two; P not
        (5, 1, 13),
        (6, 2, 16),  # P a power of two
        (14, 0, 16),  # K close to P: rows with n = 13 <= K and n = 16 > K
        (16, 1, 13),  # K >= P: every row short, no launch
    ])
    def test_select_matches_oracle(self, budget_pages, keep_first_pages, num_cols):
        """Ties, NaN, ±0.0, ±inf; rows with n > K, n <= K, and not due (all 0)."""
        q, kmax, kmin, table, n, need = make_case(20, cols=num_cols)
        scores = score_rows(model_scores(q, kmax, kmin, table, per_query_head=True))
        got = self.select(scores, n, need, budget_pages=budget_pages,
                          keep_first_pages=keep_first_pages)
        assert got.shape == (4, 6, budget_pages) and got.dtype == jnp.int32
        want = select_oracle(scores, n, need, budget_pages, keep_first_pages)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got, select_top_pages_reference(
            scores, n, need, budget_pages=budget_pages, keep_first_pages=keep_first_pages))

    def test_select_all_candidates_tied_nan_or_signed_zero(self):
        """Rows of equal scores, of NaN, and -0.0 before +0.0 at the cut: the lowest indices
        win, then the newest page."""
        scores = np.zeros((3, 2, 10), np.float32)
        scores[0, 1] = -0.0
        scores[1] = np.nan
        scores[2] = [5.0, -0.0, 0.0, -1.0, -2.0, 9.0, 9.0, 9.0, 9.0, 9.0]  # n = 6: 5 is newest
        n = jnp.asarray([10, 7, 6], jnp.int32)
        got = self.select(scores, n, budget_pages=4, keep_first_pages=0)
        np.testing.assert_array_equal(got[0], [[0, 1, 2, 9]] * 2)
        np.testing.assert_array_equal(got[1], [[0, 1, 2, 6]] * 2)
        got = self.select(scores[2:], n[2:], budget_pages=3, keep_first_pages=0)
        np.testing.assert_array_equal(got[0], [[0, 1, 5]] * 2)

    @pytest.mark.parametrize("per_query_head,group,keep_first_pages,dtype", [
        (True, 3, 0, jnp.bfloat16), (False, 4, 2, jnp.float32), (False, 1, 1, jnp.bfloat16)])
    def test_pipeline_matches_select_dense_pages(self, per_query_head, group, keep_first_pages,
                                                 dtype):
        """Both kernels end to end == `select_dense_pages` on the rows due (integer data: the
        scores are exact, so the selection must match exactly, ties included)."""
        case = make_case(30 + group, group=group, dtype=dtype, integer=True)
        q, kmax, kmin, table, n, need = case
        scores = self.scores(*case, per_query_head=per_query_head, block_pages=4)
        got = self.select(scores, n, need, budget_pages=5, keep_first_pages=keep_first_pages)
        want = select_dense_pages(q, kmax, kmin, table, n, budget_pages=5,
                                  per_query_head=per_query_head,
                                  keep_first_pages=keep_first_pages)
        np.testing.assert_array_equal(np.asarray(got)[:3], np.asarray(want)[:3])
        np.testing.assert_array_equal(np.asarray(got)[3], 0)


@pytest.mark.gpu
class TestKernelsGpu(TestKernels):
    """The same checks natively on the GPU, plus long contexts (a 256K-token context: 4096
    pages of 64 tokens; a 1M-token row of 16384 pages for the selection)."""

    interpret = False

    @pytest.mark.parametrize("per_query_head", [True, False])
    def test_long_context_bf16(self, per_query_head):
        case = make_case(40, batch=2, num_kv_heads=4, group=4, head_dim=128, cols=4096,
                         logical=4, dtype=jnp.bfloat16)
        got = self.scores(*case, per_query_head=per_query_head)
        assert_scores(got, page_scores_reference(*case, per_query_head=per_query_head))

    @pytest.mark.parametrize("num_cols,budget_pages,keep_first_pages", [
        (4096, 64, 1), (16384, 256, 0), (16384, 3, 2)])
    def test_long_select(self, num_cols, budget_pages, keep_first_pages):
        rng = np.random.default_rng(num_cols + budget_pages)
        scores = rng.standard_normal((2, 8, num_cols)).astype(np.float32)
        scores[..., ::7] = scores[..., 3:4]  # many ties
        n = jnp.asarray([num_cols, num_cols // 3], jnp.int32)
        need = jnp.asarray([True, True])
        got = self.select(scores, n, need, budget_pages=budget_pages,
                          keep_first_pages=keep_first_pages)
        np.testing.assert_array_equal(got, select_top_pages_reference(
            scores, n, need, budget_pages=budget_pages, keep_first_pages=keep_first_pages))


# --- Triton lowering -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,q_dtype,group,head_dim,per_query_head", [
    (jnp.bfloat16, jnp.bfloat16, 4, 128, True), (jnp.float32, jnp.float32, 3, 96, False),
    (jnp.float16, jnp.bfloat16, 1, 64, True)])
def test_page_scores_lowers_to_triton(dtype, q_dtype, group, head_dim, per_query_head):
    """The Triton lowering runs without a GPU: catches unsupported ops and types on CPU."""
    stats = jax.ShapeDtypeStruct((4, 500, 4, head_dim), dtype)
    traced = page_scores.trace(
        jax.ShapeDtypeStruct((2, 4, group, head_dim), q_dtype), stats, stats,
        jax.ShapeDtypeStruct((2, 300), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.int32),
        jax.ShapeDtypeStruct((2,), jnp.bool_), per_query_head=per_query_head)
    assert "triton" in lower_for_cuda(traced)


@pytest.mark.parametrize("num_cols,budget_pages,keep_first_pages", [
    (300, 16, 1), (16384, 64, 0), (4096, 5, 2)])
def test_select_top_pages_lowers_to_triton(num_cols, budget_pages, keep_first_pages):
    traced = select_top_pages.trace(
        jax.ShapeDtypeStruct((2, 8, num_cols), jnp.float32), jax.ShapeDtypeStruct((2,), jnp.int32),
        jax.ShapeDtypeStruct((2,), jnp.bool_), budget_pages=budget_pages,
        keep_first_pages=keep_first_pages)
    assert "triton" in lower_for_cuda(traced)


# --- argument checking ---------------------------------------------------------------------------

@pytest.mark.parametrize("change,match", [
    (dict(impl="cuda"), "impl"),
    (dict(q=jnp.zeros((2, 2, 16))), r"\[B, Hd, G, D\]"),
    (dict(kmin=jnp.zeros((2, 5, 2, 8))), "kmax and kmin"),
    (dict(kmax=jnp.zeros((3, 5, 2, 16)), kmin=jnp.zeros((3, 5, 2, 16))), "Hd=2"),
    (dict(kmax=jnp.zeros((2, 5, 2, 8)), kmin=jnp.zeros((2, 5, 2, 8))), "D=16"),
    (dict(q=jnp.zeros((2, 2, 3, 16), jnp.int32)), "q.dtype"),
    (dict(kmin=jnp.zeros((2, 5, 2, 16), jnp.bfloat16)), "share one of"),
    (dict(page_table=jnp.zeros((3, 6), jnp.int32)), "page_table"),
    (dict(page_table=jnp.zeros((2, 6), jnp.int16)), "page_table"),
    (dict(num_pages=jnp.zeros((3,), jnp.int32)), "num_pages"),
    (dict(num_pages=jnp.zeros((2,), jnp.float32)), "num_pages"),
    (dict(need=jnp.ones((2,), jnp.int32)), "need must be bool"),
    (dict(need=jnp.ones((3,), bool)), "need must be bool"),
    (dict(block_pages=12), "block_pages"),
])
def test_page_scores_bad_arguments(change, match):
    args = dict(q=jnp.zeros((2, 2, 3, 16)), kmax=jnp.zeros((2, 5, 2, 16)),
                kmin=jnp.zeros((2, 5, 2, 16)), page_table=jnp.zeros((2, 6), jnp.int32),
                num_pages=jnp.zeros((2,), jnp.int32), need=jnp.ones((2,), bool),
                per_query_head=True, interpret=True)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        page_scores(**args)


@pytest.mark.parametrize("change,match", [
    (dict(impl="cuda"), "impl"),
    (dict(scores=jnp.zeros((2, 6))), r"\[B, H, P\]"),
    (dict(scores=jnp.zeros((2, 3, 6), jnp.int32)), "scores.dtype"),
    (dict(num_pages=jnp.zeros((2, 1), jnp.int32)), "num_pages"),
    (dict(need=jnp.ones((2,), jnp.float32)), "need must be bool"),
    (dict(budget_pages=2), "budget_pages"),
    (dict(keep_first_pages=4), "keep_first_pages"),
    (dict(keep_first_pages=-1), "keep_first_pages"),
    (dict(scores=jnp.zeros((2, 1, 16385))), "impl='xla'"),
])
def test_select_top_pages_bad_arguments(change, match):
    args = dict(scores=jnp.zeros((2, 3, 6)), num_pages=jnp.zeros((2,), jnp.int32),
                need=jnp.ones((2,), bool), budget_pages=4, interpret=True)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        select_top_pages(**args)
