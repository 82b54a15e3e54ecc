"""benchmarks/hlo_counts.py: the HLO parser gives known counts, and the decode step's compiled HLO
never copies a cache pool.

The parser is checked on a hand-written module with GPU-style constructs (custom calls, async
wrappers, command-buffer calls, a while loop with a known trip count around a conditional,
copy-start) and on small jitted functions compiled for the CPU (a `lax.cond`, `lax.while_loop`s,
a `jnp.sort`, whole-array copies, standalone and fused into a transpose). The decode step is
compiled from abstract arguments at the CPU sizes (K pools of 8-16 MiB, far above the 1 MiB copy
threshold) with 1 and 2 layers in dense and LServe mode; its counts change with the model code,
so only invariants are asserted, never today's numbers.
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest
from jax import lax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import hlo_counts  # noqa: E402

MiB = 2**20

# A GPU-style module (hand-written, so its counts are known): entry scope 8 kernels (a loop
# fusion, a Triton custom call, copy-start of 4 MiB, a sort, the custom call of an async
# wrapper, two fusions of a command-buffer call, a scatter fusion); a while loop (known trip
# count 8) whose condition is 1 fusion and whose body is 1 fusion plus a conditional of
# 2 fusions | 1 cuBLAS call. Names in metadata and configs must not pose as references.
GPU_STYLE_HLO = r"""
HloModule jit_step, is_scheduled=true, input_output_alias={ {0}: (0, {}, may-alias) }, entry_computation_layout={(f32[1024,1024]{1,0}, s32[])->f32[1024,1024]{1,0}}

%fused_add (param_0: f32[1024,1024]) -> f32[1024,1024] {
  %param_0 = f32[1024,1024]{1,0} parameter(0)
  ROOT %add.1 = f32[1024,1024]{1,0} add(%param_0, %param_0)
}

%fused_scatter (p0: f32[1024,1024], p1: s32[8,1], p2: f32[8,1024]) -> f32[1024,1024] {
  %p0 = f32[1024,1024]{1,0} parameter(0)
  %p1 = s32[8,1]{1,0} parameter(1)
  %p2 = f32[8,1024]{1,0} parameter(2)
  ROOT %scatter.1 = f32[1024,1024]{1,0} scatter(%p0, %p1, %p2), update_window_dims={1}, inserted_window_dims={0}, scatter_dims_to_operand_dims={0}, index_vector_dim=1, to_apply=%add_reducer
}

%add_reducer (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%compare_lt (x: f32[], y: f32[]) -> pred[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %lt = pred[] compare(%x, %y), direction=LT
}

%wrapped_fmha (q: f32[1024,1024]) -> f32[1024,1024] {
  %q = f32[1024,1024]{1,0} parameter(0)
  ROOT %fmha = f32[1024,1024]{1,0} custom-call(%q), custom_call_target="__cudnn$fmha"
}

%command_buffer (c0: f32[1024,1024]) -> f32[1024,1024] {
  %c0 = f32[1024,1024]{1,0} parameter(0)
  %f1 = f32[1024,1024]{1,0} fusion(%c0), kind=kLoop, calls=%fused_add
  ROOT %f2 = f32[1024,1024]{1,0} fusion(%f1), kind=kLoop, calls=%fused_add
}

%branch_a (ta: (f32[1024,1024])) -> f32[1024,1024] {
  %ta = (f32[1024,1024]{1,0}) parameter(0)
  %ga = f32[1024,1024]{1,0} get-tuple-element(%ta), index=0
  %fa = f32[1024,1024]{1,0} fusion(%ga), kind=kLoop, calls=%fused_add
  ROOT %fb = f32[1024,1024]{1,0} fusion(%fa), kind=kLoop, calls=%fused_add
}

%branch_b (tb: (f32[1024,1024])) -> f32[1024,1024] {
  %tb = (f32[1024,1024]{1,0}) parameter(0)
  %gb = f32[1024,1024]{1,0} get-tuple-element(%tb), index=0
  ROOT %gemm = f32[1024,1024]{1,0} custom-call(%gb, %gb), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"alpha_real":1}}
}

%loop_cond (lc: (s32[], f32[1024,1024])) -> pred[] {
  %lc = (s32[], f32[1024,1024]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%lc), index=0
  ROOT %done = pred[] fusion(%i), kind=kLoop, calls=%fused_add
}

