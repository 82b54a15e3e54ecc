"""The kernel implementations, declared once: every op, the model (`AttentionConfig.impl`),
the CLI (`--impl`) and the benchmarks take their `impl` from `IMPLS`.

    "xla"     the plain-jnp reference of each op: the CPU path and the tests' oracle
    "triton"  Pallas kernels in Triton style (`jax.experimental.pallas.triton`): any CUDA GPU,
              and Pallas interpret mode on the CPU (tests)
    "mosaic"  Pallas Mosaic GPU kernels (`jax.experimental.pallas.mosaic_gpu`: TMA, wgmma,
              warpgroups) for Hopper; an op without such a variant refuses it by name

"pallas", the name of the Triton-style kernels before there were Mosaic ones, is read as
"triton".
"""

from __future__ import annotations

IMPLS = ("xla", "triton", "mosaic")
ALIASES = {"pallas": "triton"}
KERNEL_IMPLS = ("xla", "triton")  # what an op without a Mosaic GPU variant offers


def normalize_impl(impl: str) -> str:
    """`impl` as one of IMPLS (aliases resolved); ValueError for anything else."""
    impl = ALIASES.get(impl, impl)
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} must be one of {IMPLS}")
    return impl


def check_impl(impl: str, op: str, available: tuple[str, ...] = KERNEL_IMPLS) -> str:
    """`impl` normalized, if `op` has it: ValueError for an unknown name, NotImplementedError
    for a known one the op lacks."""
    impl = normalize_impl(impl)
    if impl not in available:
        raise NotImplementedError(f"{op} has no impl={impl!r} variant; it has {available}")
    return impl


def default_impl(backend: str) -> str:
    """Triton-style Pallas kernels on a GPU, the XLA references elsewhere."""
    return "triton" if backend == "gpu" else "xla"
