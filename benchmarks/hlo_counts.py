"""Compiled-HLO counts of one decode step, dense vs LServe: a regression guard.

    python benchmarks/hlo_counts.py [--out PATH.jsonl] [--small]

What is compiled: `jax.jit(llama.decode, donate_argnames=("cache",))`, as `decode_loop` and the
benchmarks run it, lowered from `jax.ShapeDtypeStruct`s (params from `param_shapes`, the cache
from `jax.eval_shape(init_cache)`), so nothing is allocated and the donation is kept. Batch 1,
one new token per step, 1 and 2 layers, in dense mode and in LServe mode (half the KV heads of
every layer streaming, the first half in even layers and the second half in odd ones; the other
knobs are `lserve_jax.sparsity.SparsityConfig`'s defaults: pages of 64 tokens, logical pages of
16, token budget 4096, selector interval 4, keep_first_pages 1, decode sink 128 + local 256;
page lists per KV head). `impl="triton"` on GPU, `impl="xla"` elsewhere.

Sizes. GPU (unless --small): Llama-3-8B attention (32 query heads, 8 KV heads, head_dim 128,
hidden 4096) with a small MLP (intermediate 1024) and vocabulary (1024) so compiles are quick,
a 32K-token context: each layer's dense K pool is [8, 514, 64, 128] = 64 MiB in bf16 (LServe:
4 dense heads, 32 MiB). CPU or --small: hidden 512, 8 query heads, 4 KV heads, head_dim 64,
intermediate 256, vocabulary 512, a 16K-token context: K pool [4, 258, 64, 64] = 16 MiB in f32
(LServe: [2, 258, 64, 64], 8 MiB). Pools and weights are bf16 on GPU, f32 elsewhere; pages for
the context plus one (the next tokens) and the null page. Either way a whole-pool copy is far
above the 1 MiB line.

What is counted, from the optimized HLO text (`compiled.as_text()`). The *scope* of a step is the
entry computation plus, recursively, the computations control flow runs: while conditions and
bodies (`condition=`, `body=`), conditional branches (`branch_computations=` or
`true_computation=`/`false_computation=`), `call` targets (`to_apply=` of a `call`, e.g. GPU
command buffers) and async wrappers (`calls=` of `async-start`). Fusion computations (`calls=`
of a `fusion`) are not in the scope: their ops run inside the fusion's one kernel. Reducer and
comparator computations (`to_apply=` of reduce, sort, scatter, ...) are never walked. In scope:

- kernels: every instruction that becomes a kernel/thunk, i.e. every op except parameter,
  constant, tuple, get-tuple-element, bitcast, opt-barrier, after-all, add-dependency, domain,
  the `*-done` / `async-update` halves of async pairs, and the control flow itself (while,
  conditional, call, async-start, counted through what they run). Split into `fusions` (with
  `fusion_kinds`: kLoop/kInput/kOutput, or the backend kind of a kCustom fusion such as
  `__triton_gemm`), `custom_calls` (by `custom_call_target`, e.g. Pallas/Triton kernels are
  `__gpu$xla.gpu.triton`) and `other_kernels` (by opcode: on CPU unfused `dot`, `copy`, `sort`;
  on GPU mostly `copy`). The same rule serves both backends: XLA:CPU also runs one thunk per
  such op. `kernels` counts each instruction once (every while body once, every branch);
  `kernels_launched` is what one step runs: loop bodies times their `known_trip_count`, loop
  conditions that plus one, a conditional its largest branch (a loop without a known trip count
  counts once and is counted in `loops_without_trip_count`).
- conditionals, while_loops: instructions in scope, each once; `conditionals_executed` weights
  them as `kernels_launched` does.
- sorts, scatters, gathers: `sort`/`scatter`/`gather` instructions in scope plus those inside
  the fusions in scope (nested fusions included), one per call site; `fused_sorts` etc. are the
  part inside fusions.
- large copies: every `copy` or `copy-start` in scope whose output (the destination buffer of a
  copy-start) is >= 1 MiB, and every fusion in scope that only copies (XLA:CPU wraps a
  standalone copy as `wrapped_copy`), listed with their shapes in `large_copies`;
  `num_large_copies` must stay 0: a whole-pool copy means an update stopped being in place.
  Copies >= 1 MiB that are one op of a larger fusion (a transpose, say) are listed apart in
  `large_fused_copies` and not part of this guard (tests/test_hlo_counts.py also wants none of
  them at the small sizes).
- donated_buffers: entries of the module's `input_output_alias` (outputs that reuse a donated
  input buffer).

Derived: per layer = (2-layer count - 1-layer count) for every number and every key of the
by-target/by-opcode tables; `conditionals_per_token` = conditionals one decode step (one token)
executes in a Llama-3-8B-deep model of 32 layers, extrapolated linearly from the two models
(1-layer count + 31 x per layer); `conditionals_fixed` is the part that does not grow with depth.

The Pallas path is also traced (`jax.make_jaxpr`, so it needs no GPU) with `impl="triton"`:
`pallas_path` holds its Pallas kernels by name, its XLA scatters outside kernels
(`xla_scatters`: each one a kernel of its own on a GPU) and its `host_branches`, the `cond`s outside
kernels (on a GPU each one copies its predicate to the host and waits).

Writes one JSON line per (mode, num_layers) and one per-layer line per mode with device,
backend, JAX version and commit, and prints a table.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import os
import pathlib
import re
import sys
import time

import jax
import jax.extend
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.provenance import emit, git_commit  # noqa: E402
from lserve_jax.sparsity import SparsityConfig  # noqa: E402
from models import kv_cache, llama  # noqa: E402
from models.attention import AttentionConfig  # noqa: E402
from models.config import LlamaConfig  # noqa: E402
from pallas_kernels.impls import default_impl  # noqa: E402
from models.params import param_shapes  # noqa: E402

FULL_MODEL = dict(hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128,
                  intermediate_size=1024, vocab_size=1024)
SMALL_MODEL = dict(hidden_size=512, num_heads=8, num_kv_heads=4, head_dim=64,
                   intermediate_size=256, vocab_size=512)
CONTEXT = {False: 32768, True: 16384}  # by small
MODES = ("dense", "lserve")
LAYERS = (1, 2)
MODEL_LAYERS = 32  # Llama-3-8B depth, for the per-token extrapolation
LARGE_COPY_BYTES = 2**20

# Ops that produce no kernel/thunk; control flow is walked instead of counted.
NO_KERNEL = frozenset({"parameter", "constant", "tuple", "get-tuple-element", "bitcast",
                       "opt-barrier", "after-all", "add-dependency", "domain", "async-update"})
CONTROL_FLOW = frozenset({"while", "conditional", "call", "async-start"})
TRACKED = ("sort", "scatter", "gather")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
               "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
               "s4": 0.5, "u4": 0.5, "s2": 0.25, "u2": 0.25}


# ---- HLO text parsing -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Instruction:
    """One HLO instruction: `%name = type opcode(operands), attributes`."""

    name: str
    type: str  # e.g. "f32[2,257,64,64]{3,2,1,0}" or a tuple "(s32[], f32[8]{0})"
    opcode: str
    attrs: dict  # computation references by role ("calls", "body", "branches", ...) and values


_COMMENT = re.compile(r"/\*.*?\*/")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_HEADER = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)\s*\(.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([^\s=]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"^[a-z][a-z0-9]*\[[^\]]*\](?:\{[^}]*\})?")
_OPCODE = re.compile(r"^\s*([a-z][\w\-]*)\(")
_ARRAY_SHAPE = re.compile(r"([a-z][a-z0-9]*)\[([^\]]*)\]")
_REF = {role: re.compile(rf"\b{role}=%?([\w.\-]+)")
        for role in ("calls", "condition", "body", "to_apply", "true_computation",
                     "false_computation")}
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_BACKEND_KIND = re.compile(r'"kind"\s*:\s*"([^"]+)"')
_FUSION_KIND = re.compile(r"\bkind=(k\w+)")
_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')
_ALIAS = re.compile(r"\{[\d,\s]*\}\s*:\s*\(\s*\d+\s*,")


def _split_type(rest: str) -> tuple[str, str]:
    """'type opcode(...)...' -> (type, 'opcode(...)...'); tuple types are matched by parens."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[:i + 1], rest[i + 1:]
        raise ValueError(f"unbalanced tuple type in {rest[:200]!r}")
    m = _ARRAY.match(rest)
    if m is None:
        raise ValueError(f"no type at {rest[:200]!r}")
    return m.group(0), rest[m.end():]