%loop_body (lb: (s32[], f32[1024,1024])) -> (s32[], f32[1024,1024]) {
  %lb = (s32[], f32[1024,1024]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%lb), index=0
  %h = f32[1024,1024]{1,0} get-tuple-element(%lb), index=1
  %next = s32[] fusion(%j), kind=kLoop, calls=%fused_add
  %operand = (f32[1024,1024]{1,0}) tuple(%h)
  %pick = f32[1024,1024]{1,0} conditional(%next, %operand, %operand), true_computation=%branch_a, false_computation=%branch_b, metadata={op_name="jit(step)/while/body/cond calls=%fused_scatter"}
  ROOT %out = (s32[], f32[1024,1024]{1,0}) tuple(%next, %pick)
}

ENTRY %main (x: f32[1024,1024], n: s32[]) -> f32[1024,1024] {
  %x = f32[1024,1024]{1,0} parameter(0), metadata={op_name="x"}
  %n = s32[] parameter(1)
  %zero = s32[] constant(0)
  %idx = s32[8,1]{1,0} constant({...})
  %upd = f32[8,1024]{1,0} constant({...})
  %y = f32[1024,1024]{1,0} fusion(%x), kind=kLoop, calls=%fused_add, metadata={op_name="while(x) conditional(y) body=%branch_a"}
  %triton = f32[1024,1024]{1,0} custom-call(%y), custom_call_target="__gpu$xla.gpu.triton", backend_config={name = "kernel", ir = "tt.func @k() { \"calls=%fused_add\" } ", num_warps = 4}
  %cs = (f32[1024,1024]{1,0}, f32[1024,1024]{1,0}, u32[]) copy-start(%triton)
  %cd = f32[1024,1024]{1,0} copy-done(%cs)
  %sorted = f32[1024,1024]{1,0} sort(%cd), dimensions={1}, is_stable=true, to_apply=%compare_lt
  %as = ((f32[1024,1024]{1,0}), f32[1024,1024]{1,0}, s32[]) async-start(%sorted), calls=%wrapped_fmha
  %ad = f32[1024,1024]{1,0} async-done(%as), calls=%wrapped_fmha
  %cb = f32[1024,1024]{1,0} call(%ad), to_apply=%command_buffer
  %sc = f32[1024,1024]{1,0} fusion(%cb, %idx, /*index=2*/%upd), kind=kInput, calls=%fused_scatter
  %init = (s32[], f32[1024,1024]{1,0}) tuple(%zero, %sc)
  %loop = (s32[], f32[1024,1024]{1,0}) while(%init), condition=%loop_cond, body=%loop_body, backend_config={"known_trip_count":{"n":"8"}}
  ROOT %result = f32[1024,1024]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_parser_on_a_gpu_style_module():
    c = hlo_counts.count_hlo(GPU_STYLE_HLO)
    assert c["kernels"] == 13
    # entry 8 + 8 trips x (body fusion + the larger branch, 2) + 9 condition runs x 1
    assert c["kernels_launched"] == 8 + 8 * 3 + 9
    assert c["fusions"] == 8
    assert c["fusion_kinds"] == {"kInput": 1, "kLoop": 7}
    assert c["custom_calls"] == {"__cublas$gemm": 1, "__cudnn$fmha": 1,
                                 "__gpu$xla.gpu.triton": 1}
    assert c["other_kernels"] == {"copy-start": 1, "sort": 1}
    assert (c["conditionals"], c["conditionals_executed"]) == (1, 8)
    assert (c["while_loops"], c["loops_without_trip_count"]) == (1, 0)
    assert (c["sorts"], c["fused_sorts"], c["scatters"], c["fused_scatters"]) == (1, 0, 1, 1)
    assert c["gathers"] == 0
    assert c["large_copies"] == [dict(shape="f32[1024,1024]", mib=4.0, via="copy-start")]
    assert c["donated_buffers"] == 1


def _counts(fn, *args, **jit_kwargs) -> dict:
    """Counts of `fn` jitted and compiled for the CPU from abstract arguments."""
    with jax.default_device(jax.devices("cpu")[0]):
        compiled = jax.jit(fn, **jit_kwargs).lower(*args).compile()
    return hlo_counts.count_hlo(compiled.as_text())


X = jax.ShapeDtypeStruct((512, 1024), jnp.float32)  # 2 MiB
SCALAR = jax.ShapeDtypeStruct((), jnp.int32)


def test_elementwise_is_one_fusion():
    c = _counts(lambda x: jnp.sin(x) * 2 + 1, X)
    assert (c["kernels"], c["kernels_launched"], c["fusions"]) == (1, 1, 1)
    assert c["custom_calls"] == {} and c["other_kernels"] == {}
    assert c["conditionals"] == c["while_loops"] == c["num_large_copies"] == 0


def test_cond_is_one_conditional_running_one_branch():
    def f(x, p):
        return lax.cond(p > 0, lambda x: jnp.sin(x) * 2, lambda x: jnp.sort(x, axis=1), x)

    c = _counts(f, X, SCALAR)
    assert (c["conditionals"], c["conditionals_executed"]) == (1, 1)
    assert c["sorts"] == 1  # in the false branch, which is in scope
    assert c["kernels_launched"] < c["kernels"]  # only the larger branch is launched
    assert c["while_loops"] == 0


def test_while_loops_and_trip_counts():
    def dynamic(x, n):
        return lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, jnp.cos(c[1])), (0, x))[1]

    c = _counts(dynamic, X, SCALAR)
    assert (c["while_loops"], c["loops_without_trip_count"], c["conditionals"]) == (1, 1, 0)

    def fixed(x):
        return lax.fori_loop(0, 10, lambda i, y: jnp.cos(y) * i, x)

    c = _counts(fixed, X)
    assert (c["while_loops"], c["loops_without_trip_count"]) == (1, 0)
    assert c["kernels_launched"] >= c["kernels"] + 9  # the body's kernel runs 10 times


