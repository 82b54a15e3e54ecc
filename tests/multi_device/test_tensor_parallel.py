"""Tensor parallelism on CPU host devices (run by tests/test_parallel.py with
XLA_FLAGS=--xla_force_host_platform_device_count=8): the engine at TP=N gives the tokens and
log-probabilities of TP=1, dense and LServe, through chunked prefill and multi-step decode, and
its compiled steps hold exactly the collectives of the split (models/parallel.py)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY_LSERVE, convert_tiny_llama
from lserve_jax import head_pattern
from lserve_jax.engine import Engine, engine as engine_module
from lserve_jax.sampling import SamplingParams

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (host) devices")

VOCAB = 130  # not a multiple of 4 or 8: the vocabulary is padded
PROMPTS = [[int(t) for t in np.random.default_rng(n).integers(3, VOCAB, size=n)]
           for n in (5, 40)]
# 4 dense KV heads of 8 per layer: balanced for 2 and 4 devices, not for 8.
GATES = np.random.default_rng(0).uniform(size=(2, 8))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # 16 query / 8 KV heads; an MLP width of 70, padded for 4 and 8 devices
    return convert_tiny_llama(tmp_path_factory, vocab_size=VOCAB, num_heads=16, num_kv_heads=8,
                              hidden_size=128, intermediate_size=70, max_position_embeddings=256)


def write_gates(path, gates) -> str:
    path.write_text("".join("\t".join(repr(float(a)) for a in row) + "\n" for row in gates))
    return str(path)


def knobs(mode: str, tmp_path, balanced_for: int | None = None) -> dict:
    """Engine knobs. LServe: the pattern of `GATES` at sparsity 0.5 or, with `balanced_for`
    n, the pattern the engine uses on n devices (balanced), written as 0/1 gates so that a
    one-device engine takes it as is."""
    if mode == "dense":
        return dict(page_size=8, logical_page_size=4)
    if balanced_for is None:
        return dict(TINY_LSERVE, head_pattern=write_gates(tmp_path / "gates.tsv", GATES))
    flags = head_pattern.streaming_heads_from_gates(GATES, 0.5)
    balanced = np.array(head_pattern.balance_for_devices(GATES, flags, balanced_for))
    path = write_gates(tmp_path / f"balanced{balanced_for}.tsv", np.where(balanced, 0.0, 1.0))
    return dict(TINY_LSERVE, head_pattern=path, static_sparsity=float(balanced.mean()))


def run(ckpt, tp: int, extra: dict, **kw):
    engine = Engine(ckpt, tensor_parallel_size=tp, max_num_seqs=4, max_num_batched_tokens=32,
                    **extra, **kw)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(i, prompt, SamplingParams(max_tokens=10, temperature=0, logprobs=1))
    out = engine.run_until_done()
    return engine, [out[i].outputs[0] for i in range(len(PROMPTS))]


def assert_same(reference, results):
    for a, b in zip(reference, results, strict=True):
        assert a.token_ids == b.token_ids
        la = [lp[t].logprob for lp, t in zip(a.logprobs, a.token_ids)]
        lb = [lp[t].logprob for lp, t in zip(b.logprobs, b.token_ids)]
        np.testing.assert_allclose(lb, la, atol=2e-5)


def collectives(hlo: str) -> dict:
    return {op: len(re.findall(rf"= [^=\n]*? {op}(-start)?\(", hlo))
            for op in ("all-reduce", "all-gather", "all-to-all", "collective-permute",
                       "reduce-scatter")}


@pytest.fixture(scope="module")
def references():
    return {}  # the one-device results, by head pattern


@pytest.mark.parametrize("mode,n", [("dense", 2), ("lserve", 2), ("lserve", 8),
                                    pytest.param("dense", 4, marks=pytest.mark.slow),
                                    pytest.param("lserve", 4, marks=pytest.mark.slow),
                                    pytest.param("dense", 8, marks=pytest.mark.slow)])
def test_tensor_parallel_engine_equals_one_device(ckpt, tmp_path, references, mode, n):
    """Greedy tokens equal and log-probabilities within f32 rounding, prompts of 5 and 40
    tokens in chunks of at most 32, 8 decode steps per call. At n = 2 the compiled steps are
    checked to hold only the split's collectives: per step 2 all-reduces per layer (after wo,
    after w_down), one for the embedding and one all-gather of the logits; no all-to-all, no
    gathering of pages or heads."""
    reference = knobs(mode, tmp_path, balanced_for=n)
    key = open(reference["head_pattern"]).read() if mode == "lserve" else None
    if key not in references:
        references[key] = run(ckpt, 1, reference)[1]
    engine_module.release_compiled_steps()
    engine, results = run(ckpt, n, knobs(mode, tmp_path))
    assert engine.shard.size == n
    assert_same(references[key], results)
    if n != 2:
        return
    if mode == "lserve":  # 4 dense heads per layer split over 2 devices as they are, permuted
        flags = head_pattern.streaming_heads_from_gates(GATES, 0.5)
        assert [sorted(r) for r in engine.attention.streaming_heads] == [sorted(r) for r in flags]
        for row in engine.attention.streaming_heads:  # each device: 2 dense then 2 streaming
            assert row == (False, False, True, True) * 2
    steps = {key[0] for key in engine_module._SHARED_EXECUTABLES}
    assert steps == {"prefill_step", "decode_step"}
    for key, exe in engine_module._SHARED_EXECUTABLES.items():
        assert collectives(exe.as_text()) == {
            "all-reduce": 2 * 2 + 1, "all-gather": 1, "all-to-all": 0,
            "collective-permute": 0, "reduce-scatter": 0}, key[:2]


def test_int8_kv_and_weights_split_as_on_one_device(ckpt, tmp_path):
    """Quantized after the heads are permuted and padded: per-output-channel weight scales
    and per-head KV scales move with their heads, so TP=2 gives TP=1's tokens."""
    quant = dict(kv_cache_dtype="int8", weight_dtype="int8")
    reference = run(ckpt, 1, knobs("lserve", tmp_path, balanced_for=2), **quant)[1]
    engine, results = run(ckpt, 2, knobs("lserve", tmp_path), **quant)
    assert engine.cache.k[0].dtype == jnp.int8 and engine.weight_dtype == "int8"
    assert_same(reference, results)


