"""DuoAttention head patterns (arXiv 2410.10819): file format, exact streaming-head counts,
tie-breaking."""

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lserve_jax.head_pattern import (
    describe,
    load_head_pattern,
    num_streaming_heads,
    streaming_heads_for_model,
    streaming_heads_from_gates,
    write_head_pattern,
)


def brute_force_streaming(gates, static_sparsity):
    """Head i is streaming iff fewer than k heads precede it in (clipped α, flat index) order."""
    flat = np.clip(np.asarray(gates, np.float64), 0.0, 1.0).reshape(-1)
    k = int(round(static_sparsity * flat.size))
    rank = [sum((flat[j], j) < (flat[i], i) for j in range(flat.size)) for i in range(flat.size)]
    return np.array(rank).reshape(np.shape(gates)) < k


def write_text(tmp_path, text):
    path = tmp_path / "full_attention_heads.tsv"
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------
# File format
# ---------------------------------------------------------------------------------------------


def test_round_trip_is_exact(tmp_path):
    gates = np.random.default_rng(0).uniform(0, 1, (5, 3))
    path = tmp_path / "p.tsv"
    write_head_pattern(path, gates)
    loaded = load_head_pattern(path)
    assert loaded.dtype == np.float64 and loaded.shape == (5, 3)
    np.testing.assert_array_equal(loaded, gates)
    lines = path.read_text().splitlines()
    assert len(lines) == 5 and all(len(line.split("\t")) == 3 for line in lines)


def test_clips_to_unit_interval(tmp_path):
    path = write_text(tmp_path, "-0.0001\t0.5\t1.25\n-3e-07\t1.0\t0.0\n")
    np.testing.assert_array_equal(load_head_pattern(path), [[0.0, 0.5, 1.0], [0.0, 1.0, 0.0]])


def test_tolerates_trailing_whitespace_and_blank_lines(tmp_path):
    path = write_text(tmp_path, "0.1\t0.2 \t\r\n0.3\t0.4\t  \n\n   \n\t\n")
    np.testing.assert_array_equal(load_head_pattern(path), [[0.1, 0.2], [0.3, 0.4]])


@pytest.mark.parametrize(
    "text, line, what",
    [
        ("0.1\t0.2\n0.3\t0.4\n0.5\n", 3, "1 KV heads, but line 1 has 2"),
        ("0.1\t0.2\n0.3\t0.4\t0.5\n", 2, "3 KV heads, but line 1 has 2"),
        ("0.1\t0.2\n0.3\tabc\n", 2, "'abc' is not a number"),
        ("0.1\t\t0.2\n", 1, "'' is not a number"),
        ("0.1\t0.2\nnan\t0.4\n", 2, "'nan' is not finite"),
        ("0.1\t0.2\n0.3\t0.4\n0.5\t-inf\n", 3, "'-inf' is not finite"),
        ("0.1\t0.2\n\n0.3\t0.4\n", 2, "blank line"),
    ],
)
def test_malformed_file_names_file_and_line(tmp_path, text, line, what):
    path = write_text(tmp_path, text)
    with pytest.raises(ValueError, match=re.escape(f"{path}:{line}: ") + ".*" + re.escape(what)):
        load_head_pattern(path)


@pytest.mark.parametrize("text", ["", "\n\n", "  \t\n \n"])
def test_empty_file(tmp_path, text):
    path = write_text(tmp_path, text)
    with pytest.raises(ValueError, match=re.escape(f"head pattern {path} is empty")):
        load_head_pattern(path)


def test_write_rejects_bad_gates(tmp_path):
    with pytest.raises(ValueError, match="NaN or inf"):
        write_head_pattern(tmp_path / "p.tsv", [[0.1, np.nan]])
    with pytest.raises(ValueError, match="shape"):
        write_head_pattern(tmp_path / "p.tsv", [0.1, 0.2])


# ---------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("static_sparsity", [0.0, 0.25, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("shape", [(30, 3), (32, 8), (3, 5)])
def test_exact_streaming_counts(static_sparsity, shape):
    gates = np.random.default_rng(1).uniform(-0.01, 1.01, shape)
    streaming = np.array(streaming_heads_from_gates(gates, static_sparsity))
    num_heads = shape[0] * shape[1]
    assert streaming.shape == shape
    assert streaming.sum() == int(round(static_sparsity * num_heads))
    if streaming.any() and not streaming.all():
        # Dense heads are exactly those at or above the threshold.
        assert gates[~streaming].min() >= gates[streaming].max()


