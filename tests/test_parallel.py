"""Tensor parallelism (models/parallel.py) on one device: the head balancing, the permutation
and the padding are exact or minimal; the multi-device tests (tests/multi_device/) run in a
subprocess that sees 8 CPU host devices."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lserve_jax import head_pattern
from models import (AttentionConfig, LlamaConfig, SparsityConfig, init_params, kv_cache, llama,
                    parallel)
from models.weight_quant import quantize_params

CONFIG = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=46, num_layers=2,
                     num_heads=8, num_kv_heads=4, head_dim=8)
PATTERN = ((True, False, False, True), (False, True, True, False))


def logits(params, tokens, streaming_heads=None):
    attention = AttentionConfig(mode="lserve", streaming_heads=streaming_heads,
                                sparsity=SparsityConfig(ctx_sink_tokens=4, ctx_local_tokens=8))
    return np.asarray(llama.forward(params, tokens, config=CONFIG, attention=attention))


@pytest.fixture(scope="module")
def setup():
    params = init_params(CONFIG, jax.random.key(0), scale=0.3)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, CONFIG.vocab_size, (2, 24)))
    return params, tokens


def test_permuted_kv_heads_compute_the_same_function(setup):
    params, tokens = setup
    orders = [parallel.head_order(row, 2) for row in PATTERN]
    assert orders == [(1, 0, 2, 3), (0, 1, 3, 2)]  # per device: its dense head, then streaming
    permuted = parallel.permute_kv_heads(params, CONFIG, orders)
    pattern = parallel.permute_pattern(PATTERN, orders)
    assert pattern == ((False, True) * 2,) * 2
    np.testing.assert_allclose(logits(permuted, tokens, pattern),
                               logits(params, tokens, PATTERN), atol=1e-5, rtol=1e-5)
    # a mismatched pattern gives other logits: the check can fail
    assert np.abs(logits(permuted, tokens, PATTERN) - logits(params, tokens, PATTERN)).max() > 1e-3


def test_padding_the_vocabulary_and_mlp_is_exact(setup):
    params, tokens = setup
    padded = parallel.pad_params(params, CONFIG, 8)
    assert padded["embed"].shape[0] == 64 and padded["lm_head"].shape[1] == 64
    assert padded["layers"][0]["w_gate"].shape[1] == 48
    got = logits(padded, tokens)
    np.testing.assert_allclose(got[..., :61], logits(params, tokens), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(got[..., 61:], 0)


def test_local_config_and_attention():
    local = parallel.local_config(CONFIG, 2)
    assert (local.num_heads, local.num_kv_heads, local.intermediate_size) == (4, 2, 23)
    assert local.vocab_size == CONFIG.vocab_size
    with pytest.raises(ValueError, match="must divide the model's num_kv_heads=4"):
        parallel.local_config(CONFIG, 3)
    balanced = AttentionConfig(mode="lserve", streaming_heads=((False, True) * 2,) * 2)
    assert parallel.local_attention(balanced, 2).streaming_heads == ((False, True),) * 2
    with pytest.raises(ValueError, match="devices would hold different head patterns"):
        parallel.local_attention(AttentionConfig(mode="lserve", streaming_heads=PATTERN), 2)


def test_param_specs_follow_the_rules(setup):
    params, _ = setup
    specs = parallel.param_specs(quantize_params(params, "int8"))
    assert specs["embed"] == P("tp", None) and specs["lm_head"] == P(None, "tp")
    layer = specs["layers"][0]
    assert layer["attn_norm"] == P(None)
    assert (layer["wq"].q, layer["wq"].scale) == (P(None, "tp"), P("tp"))
    assert (layer["wo"].q, layer["wo"].scale) == (P("tp", None), P(None))
    assert (layer["w_down"].q, layer["w_down"].scale) == (P("tp", None), P(None))
    with pytest.raises(ValueError, match="have no rule"):
        parallel.logical_to_spec(("embed", "experts"))


GATES = np.array([[0.9, 0.8, 0.1, 0.55], [0.3, 0.2, 0.7, 0.05], [0.6, 0.65, 0.62, 0.0]])


def test_balancing_keeps_the_sparsity_and_moves_the_cheapest_heads():
    flags = head_pattern.streaming_heads_from_gates(GATES, 0.5)
    assert [sum(not s for s in row) for row in flags] == [2, 1, 3]
    assert head_pattern.balance_for_devices(GATES, flags, 1) == flags
    balanced = head_pattern.balance_for_devices(GATES, flags, 2)
    # τ = (0.6 + 0.55) / 2 = 0.575. Layer 1 (1 dense): promote 0.3 (cost 0.275) or demote
    # 0.7 (0.125); layer 2 (3 dense): promote 0.0 (0.575) or demote 0.6 (0.025). Keeping 6
    # dense heads takes one up and one down: layer 1 up and layer 2 down (0.3) beats the
    # other way round (0.7).
    assert balanced == ((False, False, True, True), (False, True, False, True),
                        (True, False, False, True))
    # 4 devices: 6 dense heads cannot stay; 8 (denser on a tie with 4)
    four = head_pattern.balance_for_devices(GATES, flags, 4)
    assert [sum(not s for s in row) for row in four] in ([4, 4, 0], [4, 0, 4], [0, 4, 4])
    with pytest.raises(ValueError, match="do not split over 3 devices"):
        head_pattern.balance_for_devices(GATES, flags, 3)
    # the shipped SmolLM2 pattern at 3 devices (3 KV heads): every layer all dense or all
    # streaming, 45 of 90 heads still dense
    gates = head_pattern.load_head_pattern(head_pattern.EMBEDDED_PATTERN)
    smol = head_pattern.streaming_heads_from_gates(gates, 0.5)
    three = head_pattern.balance_for_devices(gates, smol, 3)
    assert all(len(set(row)) == 1 for row in three)
    assert sum(not s for row in three for s in row) == 45


def test_flax_modules_split_and_merge_under_jit(setup):
    """The NNX modules hold the plain pytree's arrays; split into (graph, state) and merged
    inside jit they compute what `llama.forward` computes on the pytree, and their logical
    axes give the same PartitionSpecs as the pytree's rules."""
    from flax import nnx

    from models import modules

    params, tokens = setup
    model = modules.Llama.from_params(params)
    graph, state = nnx.split(model)
    attention = AttentionConfig(mode="lserve", streaming_heads=PATTERN,
                                sparsity=SparsityConfig(ctx_sink_tokens=4, ctx_local_tokens=8))

    @jax.jit
    def run(state, tokens):
        b, t = tokens.shape
        spec = llama.cache_spec(CONFIG, attention, num_pages=b * 2 + 1, max_seqs=b,
                                max_pages_per_seq=2)
        cache = kv_cache.init_cache(spec)
        for slot in range(b):
            cache, _ = kv_cache.reserve(cache, jnp.int32(slot), jnp.int32(t))
        return nnx.merge(graph, state).prefill(
            cache, tokens, jnp.full((b,), t, jnp.int32), jnp.arange(b, dtype=jnp.int32),
            config=CONFIG, attention=attention, all_logits=True)[1]

    np.testing.assert_allclose(run(state, tokens), logits(params, tokens, PATTERN),
                               atol=1e-5, rtol=1e-5)
    specs = modules.partition_specs(state)
    plain = parallel.param_specs(params)
    assert specs["embed"] == plain["embed"] == P("tp", None)
    for i, layer in enumerate(plain["layers"]):
        for name, spec in layer.items():
            assert specs["layers"][i][name] == spec, (i, name)


