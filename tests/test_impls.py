"""One list of kernel implementations (pallas_kernels/impls.py) for every op, the model and the
CLI."""

import pytest

import jax.numpy as jnp

from lserve_jax import generate
from models import AttentionConfig
from pallas_kernels import impls, paged_decode_attention, sparse_prefill_attention


def test_names_aliases_and_refusals():
    assert impls.IMPLS == ("xla", "triton", "mosaic")
    assert impls.normalize_impl("pallas") == "triton"
    with pytest.raises(ValueError, match="must be one of"):
        impls.normalize_impl("cuda")
    with pytest.raises(NotImplementedError, match="has no impl='mosaic' variant"):
        impls.check_impl("mosaic", "some_op")
    assert AttentionConfig(impl="pallas").impl == "triton"
    assert AttentionConfig(impl="pallas") == AttentionConfig(impl="triton")
    with pytest.raises(ValueError, match="must be one of"):
        AttentionConfig(impl="cuda")
    assert impls.default_impl("gpu") == "triton" and impls.default_impl("cpu") == "xla"


def test_every_op_refuses_what_it_lacks():
    q = jnp.zeros((1, 16, 2, 16))
    with pytest.raises(NotImplementedError, match="sparse_prefill_attention"):
        sparse_prefill_attention(q, q, q, jnp.zeros(2, jnp.int32), sink_tokens=4,
                                 local_tokens=4, impl="mosaic")
    pages = jnp.zeros((1, 2, 16, 16))
    lists = jnp.zeros((1, 2, 1), jnp.int32)
    with pytest.raises(NotImplementedError, match="pooled_decode_attention"):
        paged_decode_attention(jnp.zeros((1, 2, 1, 16)), pages, pages, lists, lists, lists,
                               impl="mosaic")


def test_cli_takes_the_list():
    parser = generate._parser()
    assert parser.parse_args(["--prompt", "x", "--impl", "pallas"]).impl == "triton"
    assert parser.parse_args(["--prompt", "x", "--impl", "xla"]).impl == "xla"
    with pytest.raises(SystemExit):
        parser.parse_args(["--prompt", "x", "--impl", "cuda"])