def _parse_instruction(line: str) -> Instruction | None:
    m = _INSTR.match(line)
    if m is None:
        return None
    name, rest = m.groups()
    type_, rest = _split_type(rest.strip())
    m = _OPCODE.match(rest)
    if m is None:
        raise ValueError(f"no opcode in {line[:200]!r}")
    opcode = m.group(1)
    attrs: dict = {}
    if opcode == "custom-call":
        target = _TARGET.search(rest)
        attrs["target"] = target.group(1) if target else "?"
    if opcode == "fusion":
        kind = _FUSION_KIND.search(rest)
        attrs["kind"] = kind.group(1) if kind else "?"
        if attrs["kind"] == "kCustom":
            backend = _BACKEND_KIND.search(rest)
            if backend:
                attrs["kind"] = backend.group(1)
    if opcode == "while":
        trips = _TRIP_COUNT.search(rest)
        attrs["trip_count"] = int(trips.group(1)) if trips else None
    bare = _STRING.sub('""', rest)  # names inside metadata or configs cannot pose as references
    for role, pattern in _REF.items():
        ref = pattern.search(bare)
        if ref:
            attrs[role] = ref.group(1)
    branches = _BRANCHES.search(bare)
    if branches:
        attrs["branches"] = [b.strip().lstrip("%") for b in branches.group(1).split(",")
                             if b.strip()]
    elif "true_computation" in attrs:
        attrs["branches"] = [attrs["true_computation"], attrs["false_computation"]]
    return Instruction(name=name, type=type_, opcode=opcode, attrs=attrs)


