"""The strict, table-driven engine shared by every source format.

A conversion table is a tuple of `Rule`s, one per kind of source tensor. A rule names the source
tensor with a template (`{i}` stands for the layer index), the parameter it fills in the pytree of
`models/params.py` (same template language, dots between keys: `layers.{i}.wq`), and the transform
from the source layout to ours. `fill_params` then insists that

- every source tensor matches exactly one rule (else: an error naming the unknown tensor),
- no two source tensors fill the same parameter,
- every transformed tensor has the shape `param_shapes` expects (else: an error naming both),
- every parameter gets filled (else: an error naming the parameter and the tensor it expected),
- every value is finite in the source and still finite in the target dtype (else: an error naming
  every such tensor and its parameter; e.g. f32 values beyond 65504 overflow to inf in float16).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from models.config import LlamaConfig
from models.params import param_shapes

Transform = Callable[[np.ndarray, LlamaConfig], np.ndarray]


class ConversionError(ValueError):
    """A checkpoint cannot be converted; the message names the file/tensor/parameter at fault."""


def identity(x: np.ndarray, config: LlamaConfig) -> np.ndarray:
    return x


def transpose(x: np.ndarray, config: LlamaConfig) -> np.ndarray:
    """`[out, in]` (torch Linear / ggml row-major rows) -> our `[in, out]`."""
    return x.T


@dataclasses.dataclass(frozen=True)
class Rule:
    """One row of a conversion table.

    mode: "fill"   -- the transformed tensor becomes parameter `target`;
          "equal"  -- the tensor is redundant with `target` (an lm_head tied to the embedding): it
                      is consumed only if its transform equals the filled parameter exactly;
          "ignore" -- consumed and dropped (`why` says why; e.g. rotary `inv_freq` buffers, which
                      we recompute from the config).
    """

    source: str
    target: str | None
    transform: Transform = identity
    mode: str = "fill"
    why: str = ""

    def __post_init__(self):
        if self.mode not in ("fill", "equal", "ignore"):
            raise ValueError(f"unknown rule {self.mode=}")
        if (self.target is None) != (self.mode == "ignore"):
            raise ValueError(f"rule for {self.source!r}: only mode='ignore' has no target")

    @property
    def pattern(self) -> re.Pattern:
        return re.compile(re.escape(self.source).replace(r"\{i\}", r"(\d+)") + r"\Z")


def param_path(key_path) -> str:
    """A jax key path (`['layers'][3]['wq']`) as our dotted name (`layers.3.wq`)."""
    parts = []
    for k in key_path:
        parts.append(str(k.key if hasattr(k, "key") else k.idx))
    return ".".join(parts)


def _match(name: str, table: tuple[Rule, ...], config: LlamaConfig) -> tuple[Rule, str | None]:
    """The rule that consumes source tensor `name`, and the parameter it fills."""
    hits = [(rule, m) for rule in table if (m := rule.pattern.match(name))]
    if not hits:
        raise ConversionError(
            f"unknown source tensor {name!r}: no rule of the conversion table consumes it"
        )
    if len(hits) > 1:
        raise ConversionError(f"source tensor {name!r} matches several conversion rules")
    rule, m = hits[0]
    if m.groups():
        layer = int(m.group(1))
        if layer >= config.num_layers:
            raise ConversionError(
                f"source tensor {name!r} is for layer {layer}, but the config has "
                f"num_layers={config.num_layers}"
            )
        return rule, None if rule.target is None else rule.target.replace("{i}", str(layer))
    return rule, rule.target


def _expected_source(path: str, table: tuple[Rule, ...]) -> str:
    """The source tensor name that should have filled parameter `path` (for error messages)."""
    for rule in table:
        if rule.target is None or rule.mode != "fill":
            continue
        m = re.fullmatch(re.escape(rule.target).replace(r"\{i\}", r"(\d+)"), path)
        if m:
            return rule.source.replace("{i}", m.group(1)) if m.groups() else rule.source
    return "?"


def _nonfinite(name: str, target: str, source: np.ndarray, cast: np.ndarray) -> str | None:
    """Why `cast` (parameter `target`, from source tensor `name`) is not all finite, or None."""
    if np.isfinite(cast).all():
        return None
    where = f"source tensor {name!r} (parameter {target!r})"
    nan, inf = int(np.isnan(source).sum()), int(np.isinf(source).sum())
    if nan or inf:
        return f"{where} has {nan} NaN and {inf} infinite value(s)"
    overflow = int(np.count_nonzero(~np.isfinite(cast)))
    return (f"{where} has {overflow} value(s) beyond the range of {cast.dtype} "
            f"(max {float(np.finfo(cast.dtype).max):g}) that would become inf")


def fill_params(
    config: LlamaConfig,
    dtype,
    names: Iterable[str],
    load: Callable[[str], np.ndarray],
    table: tuple[Rule, ...],
    *,
    progress: bool = True,
) -> tuple[dict, dict]:
    """Build the parameter pytree (NumPy leaves of `dtype`) from named source tensors.

    `load(name)` returns the source tensor as stored (any float dtype, torch/ggml `[out, in]`
    layout); the table's transforms map it to ours. Returns `(params, report)` where report
    counts consumed/ignored/dropped tensors for `convert_info.json`. Non-finite values are
    refused after all tensors are read, so the error names every tensor that has them.
    """
    dtype = jnp.dtype(dtype)
    shapes = param_shapes(config, dtype)
    leaves, treedef = jax.tree.flatten_with_path(shapes)
    expected = {param_path(p): s for p, s in leaves}

    plan: dict[str, tuple[Rule, str | None]] = {}
    filled_by: dict[str, str] = {}
    for name in names:
        if name in plan:
            raise ConversionError(f"source tensor {name!r} appears twice")
        rule, target = _match(name, table, config)
        if rule.mode == "fill":
            if target not in expected:
                raise ConversionError(
                    f"source tensor {name!r} maps to parameter {target!r}, which this config "
                    f"(tie_word_embeddings={config.tie_word_embeddings}) does not have"
                )
            if target in filled_by:
                raise ConversionError(
                    f"source tensors {filled_by[target]!r} and {name!r} both fill {target!r}"
                )
            filled_by[target] = name
        plan[name] = (rule, target)

    missing = [p for p in expected if p not in filled_by]
    if missing:
        raise ConversionError(
            f"parameter {missing[0]!r} has no source tensor (expected "
            f"{_expected_source(missing[0], table)!r}); {len(missing)} parameter(s) missing"
        )

    # "equal" rules compare against the source-precision value, so keep those few targets.
    compared = {t for r, t in plan.values() if r.mode == "equal"}
    originals: dict[str, np.ndarray] = {}
    flat: dict[str, np.ndarray] = {}
    report = {"num_source_tensors": len(plan), "ignored": [], "dropped_equal": []}
    nonfinite: list[str] = []
    order = sorted(plan, key=lambda n: ("fill", "equal", "ignore").index(plan[n][0].mode))
    for name in tqdm(order, desc="converting", unit="tensor", disable=not progress):
        rule, target = plan[name]
        if rule.mode == "ignore":
            report["ignored"].append(name)
            continue
        x = np.asarray(rule.transform(np.asarray(load(name)), config))
        want = expected[target].shape
        if x.shape != want:
            raise ConversionError(
                f"source tensor {name!r} has shape {x.shape} after conversion, but parameter "
                f"{target!r} needs {want}"
            )
        if rule.mode == "equal":
            if not np.array_equal(x, originals[target]):
                raise ConversionError(
                    f"source tensor {name!r} should equal {target!r} (tied weights) but differs"
                )
            report["dropped_equal"].append(name)
            continue
        if not np.issubdtype(x.dtype, np.floating) and x.dtype != jnp.bfloat16:
            raise ConversionError(f"source tensor {name!r} has non-float dtype {x.dtype}")
        if target in compared:
            originals[target] = x
        with np.errstate(over="ignore"):  # an overflow to inf is reported just below
            flat[target] = np.ascontiguousarray(x.astype(dtype))
        if (why := _nonfinite(name, target, x, flat[target])) is not None:
            nonfinite.append(why)
    if nonfinite:
        raise ConversionError(f"refusing to convert non-finite weights: {'; '.join(nonfinite)}")
    params = jax.tree.unflatten(treedef, [flat[param_path(p)] for p, _ in leaves])
    report["num_params"] = len(flat)
    report["num_parameters"] = int(sum(a.size for a in flat.values()))
    return params, report
