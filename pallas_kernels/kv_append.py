"""Append one decode token per sequence to a page pool, in place, in one launch (LServe,
arXiv 2502.14866).

A decode step writes each sequence's new key and value into its page, and for the dense heads
folds the key into its logical page's key max/min (the page selector's statistics, restarted on
a logical page's first token). Written in XLA that is one scatter per array (K, V, and each
statistic), per layer and per token. This kernel does all of it in one
launch per pool: program b stores sequence b's rows for every head of the pool at
(page, offset) and, when statistics are kept, updates its logical page's max and min in the
statistics' dtype. The pools come back as the same buffers (`input_output_aliases`), so under a
donated jit the update is in place.

Rows with `valid` False write nothing. Valid rows must name distinct (page, logical page)
pairs, which holds for decode: each sequence owns its pages and writes one token.

Layers: `_kernel` -> `_pallas_append` (grid and BlockSpecs) -> `append_tokens` (public jitted op,
`impl="triton" | "xla"`); `append_tokens_reference` is the same update in plain jnp.

Shapes: B sequences, H heads of the pool, P pages, S page size, L logical pages per page, D head
dim (a power of two for the kernel: one row is one Triton vector).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.impls import check_impl


def _kernel(page_ref, offset_ref, valid_ref, k_new_ref, v_new_ref, *refs, num_heads,
            logical_page_size, with_stats):
    """One sequence's token. page_ref, offset_ref, valid_ref [] int32; k_new_ref, v_new_ref
    [H, D]; then the input pools (unused: the outputs alias them) and the output refs k, v
    [H, P, S, D] (and kmax, kmin [H, P, L, D])."""
    outs = refs[len(refs) // 2:]
    k_ref, v_ref = outs[:2]
    page, offset = page_ref[...], offset_ref[...]

    @pl.when(valid_ref[...] != 0)
    def _():
        logical = offset // logical_page_size if with_stats else 0
        fresh = offset % logical_page_size == 0 if with_stats else False
        for h in range(num_heads):  # H is small and static: one row store per head
            key = k_new_ref[h]  # [D]
            k_ref[h, page, offset] = key.astype(k_ref.dtype)
            v_ref[h, page, offset] = v_new_ref[h].astype(v_ref.dtype)
            if with_stats:
                kmax_ref, kmin_ref = outs[2:]
                key = key.astype(kmax_ref.dtype)
                old_max, old_min = kmax_ref[h, page, logical], kmin_ref[h, page, logical]
                kmax_ref[h, page, logical] = jnp.where(fresh, key, jnp.maximum(old_max, key))
                kmin_ref[h, page, logical] = jnp.where(fresh, key, jnp.minimum(old_min, key))


def _pallas_append(pools, k_new, v_new, pages, offsets, valid, *, logical_page_size,
                   interpret):
    batch, num_heads, d = k_new.shape
    full = lambda x: pl.BlockSpec(x.shape, lambda b: (0,) * x.ndim)  # noqa: E731
    scalar = pl.BlockSpec((None,), lambda b: (b,))
    row = pl.BlockSpec((None, num_heads, d), lambda b: (b, 0, 0))
    kernel = functools.partial(_kernel, num_heads=num_heads, logical_page_size=logical_page_size,
                               with_stats=len(pools) == 4)
    first_pool = 5  # operand index of the first pool
    return pl.pallas_call(
        kernel,
        grid=(batch,),
        in_specs=[scalar, scalar, scalar, row, row, *(full(x) for x in pools)],
        out_specs=[full(x) for x in pools],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in pools],
        input_output_aliases={first_pool + i: i for i in range(len(pools))},
        # One program writes a few rows: one warp is plenty.
        compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1),
        interpret=interpret,
        name="kv_append",
    )(pages, offsets, valid.astype(jnp.int32), k_new, v_new, *pools)


def append_tokens_reference(k_pool, v_pool, k_new, v_new, pages, offsets, valid, kmax=None,
                            kmin=None, *, logical_page_size=None):
    """Plain-jnp reference with the arguments and results of `append_tokens`."""
    num_pages = k_pool.shape[1]
    target = jnp.where(valid, pages, num_pages)  # invalid rows: out of range, dropped
    # [B, H, D] -> [H, B, D] to line up with pool[:, target, offsets].
    k_rows, v_rows = jnp.moveaxis(k_new, 1, 0), jnp.moveaxis(v_new, 1, 0)
    k_pool = k_pool.at[:, target, offsets].set(k_rows.astype(k_pool.dtype), mode="drop")
    v_pool = v_pool.at[:, target, offsets].set(v_rows.astype(v_pool.dtype), mode="drop")
    if kmax is None:
        return k_pool, v_pool, None, None
    logical = offsets // logical_page_size
    fresh = (offsets % logical_page_size == 0)[None, :, None]
    keys = k_rows.astype(kmax.dtype)
    safe = jnp.where(valid, pages, 0)
    new_max = jnp.where(fresh, keys, jnp.maximum(kmax[:, safe, logical], keys))
    new_min = jnp.where(fresh, keys, jnp.minimum(kmin[:, safe, logical], keys))
    kmax = kmax.at[:, target, logical].set(new_max, mode="drop")
    kmin = kmin.at[:, target, logical].set(new_min, mode="drop")
    return k_pool, v_pool, kmax, kmin


def _validate(k_pool, v_pool, k_new, v_new, pages, offsets, valid, kmax, kmin,
              logical_page_size, impl):
    if k_pool.ndim != 4 or k_pool.shape != v_pool.shape:
        raise ValueError(f"k_pool and v_pool must both be [H, P, S, D]; got {k_pool.shape=} "
                         f"{v_pool.shape=}")
    h, _, _, d = k_pool.shape
    batch = pages.shape[0] if pages.ndim == 1 else -1
    for name, x in (("k_new", k_new), ("v_new", v_new)):
        if x.shape != (batch, h, d):
            raise ValueError(f"{name}.shape={x.shape} must be [B={batch}, H={h}, D={d}]")
    for name, x in (("pages", pages), ("offsets", offsets)):
        if x.shape != (batch,) or x.dtype != jnp.int32:
            raise ValueError(f"{name} must be int32 [B]; got {x.shape=} {x.dtype=}")
    if valid.shape != (batch,):
        raise ValueError(f"valid.shape={valid.shape} must be [B={batch}]")
    if (kmax is None) != (kmin is None):
        raise ValueError("kmax and kmin go together")
    if kmax is not None:
        if logical_page_size is None or k_pool.shape[2] % logical_page_size:
            raise ValueError(f"{logical_page_size=} must divide the page size {k_pool.shape[2]}")
        stats_shape = (h, k_pool.shape[1], k_pool.shape[2] // logical_page_size, d)
        if kmax.shape != stats_shape or kmin.shape != stats_shape:
            raise ValueError(f"kmax, kmin must be {stats_shape}; got {kmax.shape=} {kmin.shape=}")
    if impl == "triton" and (d < 16 or d & (d - 1)):
        raise ValueError(f"head_dim={d} must be a power of two >= 16 for the Pallas kernel")


@functools.partial(jax.jit, static_argnames=("logical_page_size", "impl", "interpret"))
def append_tokens(k_pool, v_pool, k_new, v_new, pages, offsets, valid, kmax=None, kmin=None, *,
                  logical_page_size=None, impl="triton", interpret=False):
    """Write one token per sequence into a page pool and fold its keys into the statistics.

    Args:
      k_pool, v_pool: [H, P, S, D] the pool of one layer (donate them: they are updated in
        place).
      k_new, v_new: [B, H, D] the new token's post-RoPE key and its value per head.
      pages, offsets: [B] int32 physical page and offset of each sequence's token.
      valid: [B] bool; rows with False write nothing.
      kmax, kmin: [H, P, S / logical_page_size, D] per-logical-page key max/min, or None (no
        statistics kept). A token at the first offset of a logical page restarts it.
      logical_page_size: static, tokens per logical page (with kmax/kmin).
      impl: "triton" (the kernel, D a power of two >= 16) or "xla" (jnp reference).
      interpret: run the Pallas kernel in interpret mode (CPU testing).

    Returns:
      (k_pool, v_pool, kmax, kmin), the statistics None when not given.
    """
    impl = check_impl(impl, "append_tokens")
    _validate(k_pool, v_pool, k_new, v_new, pages, offsets, valid, kmax, kmin, logical_page_size,
              impl)
    if impl == "xla" or pages.shape[0] == 0:
        return append_tokens_reference(k_pool, v_pool, k_new, v_new, pages, offsets, valid, kmax,
                                       kmin, logical_page_size=logical_page_size)
    pools = (k_pool, v_pool) + ((kmax, kmin) if kmax is not None else ())
    out = _pallas_append(pools, k_new, v_new, pages, offsets, valid,
                         logical_page_size=logical_page_size or 1, interpret=interpret)
    return (*out[:2], *(out[2:] if kmax is not None else (None, None)))
