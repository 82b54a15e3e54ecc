"""DuoAttention (arXiv 2410.10819) head patterns: which KV heads are streaming heads.

A pattern file `full_attention_heads.tsv` (the format DuoAttention, arXiv 2410.10819, publishes
its trained gates in) holds one row per
layer and one tab-separated gate α ∈ [0, 1] per KV head: α near 1 means the head needs the full
context (dense / retrieval head), α near 0 means sink + recent tokens suffice (streaming head).
LServe turns the gates into a static split at a target `static_sparsity`, the fraction of all KV
heads, over all layers together, that become streaming heads. Host side, plain NumPy.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


SHIPPED_DIR = Path(__file__).parent / "attn_patterns"
EMBEDDED_PATTERN = SHIPPED_DIR / "smollm2-135m-instruct" / "full_attention_heads.tsv"


def default_pattern(ckpt: str | None) -> str | None:
    """The shipped pattern for a checkpoint, if there is one: the calibrated SmolLM2-135M-Instruct
    pattern for the embedded default model (ckpt None); None for any other checkpoint."""
    if ckpt is None and EMBEDDED_PATTERN.is_file():
        return str(EMBEDDED_PATTERN)
    return None


def load_head_pattern(path: str | Path) -> np.ndarray:
    """Read a DuoAttention `full_attention_heads.tsv` -> gates float64 [num_layers, num_kv_heads].

    A UTF-8 byte-order mark, trailing whitespace and blank trailing lines are ignored; values are
    clipped to [0, 1] (published files contain tiny negatives). Raises ValueError naming the file
    (and the 1-based line) for a file that cannot be read or is not UTF-8 text, an empty file, a
    blank line between rows, a non-numeric / NaN / inf value, or a row whose number of heads
    differs from the first row's.
    """
    path = Path(path)
    try:
        # utf-8-sig: a byte-order mark, as some editors write, is not part of the first gate.
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"head pattern {path} is not a text file (byte {e.start} is not UTF-8); "
                         "expected tab-separated gates, one row per layer") from None
    except OSError as e:
        raise ValueError(f"cannot read head pattern {path}: {e.strerror}") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ValueError(f"head pattern {path} is empty: expected one row of gates per layer")
    rows: list[list[float]] = []
    for line_no, line in enumerate(lines, start=1):
        text = line.strip()
        if not text:
            raise ValueError(f"{path}:{line_no}: blank line between layers")
        row = []
        for field in text.split("\t"):
            try:
                value = float(field)
            except ValueError:
                raise ValueError(f"{path}:{line_no}: gate {field!r} is not a number") from None
            if not math.isfinite(value):
                raise ValueError(f"{path}:{line_no}: gate {field!r} is not finite")
            row.append(value)
        if rows and len(row) != len(rows[0]):
            raise ValueError(
                f"{path}:{line_no}: {len(row)} KV heads, but line 1 has {len(rows[0])} "
                "(every layer needs one gate per KV head)"
            )
        rows.append(row)
    return np.clip(np.asarray(rows, dtype=np.float64), 0.0, 1.0)


def write_head_pattern(path: str | Path, gates) -> None:
    """Write gates [num_layers, num_kv_heads] as `full_attention_heads.tsv`.

    One row per layer, tab-separated, each value in Python's shortest round-trip form, so
    `load_head_pattern` reads back exactly what was written (after its clip to [0, 1]).
    """
    gates = _as_gates(gates)
    text = "".join("\t".join(repr(float(a)) for a in row) + "\n" for row in gates)
    Path(path).write_text(text, encoding="utf-8")


def num_streaming_heads(static_sparsity: float, num_heads: int) -> int:
    """Exact streaming-head count: `int(round(static_sparsity * num_heads))`.

    Python's `round` sends halves to the even integer (0.5 * 3 -> 2, 0.5 * 5 -> 2).
    """
    static_sparsity = float(static_sparsity)
    if not 0.0 <= static_sparsity <= 1.0:
        raise ValueError(f"{static_sparsity=} must be in [0, 1]")
    return int(round(static_sparsity * num_heads))


def streaming_heads_from_gates(gates, static_sparsity: float) -> tuple[tuple[bool, ...], ...]:
    """Classify KV heads: gates [num_layers, num_kv_heads] -> streaming[layer][kv_head].

    The rule: τ = quantile(all α, static_sparsity); α ≥ τ -> dense, else streaming. Made exact:
    all heads are sorted by (α, flat index = layer * num_kv_heads + head) ascending with a stable
    sort, and the first `num_streaming_heads(static_sparsity, num_layers * num_kv_heads)` become
    streaming heads. Every dense head thus has α ≥ every streaming head's α; equal gates are split
    by (layer, head) order, lower index streaming first, never by random noise (DuoAttention's
    reference adds noise). Gates are clipped to [0, 1] first, as `load_head_pattern` does. The split
    is global, so per-layer dense counts differ (Llama-3-8B at 0.5: 1 to 8 of 8).
    """
    gates = np.clip(_as_gates(gates), 0.0, 1.0)
    num_streaming = num_streaming_heads(static_sparsity, gates.size)
    order = np.argsort(gates.reshape(-1), kind="stable")
    streaming = np.zeros(gates.size, dtype=bool)
    streaming[order[:num_streaming]] = True
    return tuple(tuple(bool(s) for s in row) for row in streaming.reshape(gates.shape))


def streaming_heads_for_model(path: str | Path, static_sparsity: float, num_layers: int,
                              num_kv_heads: int) -> tuple[tuple[bool, ...], ...]:
    """Load a pattern file, check it fits the model, classify: -> streaming[layer][kv_head].

    Raises ValueError if the file's [layers, KV heads] differ from (num_layers, num_kv_heads).
    """
    gates = load_head_pattern(path)
    if gates.shape != (num_layers, num_kv_heads):
        raise ValueError(
            f"head pattern {path} has {gates.shape[0]} layers x {gates.shape[1]} KV heads; "
            f"the model has {num_layers} layers x {num_kv_heads} KV heads"
        )
    return streaming_heads_from_gates(gates, static_sparsity)


def balance_for_devices(gates, streaming: tuple[tuple[bool, ...], ...],
                        n: int) -> tuple[tuple[bool, ...], ...]:
    """The split with every layer's dense-head count a multiple of n, as near the calibrated
    split as the gates allow (tensor parallelism over n devices: each device holds the same
    number of dense heads, models/parallel.py; docs/design.md §7).

    A layer with r = dense % n != 0 either promotes its n - r highest-gate streaming heads
    ("up") or demotes its r lowest-gate dense heads ("down"). A move costs the gate mass it
    carries across the threshold τ (the midpoint between the lowest dense and the highest
    streaming gate): Σ |α - τ| of the moved heads. Over all layers, the choice (exact, by
    dynamic programming over the change in the total dense count) keeps that total nearest
    the calibrated one (the sparsity asked for), denser on a tie, then costs least, then
    moves fewest heads. Layers already divisible are unchanged, so n = 1 returns `streaming`.
    """
    gates = np.clip(_as_gates(gates), 0.0, 1.0)
    flags = np.asarray(streaming, dtype=bool)
    if flags.shape != gates.shape:
        raise ValueError(f"pattern {flags.shape} and gates {gates.shape} differ in shape")
    if flags.shape[1] % n:
        raise ValueError(f"{flags.shape[1]} KV heads per layer do not split over {n} devices")
    if flags.all() or not flags.any():
        return tuple(tuple(bool(s) for s in row) for row in flags)
    tau = (gates[~flags].min() + gates[flags].max()) / 2
    # best[change of the dense total] = (cost, heads moved, per-layer choices)
    best: dict[int, tuple[float, int, tuple]] = {0: (0.0, 0, ())}
    for layer, (row, alpha) in enumerate(zip(flags, gates)):
        dense, stream = np.flatnonzero(~row), np.flatnonzero(row)
        r = len(dense) % n
        if not r:
            continue
        down = dense[np.argsort(alpha[dense], kind="stable")][:r]  # lowest gates
        up = stream[np.argsort(-alpha[stream], kind="stable")][:n - r]  # highest gates
        options = ((len(up), float(np.sum(tau - alpha[up])), (layer, up, False)),
                   (-len(down), float(np.sum(alpha[down] - tau)), (layer, down, True)))
        step: dict[int, tuple[float, int, tuple]] = {}
        for change, (cost, moved, choices) in best.items():
            for delta, move_cost, choice in options:
                entry = (cost + move_cost, moved + abs(delta), choices + (choice,))
                key = change + delta
                if key not in step or entry[:2] < step[key][:2]:
                    step[key] = entry
        best = step
    change = min(best, key=lambda c: (abs(c), c < 0, best[c][0], best[c][1]))
    out = flags.copy()
    for layer, heads, to_streaming in best[change][2]:
        out[layer, heads] = to_streaming
    return tuple(tuple(bool(s) for s in row) for row in out)


def describe(streaming: tuple[tuple[bool, ...], ...]) -> str:
    """One line, e.g. '12/24 KV heads streaming; dense heads per layer: [1, 2, ...]'."""
    num_heads = sum(len(row) for row in streaming)
    num_streaming = sum(bool(s) for row in streaming for s in row)
    dense = [sum(not s for s in row) for row in streaming]
    return f"{num_streaming}/{num_heads} KV heads streaming; dense heads per layer: {dense}"


def _as_gates(gates) -> np.ndarray:
    """Validate a gate array: finite, 2-D [num_layers, num_kv_heads], non-empty -> float64."""
    gates = np.asarray(gates, dtype=np.float64)
    if gates.ndim != 2 or gates.size == 0:
        raise ValueError(
            f"gates must be a non-empty [num_layers, num_kv_heads] array, got shape {gates.shape}"
        )
    if not np.isfinite(gates).all():
        raise ValueError("gates contain NaN or inf")
    return gates
