"""LServe's sparsity knobs: `SparsityConfig`, defined in models/sparsity.py (device-side code
that does not import lserve_jax), re-exported here for `from lserve_jax import SparsityConfig`."""

from models.sparsity import SparsityConfig  # noqa: F401