@pytest.mark.parametrize("tp", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_data_parallel_replicas_equal_one_device(ckpt, tmp_path, references, tp):
    """DP=2 replicas (x TP=2: 4 devices of a (dp, tp) mesh): LServe requests spread over both
    replicas, each on its own devices, with the tokens of one device."""
    from lserve_jax import LLM

    reference = knobs("lserve", tmp_path, balanced_for=tp)
    key = open(reference["head_pattern"]).read()
    if key not in references:
        references[key] = run(ckpt, 1, reference)[1]
    llm = LLM(ckpt, data_parallel_size=2, tensor_parallel_size=tp, max_num_seqs=4,
              max_num_batched_tokens=32, **knobs("lserve", tmp_path))
    engine = llm.engine
    assert engine.mesh.devices.shape == (2, tp)
    outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=10, temperature=0, logprobs=1))
    assert_same(references[key], [out.outputs[0] for out in outputs])
    served = [e.counters["finished"] for e in engine.replicas]
    assert served == [1, 1] and engine.counters["finished"] == 2
    devices = [{d for x in jax.tree.leaves(e.cache) for d in x.devices()} for e in engine.replicas]
    assert devices[0].isdisjoint(devices[1]) and len(devices[0]) == tp
    assert not engine.has_unfinished_requests() and not engine._owner


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dense", "lserve"])
def test_smollm2_on_three_devices_equals_one(tmp_path, mode):
    """The embedded SmolLM2-135M-Instruct (3 KV heads) at TP=3: one KV head per device; with
    LServe every layer's pattern balanced to all-dense or all-streaming (the one-device
    reference runs that balanced pattern). Small budget and windows so the decode selects and
    the prompt outruns the windows."""
    from lserve_jax.head_pattern import EMBEDDED_PATTERN, load_head_pattern

    extra = dict(max_num_seqs=2, max_num_batched_tokens=128, max_model_len=1024)
    lserve = dict(attention="lserve", page_size=16, logical_page_size=8, token_budget=64,
                  ctx_local_tokens=64, ctx_sink_tokens=16, dec_local_tokens=64,
                  dec_sink_tokens=16, selector_interval=2)
    reference, knobs_n = dict(extra), dict(extra)
    if mode == "lserve":
        gates = load_head_pattern(EMBEDDED_PATTERN)
        balanced = np.array(head_pattern.balance_for_devices(
            gates, head_pattern.streaming_heads_from_gates(gates, 0.5), 3))
        path = write_gates(tmp_path / "balanced3.tsv", np.where(balanced, 0.0, 1.0))
        reference.update(lserve, head_pattern=path)
        knobs_n.update(lserve)
    prompts = ["The history of the Roman Empire " * 30, "Write a haiku about the sea."]
    outputs = []
    for n, knobs_ in ((1, reference), (3, knobs_n)):
        engine = Engine(None, tensor_parallel_size=n, **knobs_)
        for i, prompt in enumerate(prompts):
            engine.add_request(i, prompt, SamplingParams(max_tokens=16, temperature=0,
                                                         logprobs=1))
        out = engine.run_until_done()
        outputs.append([out[i].outputs[0] for i in range(len(prompts))])
    assert_same(*outputs)