def test_num_streaming_heads_definition():
    assert num_streaming_heads(0.5, 3) == 2  # round(1.5): half to even
    assert num_streaming_heads(0.5, 5) == 2  # round(2.5)
    assert num_streaming_heads(0.7, 10) == 7
    assert num_streaming_heads(0.0, 90) == 0 and num_streaming_heads(1.0, 90) == 90


@pytest.mark.parametrize("static_sparsity", [-0.01, 1.01, float("nan")])
def test_rejects_sparsity_outside_unit_interval(static_sparsity):
    with pytest.raises(ValueError, match="static_sparsity"):
        streaming_heads_from_gates(np.ones((2, 2)), static_sparsity)


def test_all_ties_follow_layer_head_order():
    gates = np.full((4, 3), 0.7)
    for k in range(13):
        streaming = streaming_heads_from_gates(gates, k / 12)
        flat = [s for row in streaming for s in row]
        assert flat == [True] * k + [False] * (12 - k)


def test_ties_created_by_clipping_follow_layer_head_order():
    gates = np.array([[0.9, -0.002, 0.8], [-0.001, 0.9, -0.003]])  # three heads clip to 0
    streaming = streaming_heads_from_gates(gates, 2 / 6)
    assert streaming == ((False, True, False), (True, False, False))


def test_per_layer_heterogeneity_is_preserved():
    gates = np.array([
        [0.9, 0.95, 0.99],  # layer 0: all retrieval heads
        [0.1, 0.2, 0.8],
        [0.01, 0.02, 0.03],  # layer 2: all streaming
        [0.5, 0.05, 0.6],
    ])
    streaming = streaming_heads_from_gates(gates, 0.5)
    assert streaming == (
        (False, False, False),
        (True, True, False),
        (True, True, True),
        (False, True, False),
    )
    assert describe(streaming) == "6/12 KV heads streaming; dense heads per layer: [3, 1, 0, 2]"


def test_result_is_hashable_python_bools():
    streaming = streaming_heads_from_gates(np.random.default_rng(2).uniform(size=(3, 2)), 0.5)
    hash(streaming)  # passed to jit inside a static config
    assert all(type(s) is bool for row in streaming for s in row)


gate_values = st.sampled_from([-0.01, 0.0, 0.0, 0.25, 0.5, 0.5, 0.75, 1.0, 1.0, 1.3])
gate_arrays = st.tuples(st.integers(1, 6), st.integers(1, 8)).flatmap(
    lambda shape: st.lists(gate_values, min_size=shape[0] * shape[1],
                           max_size=shape[0] * shape[1]).map(
        lambda values: np.array(values).reshape(shape))
)
sparsities = st.floats(0.0, 1.0, allow_nan=False)


@settings(max_examples=150, deadline=None)
@given(gates=gate_arrays, static_sparsity=sparsities)
def test_matches_brute_force(gates, static_sparsity):
    streaming = np.array(streaming_heads_from_gates(gates, static_sparsity))
    np.testing.assert_array_equal(streaming, brute_force_streaming(gates, static_sparsity))


@settings(max_examples=100, deadline=None)
@given(gates=gate_arrays, a=sparsities, b=sparsities)
def test_higher_sparsity_streams_a_superset(gates, a, b):
    low, high = sorted((a, b))
    s_low = np.array(streaming_heads_from_gates(gates, low))
    s_high = np.array(streaming_heads_from_gates(gates, high))
    assert not (s_low & ~s_high).any()


# ---------------------------------------------------------------------------------------------
# Model-level entry point
# ---------------------------------------------------------------------------------------------


def test_for_model_loads_and_classifies(tmp_path):
    gates = np.random.default_rng(3).uniform(size=(30, 3))
    path = tmp_path / "full_attention_heads.tsv"
    write_head_pattern(path, gates)
    streaming = streaming_heads_for_model(path, 0.5, num_layers=30, num_kv_heads=3)
    assert streaming == streaming_heads_from_gates(gates, 0.5)
    assert describe(streaming).startswith("45/90 KV heads streaming; dense heads per layer: [")


@pytest.mark.parametrize("num_layers, num_kv_heads", [(4, 3), (2, 8)])
def test_for_model_shape_mismatch(tmp_path, num_layers, num_kv_heads):
    path = tmp_path / "full_attention_heads.tsv"
    write_head_pattern(path, np.ones((2, 3)))
    expected = (f"head pattern {path} has 2 layers x 3 KV heads; "
                f"the model has {num_layers} layers x {num_kv_heads} KV heads")
    with pytest.raises(ValueError, match=re.escape(expected)):
        streaming_heads_for_model(path, 0.5, num_layers=num_layers, num_kv_heads=num_kv_heads)