def parse_hlo(text: str) -> tuple[dict[str, list[Instruction]], str, int]:
    """HLO module text -> ({computation name: instructions}, entry name, donated buffers)."""
    computations: dict[str, list[Instruction]] = {}
    entry, current, donated = None, None, 0
    for raw in text.splitlines():
        line = _COMMENT.sub("", raw).rstrip()
        if line.startswith("HloModule"):
            alias = re.search(r"input_output_alias=\{(.*?)\}\s*(?:,\s*\w+=|$)", line)
            donated = len(_ALIAS.findall(alias.group(1))) if alias else 0
            continue
        if current is None:
            m = _HEADER.match(line) if line and not line[0].isspace() else None
            if m:
                current = m.group(2)
                computations[current] = []
                if m.group(1):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        instruction = _parse_instruction(line)
        if instruction is not None:
            computations[current].append(instruction)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return computations, entry, donated


def array_bytes(type_: str) -> int:
    """Bytes of the first array in a type ('f32[4,8]{1,0}' -> 128; a copy-start's destination)."""
    m = _ARRAY_SHAPE.search(type_)
    if m is None:
        return 0
    dtype, dims = m.groups()
    n = 1
    for dim in filter(None, (d.strip().lstrip("<=") for d in dims.split(","))):
        n *= int(dim)
    return int(n * DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else 4))


def _shape(type_: str) -> str:
    m = _ARRAY_SHAPE.search(type_)
    return f"{m.group(1)}[{m.group(2)}]" if m else type_


def _computation(comps: dict, name: str | None) -> list[Instruction]:
    if name not in comps:
        raise ValueError(f"computation {name!r} is referenced but was not parsed")
    return comps[name]


def _copy_only(body: list[Instruction]) -> bool:
    """A fusion computation that does nothing but copy (XLA:CPU's `wrapped_copy`)."""
    ops = {i.opcode for i in body} - {"parameter", "bitcast", "tuple", "get-tuple-element"}
    return ops == {"copy"}


