"""8-bit weight-only quantization of the decoder layers' linear weights (`weight_dtype="int8"`).

Scheme: per output channel, symmetric, weight-only. A linear weight w [in, out] (stored so that
`x @ w` needs no transpose, models/params.py) becomes an `Int8Weight`:

    scale [out] float32 = max_i |w[i, :]| / 127   (1 for an all-zero column)
    q [in, out] int8    = clip(round(w / scale), -127, 127)   (half to even; -128 unused)

so |w - q * scale| <= scale / 2 elementwise. The rounding and clipping are the KV cache's
(`pallas_kernels.quant.quantize_int8`, `int8_scale`), computed in f32 whatever the model dtype.
Activations stay in the model's float dtype: `linear(x, w)` computes
`(x @ q.astype(x.dtype)) * scale` with the dot accumulated in f32, so the int8 -> float convert
is an operand of the dot (XLA:GPU's GEMM fusion can take it into the matmul; XLA:CPU converts
the weight in a fusion of its own before each dot, so on the CPU int8 weights save memory, not
time). Scaling after the dot is exact algebra: the scale is constant along the contracted axis.

What is quantized: every layer's wq, wk, wv, wo, w_gate, w_up and w_down (`QUANTIZED_KEYS`),
which hold nearly all of a Llama's matmul weights. The embedding, the untied LM head and the
norms stay in the model dtype. The embedding is a gather (a step reads one row per token:
int8 rows would save its memory but no bandwidth), and the LM head (the embedding itself when
tied) sets the logits that every sampler, stop rule and log-probability reads. On
the embedded SmolLM2-135M-Instruct (tied, V = 49152, H = 576) this leaves the 28.3M embedding
values in float, 113 MB in f32 or 57 MB in bf16, beside 107 MB of int8 layer weights and
their scales (`weight_bytes`: 538 MB in f32 -> 220 MB; 269 MB in bf16 -> 163 MB).

Checkpoints are converted to float (convert/); quantization happens on load
(`quantize_params`), after any KV-scale calibration, which runs on the float weights
(lserve_jax/engine/engine.py). A GGUF's Q8_0 tensors are dequantized on conversion and
quantized again here per output channel: their scales per block of 32 input values do not map
exactly onto one scale per output channel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from pallas_kernels import quant

WEIGHT_DTYPES = ("auto", "int8")
QUANTIZED_KEYS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


@struct.dataclass
class Int8Weight:
    """A linear weight [in, out] quantized per output channel: q [in, out] int8, scale [out]
    float32; the weight is q * scale."""

    q: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape


def check_weight_dtype(weight_dtype: str) -> str:
    """The weight dtype name, if it is one of WEIGHT_DTYPES."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype={weight_dtype!r} must be one of {WEIGHT_DTYPES}")
    return weight_dtype


@jax.jit
def quantize_weight(w: jax.Array) -> Int8Weight:
    """w [in, out] (any float dtype) -> its Int8Weight (scale from the column's max |w|)."""
    scale = quant.int8_scale(jnp.max(jnp.abs(w.astype(jnp.float32)), axis=0))  # [out]
    return Int8Weight(q=quant.quantize_int8(w, scale), scale=scale)


def dequantize(w: Int8Weight, dtype=jnp.float32) -> jax.Array:
    """q * scale as `dtype`, [in, out] (tests and references; `linear` never forms it)."""
    return quant.dequantize_int8(w.q, w.scale, dtype)


def linear(x: jax.Array, w: jax.Array | Int8Weight) -> jax.Array:
    """x [..., in] @ w [in, out] -> [..., out] in x's dtype; w a float array or an Int8Weight.

    Float weights: `x @ w`, as the model has always computed it. Int8Weight: the dot of x with
    q converted to x's dtype, accumulated in f32, times the per-output-channel scale, rounded
    once to x's dtype."""
    if not isinstance(w, Int8Weight):
        return x @ w
    y = jnp.matmul(x, w.q.astype(x.dtype), preferred_element_type=jnp.float32)
    return (y * w.scale.astype(jnp.float32)).astype(x.dtype)


def quantize_params(params: dict, weight_dtype: str) -> dict:
    """The params pytree (models/params.py) with every layer's `QUANTIZED_KEYS` weights as
    Int8Weight for "int8" (leaves already quantized are kept); `params` itself for "auto".
    Everything else (embedding, LM head, norms) is shared with `params`, not copied."""
    if check_weight_dtype(weight_dtype) == "auto":
        return params
    layers = [{name: quantize_weight(w) if name in QUANTIZED_KEYS
               and not isinstance(w, Int8Weight) else w for name, w in layer.items()}
              for layer in params["layers"]]
    return {**params, "layers": layers}


def is_quantized(params) -> bool:
    """Whether any weight of the pytree is an Int8Weight."""
    return any(isinstance(x, Int8Weight) for x in jax.tree.leaves(
        params, is_leaf=lambda x: isinstance(x, Int8Weight)))


def require_float(params, purpose: str) -> None:
    """Refuse quantized params where the float model is meant (calibrations): ValueError."""
    if is_quantized(params):
        raise ValueError(f"{purpose} runs on the float weights; pass params loaded without "
                         "weight quantization (weight_dtype='auto')")


def weight_bytes(params) -> int:
    """Bytes of every array of the params pytree (int8 values and their scales included)."""
    return sum(x.nbytes for x in jax.tree.leaves(params))
