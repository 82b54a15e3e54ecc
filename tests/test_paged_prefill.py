"""The paged chunked-prefill kernel against its plain-jnp reference (interpret mode on CPU,
natively with a GPU), and the reference against a dense softmax written out in NumPy."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from conftest import assert_close, has_gpu, lower_for_cuda
from pallas_kernels import quant
from pallas_kernels.paged_prefill import (paged_prefill_attention,
                                          paged_prefill_attention_reference)

S = 16  # page size


def make_case(seed, *, b=3, t=24, hq=8, kv=((0, 0), (1, 0), (0, 1), (1, 1)), d=32, width=6,
              sink=16, local=24, dtype=jnp.float32, kv_format="float", nan_null=True):
    """Random rows with ragged starts and chunk lengths, shuffled page tables; pool 0 dense,
    pool 1 windowed (its table maps only the sink's and the local window's columns)."""
    rng = np.random.default_rng(seed)
    num_pools = 1 + max(src for src, _ in kv)
    heads = [1 + max(h for src, h in kv if src == p) for p in range(num_pools)]
    num_pages = 1 + b * width
    starts = rng.integers(0, (width * S) - t, b).astype(np.int32)
    lens = rng.integers(1, t + 1, b).astype(np.int32)
    lens[0] = t
    pools, tables = [], []
    for p in range(num_pools):
        table = np.zeros((b, width), np.int32)
        for r in range(b):
            table[r] = rng.permutation(np.arange(1 + r * width, 1 + (r + 1) * width))
        if p == 1:  # windowed: keep the sink's columns and those the chunk's window reaches
            for r in range(b):
                first = max(int(starts[r]) - local + 1, 0) // S
                last = (int(starts[r]) + int(lens[r]) - 1) // S
                keep = np.zeros(width, bool)
                keep[:-(-sink // S)] = True
                keep[first:last + 1] = True
                table[r, ~keep] = 0
        k = rng.normal(size=(heads[p], num_pages, S, d)).astype(np.float32)
        v = rng.normal(size=(heads[p], num_pages, S, d)).astype(np.float32)
        if nan_null:
            k[:, 0], v[:, 0] = np.nan, np.nan  # the null page holds garbage
        k, v = jnp.asarray(k), jnp.asarray(v)
        if kv_format == "float":
            pool = (k.astype(dtype), v.astype(dtype))
        elif kv_format in ("int8", "fp8"):
            ks = jnp.asarray(rng.uniform(0.02, 0.05, (heads[p], d)), jnp.float32)
            vs = jnp.asarray(rng.uniform(0.02, 0.05, (heads[p], d)), jnp.float32)
            dtype8 = quant.pool_dtype(kv_format)
            pool = (quant.quantize_scaled(k, ks[:, None, None], dtype8),
                    quant.quantize_scaled(v, vs[:, None, None], dtype8), ks, vs)
        else:  # int4
            smooth = [jnp.asarray(rng.uniform(0.5, 2.0, (heads[p], d)), jnp.float32)
                      for _ in range(2)]
            packed = [quant.quantize_int4(x / f[:, None, None]) for x, f in zip((k, v), smooth)]
            pool = (packed[0][0], packed[1][0],
                    jnp.stack(packed[0][1:], -1), jnp.stack(packed[1][1:], -1), *smooth)
        pools.append(pool)
        tables.append(jnp.asarray(table))
    q = jnp.asarray(rng.normal(size=(b, t, hq, d)), dtype)
    return dict(q=q, pools=tuple(pools), tables=tuple(tables), starts=jnp.asarray(starts),
                chunk_lens=jnp.asarray(lens), sources=kv,
                windowed=tuple(p == 1 for p in range(num_pools)), sink_tokens=sink,
                local_tokens=local)


def dequantized(pool):
    pick = lambda f, x: f[:, None, None, :]  # noqa: E731
    return [np.asarray(quant.dequantize_entries(pool, i, lambda x: x, pick), np.float32)
            for i in (0, 1)]


def numpy_attention(case):
    """Each valid query row by row: softmax over the keys its head may see."""
    q = np.asarray(case["q"], np.float32)
    b, t, hq, d = q.shape
    g = hq // len(case["sources"])
    out = np.zeros_like(q)
    for r in range(b):
        for i in range(int(case["chunk_lens"][r])):
            pos = int(case["starts"][r]) + i
            for h in range(hq):
                pool_id, head = case["sources"][h // g]
                k, v = dequantized(case["pools"][pool_id])
                table = np.asarray(case["tables"][pool_id][r])
                keys, values = [], []
                for j in range(pos + 1):
                    page = table[j // S]
                    if case["windowed"][pool_id] and (page == 0 or not (
                            j < case["sink_tokens"] or j > pos - case["local_tokens"])):
                        continue
                    keys.append(k[head, page, j % S])
                    values.append(v[head, page, j % S])
                s = np.array(keys) @ q[r, i, h] / np.sqrt(d)
                p = np.exp(s - s.max())
                out[r, i, h] = p @ np.array(values) / p.sum()
    return out


@pytest.mark.parametrize("kv_format", ["float", "int8", "int4"])
def test_reference_equals_a_softmax_written_out(kv_format):
    case = make_case(0, kv_format=kv_format)
    got = paged_prefill_attention_reference(**case)
    np.testing.assert_allclose(np.asarray(got), numpy_attention(case), atol=2e-5, rtol=2e-5)


class TestKernel:
    interpret = True

    def run(self, case, **kw):
        return paged_prefill_attention(**case, impl="pallas", interpret=self.interpret, **kw)

    @pytest.mark.parametrize("seed", [1, 2])
    def test_matches_reference_dense_and_windowed_pools(self, seed):
        case = make_case(seed)
        assert_close(self.run(case), paged_prefill_attention_reference(**case))

    @pytest.mark.parametrize("kv_format", ["int8", "fp8", "int4"])
    def test_quantized_pools(self, kv_format):
        case = make_case(3, kv_format=kv_format)
        assert_close(self.run(case), paged_prefill_attention_reference(**case), jnp.float32)

    def test_bf16_one_pool_group_of_three_and_odd_head_dim(self):
        # 9 query heads over 3 KV heads (padded to 4 rows each), D = 24 padded to 32
        case = make_case(4, hq=9, kv=((0, 0), (0, 1), (0, 2)), d=24, dtype=jnp.bfloat16)
        assert_close(self.run(case, block_q=8), paged_prefill_attention_reference(**case))

    def test_chunk_longer_than_a_query_block(self):
        case = make_case(5, t=40, width=8, local=16)
        assert_close(self.run(case, block_q=8), paged_prefill_attention_reference(**case))


@pytest.mark.gpu
class TestKernelOnGpu(TestKernel):
    interpret = False


def test_triton_lowering_on_cpu():
    case = make_case(6, kv_format="int4")
    if has_gpu():
        pytest.skip("lowered natively by TestKernelOnGpu")
    arrays = {k: v for k, v in case.items() if k not in ("sources", "windowed", "sink_tokens",
                                                         "local_tokens")}
    static = {k: case[k] for k in ("sources", "windowed", "sink_tokens", "local_tokens")}
    traced = jax.jit(lambda a: paged_prefill_attention(**a, **static, impl="pallas")).trace(
        arrays)
    assert "triton" in lower_for_cuda(traced)


def test_bad_arguments():
    case = make_case(7)
    with pytest.raises(ValueError, match="impl="):
        paged_prefill_attention(**case, impl="cuda")
    with pytest.raises(ValueError, match="tables must be int32"):
        paged_prefill_attention(**{**case, "tables": (case["tables"][0][:1], case["tables"][1])})
    with pytest.raises(ValueError, match="does not exist"):
        paged_prefill_attention(**{**case, "sources": ((0, 0), (1, 0), (0, 1), (1, 5))})
    with pytest.raises(ValueError, match="multiple of the"):
        paged_prefill_attention(**{**case, "sources": ((0, 0), (1, 0), (0, 1))})