def test_sort():
    c = _counts(lambda x: jnp.sort(x, axis=-1), X)
    assert (c["sorts"], c["fused_sorts"]) == (1, 0)
    assert c["kernels"] >= 1


def test_large_copies_are_found():
    update = lambda p: p.at[0].set(1.0)  # noqa: E731 - in place only when p is donated
    c = _counts(update, X)
    assert c["large_copies"] == [dict(shape="f32[512,1024]", mib=2.0, via="copy")]
    c = _counts(update, X, donate_argnums=0)
    assert c["num_large_copies"] == 0 and c["donated_buffers"] == 1
    c = _counts(lambda x: x.T, X)  # a transpose: a copy fused with it, listed apart
    assert c["num_large_copies"] == 0
    assert c["large_fused_copies"] == [dict(shape="f32[1024,512]", mib=2.0, via="inside fusion")]
    small = jax.ShapeDtypeStruct((128, 128), jnp.float32)  # 64 KiB: below the threshold
    assert _counts(update, small)["num_large_copies"] == 0


# ---- the decode step ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def decode_counts() -> dict:
    """{(mode, num_layers): count_decode_hlo record} at the small sizes."""
    return {(mode, layers): hlo_counts.count_decode_hlo(mode, layers, small=True)
            for mode in hlo_counts.MODES for layers in hlo_counts.LAYERS}


def conditionals_per_token(decode_counts: dict, mode: str) -> int:
    """Conditionals one decode step executes in a 32-layer model of `mode` (extrapolated from
    the 1- and 2-layer compiles): the figure to bound once selection is hoisted."""
    return hlo_counts.conditionals_per_token(decode_counts[mode, 1], decode_counts[mode, 2])


@pytest.mark.parametrize("mode", hlo_counts.MODES)
def test_decode_never_copies_a_pool(decode_counts, mode):
    for layers in hlo_counts.LAYERS:
        c = decode_counts[mode, layers]
        assert c["largest_cache_array_mib"] > 4  # a whole-pool copy would be caught
        assert c["donated_buffers"] > 0
        assert c["large_copies"] == [], f"{mode} {layers}L copies {c['large_copies']}"
        assert c["large_fused_copies"] == [], f"{mode} {layers}L {c['large_fused_copies']}"


def test_undonated_decode_copies_its_pools():
    """The guard can fail on the real step: without donation the in-place writes need copies."""
    compiled, _ = hlo_counts.compile_decode("lserve", 1, small=True, donate=False)
    c = hlo_counts.count_hlo(compiled.as_text())
    assert c["num_large_copies"] >= 2  # the dense heads' K and V pools
    assert all(copy["mib"] > 4 for copy in c["large_copies"])