def count_hlo(text: str, *, large_copy_bytes: int = LARGE_COPY_BYTES) -> dict:
    """Counts of one compiled program's HLO text, as the module docstring defines them."""
    comps, entry, donated = parse_hlo(text)
    counts = dict(kernels=0, fusions=0, fusion_kinds=collections.Counter(),
                  custom_calls=collections.Counter(), other_kernels=collections.Counter(),
                  conditionals=0, while_loops=0, loops_without_trip_count=0,
                  large_copies=[], large_fused_copies=[])
    tracked = {op: 0 for op in TRACKED}
    fused = {op: 0 for op in TRACKED}

    def large(instr: Instruction, via: str, into: list):
        nbytes = array_bytes(instr.type)
        if nbytes >= large_copy_bytes:
            into.append(dict(shape=_shape(instr.type), mib=round(nbytes / 2**20, 3), via=via))

    def walk_fusion(name: str):
        for instr in _computation(comps, name):
            if instr.opcode in fused:
                fused[instr.opcode] += 1
            elif instr.opcode == "copy":
                large(instr, "inside fusion", counts["large_fused_copies"])
            elif instr.opcode == "fusion":
                walk_fusion(instr.attrs.get("calls"))

    def walk(name: str) -> tuple[int, int]:
        """Count computation `name` into `counts`; return (kernels, conditionals) it runs."""
        launched = conditionals = 0
        for instr in _computation(comps, name):
            op, attrs = instr.opcode, instr.attrs
            if op == "while":
                counts["while_loops"] += 1
                trips = attrs["trip_count"]
                if trips is None:
                    counts["loops_without_trip_count"] += 1
                    trips = 1
                body_k, body_c = walk(attrs["body"])
                cond_k, cond_c = walk(attrs["condition"])
                launched += trips * body_k + (trips + 1) * cond_k
                conditionals += trips * body_c + (trips + 1) * cond_c
            elif op == "conditional":
                counts["conditionals"] += 1
                branches = [walk(branch) for branch in attrs["branches"]]
                k, c = max(branches)
                launched, conditionals = launched + k, conditionals + 1 + c
            elif op in ("call", "async-start"):
                callee = attrs.get("to_apply") if op == "call" else attrs.get("calls")
                k, c = walk(callee)
                launched, conditionals = launched + k, conditionals + c
            elif op in NO_KERNEL or op.endswith("-done"):
                continue
            else:
                counts["kernels"] += 1
                launched += 1
                if op == "fusion":
                    counts["fusions"] += 1
                    counts["fusion_kinds"][attrs["kind"]] += 1
                    body = _computation(comps, attrs.get("calls"))
                    if _copy_only(body):
                        large(instr, "copy fusion", counts["large_copies"])
                    else:
                        walk_fusion(attrs["calls"])
                elif op == "custom-call":
                    counts["custom_calls"][attrs["target"]] += 1
                else:
                    counts["other_kernels"][op] += 1
                    if op in tracked:
                        tracked[op] += 1
                    if op in ("copy", "copy-start"):
                        large(instr, op, counts["large_copies"])
        return launched, conditionals

    launched, conditionals = walk(entry)
    counts.update(kernels_launched=launched, conditionals_executed=conditionals,
                  num_custom_calls=sum(counts["custom_calls"].values()),
                  num_large_copies=len(counts["large_copies"]),
                  num_large_fused_copies=len(counts["large_fused_copies"]),
                  donated_buffers=donated)
    for op in TRACKED:
        counts[f"{op}s"] = tracked[op] + fused[op]
        counts[f"fused_{op}s"] = fused[op]
    for key in ("fusion_kinds", "custom_calls", "other_kernels"):
        counts[key] = dict(sorted(counts[key].items()))
    return counts


# ---- the decode step --------------------------------------------------------------------------

def streaming_pattern(num_layers: int, num_kv_heads: int) -> tuple[tuple[bool, ...], ...]:
    """Half the KV heads of every layer stream: the first half in even layers, else the second
    (as benchmarks/decode_e2e.py)."""
    half = num_kv_heads // 2
    first = (True,) * half + (False,) * (num_kv_heads - half)
    second = (False,) * (num_kv_heads - half) + (True,) * half
    return tuple(first if layer % 2 == 0 else second for layer in range(num_layers))


def decode_setup(mode: str, num_layers: int, small: bool):
    """(config, attention, page sizes, dtype, context) of one measured decode step."""
    on_gpu = jax.default_backend() == "gpu"
    config = LlamaConfig(num_layers=num_layers, **(SMALL_MODEL if small else FULL_MODEL),
                         rope_theta=500000.0, max_position_embeddings=2**20)
    impl = default_impl(jax.default_backend())
    s = dataclasses.replace(SparsityConfig(), page_selection="kv_head")  # the shipped knobs
    if mode == "dense":
        attention = AttentionConfig(mode="dense", impl=impl, sparsity=s)
    elif mode == "lserve":
        attention = AttentionConfig(
            mode="lserve", impl=impl,
            streaming_heads=streaming_pattern(num_layers, config.num_kv_heads), sparsity=s)
    else:
        raise ValueError(f"mode={mode!r} must be one of {MODES}")
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    return config, attention, s, dtype, CONTEXT[small]


def decode_args(config, attention, s, dtype, context) -> tuple:
    """Abstract arguments of one decode step (params, cache, tokens, slots, active), batch 1,
    with pages for the context and room for the next tokens plus the null page."""
    pages_per_seq = context // s.page_size + 1
    spec = llama.cache_spec(config, attention, num_pages=pages_per_seq + 1, max_seqs=1,
                            max_pages_per_seq=pages_per_seq, dtype=jnp.dtype(dtype).name)
    cache = jax.eval_shape(lambda: kv_cache.init_cache(spec))
    ids = jax.ShapeDtypeStruct((1,), jnp.int32)
    return param_shapes(config, dtype), cache, ids, ids, jax.ShapeDtypeStruct((1,), jnp.bool_)