def test_too_many_devices_is_a_clear_error():
    with pytest.raises(ValueError, match="tensor_parallel_size=2 needs that many devices"):
        parallel.make_mesh(2, devices=jax.devices()[:1])


@pytest.mark.parametrize("marks", ["not slow", pytest.param("slow", marks=pytest.mark.slow)])
def test_multi_device_suite(marks):
    """tests/multi_device/ with 8 CPU host devices (XLA_FLAGS must be set before JAX starts,
    so in a subprocess): TP=N engines equal one device, the compiled collectives, data
    parallelism; its slow tests (TP=4, SmolLM2 at TP=3) with `-m slow`."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, LSERVE_MULTI_DEVICE="1",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-m", f"{marks} and not gpu", str(root / "tests" / "multi_device")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


def test_cli_tensor_parallel_equals_one_device(tmp_path_factory, capsys):
    """`--tensor-parallel-size 2` from a fresh process on a CPU-only machine (the CLI makes
    the host devices) gives the tokens of one device; the server shares the flag."""
    import json

    from conftest import convert_word_llama
    from lserve_jax import generate, serve

    ckpt = str(convert_word_llama(tmp_path_factory))
    argv = ["--ckpt", ckpt, "--prompt", "w5 w6 w7 w8", "--max-new-tokens", "6", "--json"]
    assert generate.main(argv) == 0
    one = json.loads(capsys.readouterr().out)
    proc = subprocess.run([sys.executable, "-m", "lserve_jax.generate", *argv,
                           "--tensor-parallel-size", "2"], capture_output=True, text=True,
                          timeout=300, env={k: v for k, v in os.environ.items()
                                            if k != "XLA_FLAGS"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(proc.stdout)
    assert two["token_ids"] == one["token_ids"] and len(one["token_ids"]) == 6
    args = serve._parser().parse_args(["--tensor-parallel-size", "2"])
    assert generate.engine_kwargs(args)["tensor_parallel_size"] == 2


def test_two_processes_one_leader(tmp_path_factory, capsys):
    """Two processes on 127.0.0.1 (Gloo collectives on the CPU), one device each, TP=2 over
    both: the leader schedules and prints the tokens of one device; the follower runs the
    same device calls and exits 0 when the leader is done."""
    import json
    import socket

    from conftest import convert_word_llama
    from lserve_jax import generate

    ckpt = str(convert_word_llama(tmp_path_factory))
    argv = ["--ckpt", ckpt, "--prompt", "w5 w6 w7 w8 w9", "--max-new-tokens", "10", "--json",
            "--attention", "lserve", "--page-size", "8", "--logical-page-size", "4",
            "--token-budget", "24", "--dec-sink-tokens", "8", "--dec-local-tokens", "8"]
    assert generate.main(argv) == 0
    one = json.loads(capsys.readouterr().out)
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "lserve_jax.generate", *argv, "--tensor-parallel-size", "2",
         "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
         "--process-id", str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env) for i in range(2)]
    try:
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    leader = json.loads(results[0][0])
    assert leader["token_ids"] == one["token_ids"] and len(one["token_ids"]) == 10
    assert results[1][0] == ""  # the follower prints nothing