@pytest.mark.parametrize("mode", hlo_counts.MODES)
def test_per_layer_figures(decode_counts, mode):
    one, two = decode_counts[mode, 1], decode_counts[mode, 2]
    layer = hlo_counts.per_layer(one, two)
    assert set(hlo_counts.COUNT_FIELDS) <= set(layer)
    assert layer["kernels"] > 0 and layer["kernels_launched"] > 0
    assert layer["num_large_copies"] == 0
    per_token = conditionals_per_token(decode_counts, mode)
    assert per_token == one["conditionals_executed"] + 31 * layer["conditionals_executed"]


@pytest.mark.parametrize("mode", hlo_counts.MODES)
def test_gpu_path_kernels_per_layer_and_no_host_branch(decode_counts, mode):
    """The decode step as the GPU runs it (`impl="pallas"`): one attention kernel per layer for
    both kinds of head, one append kernel per pool, the selector's scoring and top-K as kernels
    (LServe), and no `cond` outside kernels, so a step never waits on the host."""
    one, two = (decode_counts[mode, n]["pallas_path"] for n in hlo_counts.LAYERS)
    assert one["host_branches"] == two["host_branches"] == 0
    per_layer = {name: two["pallas_calls"].get(name, 0) - one["pallas_calls"].get(name, 0)
                 for name in two["pallas_calls"]}
    # Per pool, one append launch writes the token's K, V and key statistics.
    expected = {"paged_decode_attention": 1, "kv_append": 1}
    if mode == "lserve":
        expected.update(page_scores=1, select_top_pages=1, kv_append=2)
    assert per_layer == expected
    # The appends need no XLA scatter; only the stored selection (LServe) is one.
    assert two["xla_scatters"] - one["xla_scatters"] == (1 if mode == "lserve" else 0)


def test_cpu_path_branches_at_most_once_per_layer(decode_counts):
    """The XLA (CPU) path keeps one `cond` per LServe layer around the scoring (on the host it
    costs nothing and skips the scoring on reuse steps); dense decode has none."""
    assert conditionals_per_token(decode_counts, "dense") == 0
    assert conditionals_per_token(decode_counts, "lserve") <= hlo_counts.MODEL_LAYERS


@pytest.mark.parametrize("mode,page_selection", [
    ("dense", "kv_head"), ("lserve", "kv_head"), ("lserve", "query_head")])
def test_gpu_decode_step_lowers_to_triton(mode, page_selection):
    """The whole decode step of the GPU path lowers for CUDA (every Pallas kernel through
    Triton) with SmolLM2's head shape (9 query heads, 3 KV heads, head_dim 64: odd list and
    row counts) and a mixed head pattern."""
    import dataclasses

    from conftest import lower_for_cuda
    from models import kv_cache, llama
    from models.attention import AttentionConfig
    from models.sparsity import SparsityConfig
    from models.config import LlamaConfig
    from models.params import param_shapes

    config = LlamaConfig(vocab_size=256, hidden_size=576, intermediate_size=128, num_layers=2,
                         num_heads=9, num_kv_heads=3, head_dim=64)
    sparsity = SparsityConfig(token_budget=256, page_selection=page_selection,
                              keep_first_pages=1)
    attention = AttentionConfig(mode=mode, impl="pallas", sparsity=sparsity,
                                streaming_heads=((True, False, True), (False, True, False)))
    if mode == "dense":
        attention = dataclasses.replace(attention, streaming_heads=None)
    spec = llama.cache_spec(config, attention, num_pages=40, page_size=64, max_seqs=2,
                            max_pages_per_seq=16, dtype="bfloat16")
    cache = jax.eval_shape(lambda: kv_cache.init_cache(spec))
    ids = jax.ShapeDtypeStruct((2,), jnp.int32)
    step = jax.jit(llama.decode, static_argnames=("config", "attention"),
                   donate_argnames=("cache",))
    traced = step.trace(param_shapes(config, jnp.bfloat16), cache, ids, ids,
                        jax.ShapeDtypeStruct((2,), jnp.bool_), config=config, attention=attention)
    text = lower_for_cuda(traced)
    assert "custom_call @__gpu$xla.gpu.triton" in text
    kernels = ("paged_decode_attention", "kv_append", "page_scores", "select_top_pages")
    used = kernels if mode == "lserve" else kernels[:2]
    for name in kernels:
        assert (name in text) == (name in used), f"{name}: expected {name in used}"
