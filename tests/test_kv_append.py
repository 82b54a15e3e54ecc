"""The decode append kernel (pallas_kernels/kv_append.py): kernel (interpret mode, and natively
on a GPU) vs its jnp reference vs a NumPy loop, with and without key statistics, invalid rows,
tokens that start a logical page and tokens that continue one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import lower_for_cuda

from pallas_kernels import append_tokens, append_tokens_reference

LPS = 16  # logical page size


def make_case(seed, *, batch=5, heads=3, pages=9, page_size=64, d=64, dtype=jnp.float32,
              stats=True):
    rng = np.random.default_rng(seed)
    pools = rng.standard_normal((2, heads, pages, page_size, d)).astype(np.float32)
    new = rng.standard_normal((2, batch, heads, d)).astype(np.float32)
    page = rng.permutation(np.arange(1, pages))[:batch].astype(np.int32)  # distinct pages
    # Row 0 starts a logical page, row 1 continues one, the others anywhere.
    offset = rng.integers(0, page_size, batch).astype(np.int32)
    offset[0], offset[1] = 2 * LPS, 2 * LPS + 5
    valid = np.ones(batch, bool)
    valid[-1] = False
    kmax = rng.standard_normal((heads, pages, page_size // LPS, d)).astype(np.float32)
    kmin = kmax - np.abs(rng.standard_normal(kmax.shape)).astype(np.float32)
    args = [jnp.asarray(pools[0], dtype), jnp.asarray(pools[1], dtype),
            jnp.asarray(new[0], dtype), jnp.asarray(new[1], dtype), jnp.asarray(page),
            jnp.asarray(offset), jnp.asarray(valid)]
    if stats:
        args += [jnp.asarray(kmax, dtype), jnp.asarray(kmin, dtype)]
    return args


def brute_force(k, v, k_new, v_new, page, offset, valid, kmax=None, kmin=None):
    k, v, k_new, v_new = (np.array(x, np.float32) for x in (k, v, k_new, v_new))
    kmax = None if kmax is None else np.array(kmax, np.float32)
    kmin = None if kmin is None else np.array(kmin, np.float32)
    for b in range(len(page)):
        if not valid[b]:
            continue
        p, o = int(page[b]), int(offset[b])
        k[:, p, o], v[:, p, o] = k_new[b], v_new[b]
        if kmax is not None:
            j = o // LPS
            if o % LPS == 0:
                kmax[:, p, j], kmin[:, p, j] = k_new[b], k_new[b]
            else:
                kmax[:, p, j] = np.maximum(kmax[:, p, j], k_new[b])
                kmin[:, p, j] = np.minimum(kmin[:, p, j], k_new[b])
    return k, v, kmax, kmin


def check(got, expected):
    for g, e in zip(got, expected):
        if e is None:
            assert g is None
        else:
            np.testing.assert_array_equal(np.asarray(g, np.float32), e)


@pytest.mark.parametrize("stats", [True, False])
def test_reference_matches_brute_force(stats):
    case = make_case(0, stats=stats)
    ref = jax.jit(append_tokens_reference, static_argnames="logical_page_size")
    check(ref(*case, logical_page_size=LPS), brute_force(*case))


class TestKernel:
    interpret = True

    @pytest.mark.parametrize("stats,dtype,heads,d", [
        (True, jnp.float32, 3, 64), (False, jnp.float32, 1, 128), (True, jnp.bfloat16, 4, 128),
        (False, jnp.bfloat16, 2, 64)])
    def test_matches_brute_force(self, stats, dtype, heads, d):
        case = make_case(1, heads=heads, d=d, dtype=dtype, stats=stats)
        expected = brute_force(*case)  # before the call: the pools are donated below
        op = jax.jit(append_tokens, static_argnames=("logical_page_size", "impl", "interpret"),
                     donate_argnums=(0, 1, 7, 8) if stats else (0, 1))
        check(op(*case, logical_page_size=LPS, impl="pallas", interpret=self.interpret),
              expected)


@pytest.mark.gpu
class TestKernelGpu(TestKernel):
    interpret = False


def test_kernel_lowers_to_triton():
    pool = jax.ShapeDtypeStruct((4, 100, 64, 128), jnp.bfloat16)
    stats = jax.ShapeDtypeStruct((4, 100, 4, 128), jnp.bfloat16)
    new = jax.ShapeDtypeStruct((3, 4, 128), jnp.bfloat16)
    ints = jax.ShapeDtypeStruct((3,), jnp.int32)
    valid = jax.ShapeDtypeStruct((3,), jnp.bool_)
    traced = append_tokens.trace(pool, pool, new, new, ints, ints, valid, stats, stats,
                                 logical_page_size=16)
    assert "triton" in lower_for_cuda(traced)


@pytest.mark.parametrize("change,match", [
    (dict(impl="cuda"), "impl"),
    (dict(k_new=jnp.zeros((5, 2, 64))), "k_new.shape"),
    (dict(pages=jnp.zeros((5,), jnp.int16)), "pages"),
    (dict(kmin=None), "go together"),
    (dict(logical_page_size=24), "logical_page_size"),
])
def test_bad_arguments(change, match):
    k, v, kn, vn, p, o, valid, kmax, kmin = make_case(2)
    args = dict(k_pool=k, v_pool=v, k_new=kn, v_new=vn, pages=p, offsets=o, valid=valid,
                kmax=kmax, kmin=kmin, logical_page_size=LPS)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        append_tokens(**args)


def test_pallas_needs_a_power_of_two_head_dim():
    case = make_case(3, d=96, stats=False)
    with pytest.raises(ValueError, match="power of two"):
        append_tokens(*case, impl="pallas", interpret=True)