def compile_decode(mode: str, num_layers: int, small: bool = True, *, donate: bool = True):
    """The compiled decode step from abstract arguments; returns (compiled, cache shapes).
    `donate=False` (tests only) leaves the cache undonated, which forces whole-pool copies."""
    config, attention, s, dtype, context = decode_setup(mode, num_layers, small)
    args = decode_args(config, attention, s, dtype, context)
    step = jax.jit(llama.decode, static_argnames=("config", "attention"),
                   donate_argnames=("cache",) if donate else ())
    compiled = step.lower(*args, config=config, attention=attention).compile()
    return compiled, args[1]


def count_decode_hlo(mode: str, num_layers: int, small: bool = True) -> dict:
    """HLO counts (see `count_hlo`) of one decode step, with what was compiled."""
    config, attention, s, dtype, context = decode_setup(mode, num_layers, small)
    start = time.perf_counter()
    compiled, cache = compile_decode(mode, num_layers, small)
    compile_s = time.perf_counter() - start
    pool_bytes = max(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
    model = (f"{num_layers}L h{config.hidden_size} {config.num_heads}/{config.num_kv_heads} "
             f"heads D{config.head_dim} i{config.intermediate_size} v{config.vocab_size}")
    rec = dict(mode=mode, num_layers=num_layers, impl=attention.impl, model=model,
               dtype=jnp.dtype(dtype).name, batch=1, context=context,
               largest_cache_array_mib=round(pool_bytes / 2**20, 3),
               compile_s=round(compile_s, 2))
    if mode == "lserve":
        rec.update(page_size=s.page_size, logical_page_size=s.logical_page_size,
                   token_budget=s.token_budget, selector_interval=s.selector_interval,
                   keep_first_pages=s.keep_first_pages, page_selection=s.page_selection,
                   sink_tokens=s.dec_sink_tokens, local_tokens=s.dec_local_tokens,
                   streaming_fraction=0.5)
    rec.update(count_hlo(compiled.as_text()))
    rec["pallas_path"] = count_pallas_path(mode, num_layers, small)
    return rec


# ---- the Pallas path, traced ----------------------------------------------------------------

def _walk_jaxpr(jaxpr, counts: collections.Counter) -> None:
    """Count `pallas_call`s (by kernel name) and `cond`s in a jaxpr and the jaxprs its control
    flow and calls run, not inside kernels (a branch inside a kernel is a GPU branch, not a
    host round trip)."""
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "pallas_call":
            meta = eqn.params.get("name_and_src_info") or eqn.params.get("name")
            counts[f"pallas_call:{getattr(meta, 'name', meta)}"] += 1
            continue
        if name == "cond":
            counts["cond"] += 1
        if name.startswith("scatter"):  # scatter, scatter-add, scatter-max, ...
            counts["scatter"] += 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    _walk_jaxpr(sub.jaxpr, counts)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    _walk_jaxpr(sub, counts)


def count_pallas_path(mode: str, num_layers: int, small: bool = True) -> dict:
    """The decode step with `impl="triton"` traced (not compiled, so it runs on any host):
    Pallas kernels launched per step by name, and `cond`s outside kernels (each is a host
    round trip per step on a GPU; the target is none), and XLA scatters outside kernels (each a
    kernel of its own on a GPU)."""
    config, attention, s, dtype, context = decode_setup(mode, num_layers, small)
    attention = dataclasses.replace(attention, impl="triton", interpret=False)
    closed = jax.make_jaxpr(functools.partial(llama.decode, config=config, attention=attention))(
        *decode_args(config, attention, s, dtype, context))
    counts = collections.Counter()
    _walk_jaxpr(closed.jaxpr, counts)
    kernels = {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("pallas_call:")}
    return dict(pallas_calls=kernels, num_pallas_calls=sum(kernels.values()),
                host_branches=counts["cond"], xla_scatters=counts["scatter"])


# ---- derived figures --------------------------------------------------------------------------

COUNT_FIELDS = ("kernels", "kernels_launched", "fusions", "num_custom_calls", "conditionals",
                "conditionals_executed", "while_loops", "loops_without_trip_count", "sorts",
                "fused_sorts", "scatters", "fused_scatters", "gathers", "fused_gathers",
                "num_large_copies", "num_large_fused_copies", "donated_buffers")
TABLE_FIELDS = ("fusion_kinds", "custom_calls", "other_kernels")


def per_layer(one: dict, two: dict) -> dict:
    """Per-layer figures: (2-layer count - 1-layer count) for every count and table entry."""
    out = {f: two[f] - one[f] for f in COUNT_FIELDS}
    out["pallas_path"] = {
        "num_pallas_calls": (two["pallas_path"]["num_pallas_calls"]
                             - one["pallas_path"]["num_pallas_calls"]),
        "host_branches": two["pallas_path"]["host_branches"] - one["pallas_path"]["host_branches"],
        "xla_scatters": two["pallas_path"]["xla_scatters"] - one["pallas_path"]["xla_scatters"]}
    for f in TABLE_FIELDS:
        keys = sorted(set(one[f]) | set(two[f]))
        out[f] = {k: two[f].get(k, 0) - one[f].get(k, 0) for k in keys
                  if two[f].get(k, 0) != one[f].get(k, 0)}
    return out


def conditionals_per_token(one: dict, two: dict, num_layers: int = MODEL_LAYERS) -> int:
    """Conditionals one decode step (one token) executes with `num_layers` layers, extrapolated
    from the 1- and 2-layer counts: 1-layer + (num_layers - 1) x per layer."""
    step = two["conditionals_executed"] - one["conditionals_executed"]
    return one["conditionals_executed"] + (num_layers - 1) * step


def print_table(records: list) -> None:
    cols = (("kernels", "kernels"), ("launched", "kernels_launched"), ("fusions", "fusions"),
            ("custom", "num_custom_calls"), ("conds", "conditionals"),
            ("whiles", "while_loops"), ("sorts", "sorts"), ("scatters", "scatters"),
            ("gathers", "gathers"), ("copies>=1MiB", "num_large_copies"))
    print(f"{'mode':>7} {'layers':>9} " + " ".join(f"{c:>{max(len(c), 6)}}" for c, _ in cols))
    for r in records:
        layers = "per layer" if r["kind"] == "per_layer" else str(r["num_layers"])
        print(f"{r['mode']:>7} {layers:>9} "
              + " ".join(f"{r[f]:>{max(len(c), 6)}}" for c, f in cols))
    for r in records:
        if r["kind"] == "per_layer":
            print(f"{r['mode']}: conditionals per token ({MODEL_LAYERS} layers) "
                  f"{r['conditionals_per_token']}, fixed {r['conditionals_fixed']}; per layer "
                  f"custom calls {r['custom_calls']}, other kernels {r['other_kernels']}; "
                  f"Pallas path per layer: {r['pallas_path']['num_pallas_calls']} kernels, "
                  f"{r['pallas_path']['host_branches']} host branches, "
                  f"{r['pallas_path']['xla_scatters']} XLA scatters")
        else:
            print(f"{r['mode']} {r['num_layers']}L Pallas path: kernels "
                  f"{r['pallas_path']['pallas_calls']}, host branches "
                  f"{r['pallas_path']['host_branches']}")
            for c in r["large_copies"]:
                print(f"{r['mode']} {r['num_layers']}L: large copy {c}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=None)
    parser.add_argument("--small", action="store_true", help="CPU-sized model (the CPU default)")
    args = parser.parse_args()

    small = args.small or jax.default_backend() != "gpu"
    device = jax.devices()[0].device_kind
    slug = re.sub(r"[^a-z0-9]+", "_", device.lower()).strip("_")
    out = args.out or pathlib.Path(__file__).parent / "results" / f"hlo_counts_{slug}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=device, backend=jax.default_backend(), jax=jax.__version__,
                commit=git_commit(), host_cpus=os.cpu_count(), small=small)

    start = time.perf_counter()
    records = []
    with out.open("w") as f:
        for mode in MODES:
            by_layers = {}
            for num_layers in LAYERS:
                rec = dict(meta, kind="config", **count_decode_hlo(mode, num_layers, small))
                by_layers[num_layers] = rec
                emit(records, f, rec)
                f.flush()
            one, two = by_layers[1], by_layers[2]
            rec = dict(meta, kind="per_layer", mode=mode, impl=one["impl"],
                       model=one["model"].split(" ", 1)[1], context=one["context"],
                       **per_layer(one, two),
                       conditionals_per_token=conditionals_per_token(one, two),
                       conditionals_fixed=(one["conditionals_executed"]
                                           - (two["conditionals_executed"]
                                              - one["conditionals_executed"])))
            emit(records, f, rec)
            f.flush()
    print_table(records)
    print(f"wrote {out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
