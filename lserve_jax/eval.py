"""Does LServe keep dense accuracy? `python -m lserve_jax.eval [--ckpt PATH] --out DIR`.

Two measurements, each over a list of attention settings (dense first, the reference):

* Passkey retrieval: plain-completion prompts of each length with the needle at each depth;
  a cell is a hit when the greedy answer's first number is the key. Saved as `passkey.json` and
  one heatmap panel per setting in `passkey.png`.
* Teacher-forced decode on held-out book text: the first L − N tokens are prefilled, the next N
  are fed one decode step at a time; at each step the setting's top-1 prediction is compared with
  dense attention's (agreement) and the true next token's log-probability is kept (perplexity).
  Saved as `agreement.json` and `agreement.png`.

Quantization (`--quant KV:W,...`, default `auto:auto`): every setting runs once per pair of KV
cache dtype (auto, int8, fp8, int4: pallas_kernels/quant.py, scales from lserve_jax/kv_quant.py) and
weight dtype (auto, int8: models/weight_quant.py); the reference stays dense attention with the
model's float KV and weights. A prompt is prefilled once per weight dtype in one shot, whose
attention reads the fresh keys and values, so a quantized cache is that prefill's keys and
values stored quantized (`cache_from_dense`); every decode step then reads the quantized pages.

Settings: dense; the head pattern at `static_sparsity` 0.5 with each `--budgets` token budget;
the budget 1024 with each `--sparsities`; a `--baseline` pattern at the same sparsities; and
scaled prefill windows (`--windows`, `ctx_local_tokens`) that make streaming heads matter in
prefill too. Every setting runs the real LServe decode (selected pages for dense heads, sink +
ring for streaming heads). A setting whose prefill Λ window covers the whole prompt has the same
prefill as dense attention, so its cache is built from the dense prefill's keys and values
(`cache_from_dense`) instead of prefilling again.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lserve_jax import corpus, head_pattern
from lserve_jax.provenance import git_commit
from lserve_jax.sparsity import SparsityConfig
from models import kv_cache, llama
from models.attention import AttentionConfig, LayerStep, store_layer
from models.config import LlamaConfig
from pallas_kernels.impls import IMPLS, normalize_impl

log = logging.getLogger("lserve_jax")
CHUNK = 8  # decode steps per compiled call


# ---- metrics ---------------------------------------------------------------------------------

def top1_agreement(predictions, reference) -> float:
    """Share of positions where two top-1 predictions are the same token."""
    predictions, reference = np.asarray(predictions), np.asarray(reference)
    if predictions.shape != reference.shape or predictions.size == 0:
        raise ValueError(f"predictions {predictions.shape} and reference {reference.shape} "
                         "must have one equal, non-empty shape")
    return float((predictions == reference).mean())


def confident_agreement(predictions, reference, reference_top1_logp,
                        threshold: float = 0.5) -> tuple[float | None, int]:
    """top1_agreement over the positions where the reference gave its top-1 token probability
    >= threshold -> (agreement, number of such positions); agreement None when there are none."""
    confident = np.exp(np.asarray(reference_top1_logp, np.float64)) >= threshold
    if not confident.any():
        return None, 0
    p, r = np.asarray(predictions)[confident], np.asarray(reference)[confident]
    return top1_agreement(p, r), int(confident.sum())


def perplexity(nll) -> float:
    """exp(mean negative log-likelihood) of the true tokens."""
    nll = np.asarray(nll, np.float64)
    if nll.size == 0:
        raise ValueError("perplexity of no tokens")
    return float(np.exp(nll.mean()))


# ---- settings --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Setting:
    """One attention configuration under evaluation."""

    name: str
    attention: AttentionConfig
    pattern: str | None = None  # "calibrated", "baseline", or None (dense)
    static_sparsity: float = 0.0
    token_budget: int | None = None
    ctx_local_tokens: int | None = None
    kv_cache_dtype: str = "auto"
    weight_dtype: str = "auto"

    def row(self) -> dict:
        return {"setting": self.name, "pattern": self.pattern,
                "static_sparsity": self.static_sparsity, "token_budget": self.token_budget,
                "ctx_local_tokens": self.ctx_local_tokens,
                "kv_cache_dtype": self.kv_cache_dtype, "weight_dtype": self.weight_dtype}


def build_settings(config: LlamaConfig, *, pattern: str, baseline: str | None,
                   budgets: list[int], sparsities: list[float], windows: list[int],
                   main_budget: int = 1024, main_sparsity: float = 0.5, impl: str = "xla",
                   sparsity: SparsityConfig | None = None) -> list[Setting]:
    """dense; the pattern at `main_sparsity` × each budget; `main_budget` × each sparsity;
    the baseline pattern at each non-zero sparsity with `main_budget`; each prefill window at
    `main_sparsity`/`main_budget`. Duplicates are dropped, order kept.

    `sparsity` (default `SparsityConfig()`) gives every setting's other knobs and the page
    sizes (the dense setting's too, so all caches share them); each LServe setting replaces its
    `static_sparsity`, `token_budget` and, with a window, `ctx_local_tokens`, validated there."""
    base = SparsityConfig() if sparsity is None else sparsity
    patterns = {"calibrated": pattern, "baseline": baseline}

    def lserve(which, static_sparsity, budget, window=None):
        streaming = head_pattern.streaming_heads_for_model(
            patterns[which], static_sparsity, config.num_layers, config.num_kv_heads)
        knobs = dataclasses.replace(base, static_sparsity=static_sparsity, token_budget=budget,
                                    ctx_local_tokens=window or base.ctx_local_tokens)
        att = AttentionConfig(mode="lserve", impl=impl, streaming_heads=streaming, sparsity=knobs)
        name = (f"{which} s={static_sparsity:g} budget={budget}"
                + (f" window={window}" if window else ""))
        return Setting(name, att, which, static_sparsity, budget, window)

    settings = [Setting("dense", AttentionConfig(mode="dense", impl=impl, sparsity=base))]
    settings += [lserve("calibrated", main_sparsity, b) for b in budgets]
    settings += [lserve("calibrated", s, main_budget) for s in sparsities]
    if baseline is not None:
        settings += [lserve("baseline", s, main_budget) for s in sparsities if s > 0]
    settings += [lserve("calibrated", main_sparsity, main_budget, w) for w in windows]
    seen, unique = set(), []
    for s in settings:
        if s.name not in seen:
            seen.add(s.name)
            unique.append(s)
    return unique


def parse_quant(text: str) -> list[tuple[str, str]]:
    """"KV:W,KV:W" -> [(kv_cache_dtype, weight_dtype), ...] (a bare "KV" means "KV:auto")."""
    from models.weight_quant import check_weight_dtype
    from pallas_kernels.quant import KV_CACHE_DTYPES

    pairs = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        kv, _, weights = item.partition(":")
        if kv not in KV_CACHE_DTYPES:
            raise ValueError(f"--quant {item!r}: KV cache dtype must be one of {KV_CACHE_DTYPES}")
        pairs.append((kv, check_weight_dtype(weights or "auto")))
    if not pairs:
        raise ValueError("--quant names no KV:W pair")
    return list(dict.fromkeys(pairs))


def with_quantization(settings: list[Setting], pairs: list[tuple[str, str]]) -> list[Setting]:
    """Every setting once per (kv_cache_dtype, weight_dtype) pair, pair by pair; the float
    pair ("auto", "auto") first, so the float dense setting stays the reference."""
    pairs = sorted(pairs, key=lambda p: p != ("auto", "auto"))
    out = []
    for kv, weights in pairs:
        suffix = "".join(f" {name}={dtype}" for name, dtype in (("kv", kv), ("w", weights))
                         if dtype != "auto")
        out += [dataclasses.replace(s, name=s.name + suffix, kv_cache_dtype=kv,
                                    weight_dtype=weights) for s in settings]
    return out


# ---- running a setting -----------------------------------------------------------------------

class Runner:
    """Prefill and decode one sequence (slot 0) under any setting, with caches sized for
    `max_tokens` so the decode executables are shared by every prompt length. Each cache has
    the page sizes of its setting's `attention.sparsity`."""

    def __init__(self, config: LlamaConfig, params: dict, *, max_tokens: int,
                 kv_scales: tuple | None = None):
        self.config, self.params = config, params
        self.max_tokens = max_tokens
        self.dtype = jnp.dtype(params["embed"].dtype).name
        self.kv_scales = kv_scales  # for quantized caches (lserve_jax/kv_quant.py)
        self._params = {"auto": params}

    def params_for(self, weight_dtype: str) -> dict:
        """The params with `weight_dtype` layer weights (quantized once, then kept)."""
        if weight_dtype not in self._params:
            from models.weight_quant import quantize_params

            self._params[weight_dtype] = quantize_params(self.params, weight_dtype)
        return self._params[weight_dtype]

    def empty_cache(self, attention: AttentionConfig, num_tokens: int,
                    kv_cache_dtype: str = "auto") -> kv_cache.KVCache:
        pages_per_seq = -(-self.max_tokens // attention.sparsity.page_size)
        if kv_cache_dtype != "auto" and self.kv_scales is None:
            raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} needs the runner's kv_scales")
        spec = llama.cache_spec(self.config, attention, num_pages=pages_per_seq + 1, max_seqs=1,
                                max_pages_per_seq=pages_per_seq, dtype=self.dtype,
                                kv_cache_dtype=kv_cache_dtype,
                                kv_scales=self.kv_scales if kv_cache_dtype != "auto" else None)
        cache, ok = kv_cache.reserve(kv_cache.init_cache(spec), jnp.int32(0),
                                     jnp.int32(num_tokens))
        if not bool(ok):
            raise ValueError(f"{num_tokens} tokens exceed the cache ({pages_per_seq} pages)")
        return cache

    def prefill(self, attention: AttentionConfig, ids: list[int], total_tokens: int, *,
                kv_cache_dtype: str = "auto", weight_dtype: str = "auto"):
        """-> (cache holding `ids`, logits [V] of the last prompt token)."""
        step = 512 if len(ids) > 512 else 64  # few prefill compiles, little padding
        t = -(-len(ids) // step) * step
        tokens = np.zeros((1, t), np.int32)
        tokens[0, :len(ids)] = ids
        cache = self.empty_cache(attention, total_tokens, kv_cache_dtype)
        cache, logits = _prefill(self.params_for(weight_dtype), cache, jnp.asarray(tokens),
                                 jnp.asarray([len(ids)], jnp.int32), config=self.config,
                                 attention=attention)
        return cache, logits[0]

    def decode(self, attention: AttentionConfig, cache, inputs, targets, force,
               weight_dtype: str = "auto"):
        """Run len(inputs) decode steps from `cache`, in chunks of CHUNK.

        inputs, targets: int lists; force: bools. Step i feeds inputs[i] when force[i], else the
        previous step's top-1. Returns (cache, top1 [n], logp of targets [n], logp of top1 [n]).
        """
        n = len(inputs)
        pad = -n % CHUNK
        inputs = np.asarray(list(inputs) + [0] * pad, np.int32)
        targets = np.asarray(list(targets) + [0] * pad, np.int32)
        force = np.asarray(list(force) + [True] * pad, bool)
        top1, logp, top_logp = [], [], []
        prev = jnp.zeros((1,), jnp.int32)
        for c in range(0, len(inputs), CHUNK):
            sl = slice(c, c + CHUNK)
            cache, prev, a, lp, tlp = _decode_chunk(
                self.params_for(weight_dtype), cache, jnp.asarray(inputs[None, sl]),
                jnp.asarray(targets[None, sl]), jnp.asarray(force[sl]), prev, config=self.config,
                attention=attention)
            top1.append(np.asarray(a[0]))
            logp.append(np.asarray(lp[0]))
            top_logp.append(np.asarray(tlp[0]))
        return (cache, np.concatenate(top1)[:n], np.concatenate(logp)[:n],
                np.concatenate(top_logp)[:n])


@functools.partial(jax.jit, static_argnames=("config", "attention"))
def _prefill(params, cache, tokens, lengths, *, config, attention):
    return llama.prefill(params, cache, tokens, lengths, jnp.zeros((1,), jnp.int32),
                         config=config, attention=attention)


@functools.partial(jax.jit, static_argnames=("config", "attention"))
def _decode_chunk(params, cache, inputs, targets, force, prev, *, config, attention):
    """CHUNK decode steps for slot 0; see `Runner.decode`."""
    slots = jnp.zeros((1,), jnp.int32)
    active = jnp.ones((1,), bool)

    def step(carry, xs):
        cache, prev = carry
        given, target, forced = xs
        token = jnp.where(forced, given, prev)
        cache, logits = llama.decode(params, cache, token, slots, active, config=config,
                                     attention=attention)
        top1 = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        target_logp = jnp.take_along_axis(logp, target[:, None], axis=-1)[:, 0]
        return (cache, top1), (top1, target_logp, logp.max(axis=-1))

    (cache, prev), (top1, logp, top_logp) = jax.lax.scan(step, (cache, prev),
                                                         (inputs.T, targets.T, force))
    return cache, prev, top1.T, logp.T, top_logp.T


def cache_from_dense(dense: kv_cache.KVCache, empty: kv_cache.KVCache, length: int, *,
                     config: LlamaConfig, attention: AttentionConfig) -> kv_cache.KVCache:
    """The cache an LServe prefill of the same prompt would leave, from a dense prefill's cache.

    Exact only when LServe's prefill attention equals dense attention, i.e. the Λ window covers
    the prompt (`ctx_local_tokens >= length`); then every layer's keys and values are the same
    and only their placement (dense pool + statistics, streaming sink/ring pages) differs.
    `empty` is a fresh cache for `attention` with slot 0's pages reserved.
    """
    local = attention.sparsity.ctx_local_tokens
    if attention.has_streaming and local < length:
        raise ValueError(f"ctx_local_tokens={local} < prompt length {length}: "
                         "LServe's prefill differs from dense; prefill it instead")
    return _cache_from_dense(dense, empty, jnp.int32(length), config=config, attention=attention)


@functools.partial(jax.jit, static_argnames=("config", "attention"))
def _cache_from_dense(dense, cache, length, *, config, attention):
    s = dense.page_size
    t = dense.page_table.shape[1] * s
    positions = jnp.arange(t, dtype=jnp.int32)[None]
    valid = positions < length
    pages = dense.page_table[0][positions[0] // s]
    offsets = positions[0] % s
    # The layer steps' own store (`store_layer`), fed the dense prefill's keys and values.
    step = LayerStep(slots=jnp.zeros((1,), jnp.int32), positions=positions, valid=valid,
                     lengths=jnp.reshape(length, (1,)), cos=None, sin=None)
    for i in range(config.num_layers):
        k = dense.k[i][:, pages, offsets].transpose(1, 0, 2)[None]  # [1, T, Hkv, D]
        v = dense.v[i][:, pages, offsets].transpose(1, 0, 2)[None]
        view = store_layer(cache.layer_view(i), k, v, step,
                           config=attention.for_layer(i, config.num_kv_heads))
        cache = cache.with_layer(i, view)
    return cache.replace(seq_lens=cache.seq_lens.at[0].set(length),
                         decode_steps=cache.decode_steps.at[0].set(0),
                         selected_num_pages=cache.selected_num_pages.at[0].set(-1))


class DensePrefills:
    """The dense float-KV prefill of one prompt, per weight dtype, made when first asked for."""

    def __init__(self, runner: Runner, attention: AttentionConfig, ids: list[int],
                 total_tokens: int):
        self.runner, self.attention, self.ids, self.total = runner, attention, ids, total_tokens
        self._done = {}

    def __call__(self, weight_dtype: str = "auto"):
        """-> (cache, logits of the last prompt token)."""
        if weight_dtype not in self._done:
            self._done[weight_dtype] = self.runner.prefill(self.attention, self.ids, self.total,
                                                           weight_dtype=weight_dtype)
        return self._done[weight_dtype]


def _setting_cache(runner: Runner, setting: Setting, dense: DensePrefills, ids, total_tokens):
    """(cache, first-token logits) of `setting` after prefilling `ids`."""
    att, kv, weights = setting.attention, setting.kv_cache_dtype, setting.weight_dtype
    if att.has_streaming and att.sparsity.ctx_local_tokens < len(ids):
        return runner.prefill(att, ids, total_tokens, kv_cache_dtype=kv, weight_dtype=weights)
    dense_cache, logits = dense(weights)
    if att.mode == "dense" and kv == "auto":
        return dense_cache, logits
    empty = runner.empty_cache(att, total_tokens, kv)
    return cache_from_dense(dense_cache, empty, len(ids), config=runner.config,
                            attention=att), logits


# ---- the two measurements --------------------------------------------------------------------

def passkey_grid(runner: Runner, tokenizer, settings: list[Setting], *, lengths: list[int],
                 depths: list[float], new_tokens: int = 8, haystack: str = "filler",
                 seed: int = 0, progress=None) -> list[dict]:
    """One record per (setting, length, depth): the answer and whether it is the key."""
    rng = np.random.default_rng(seed)
    records = []
    for length in lengths:
        for depth in depths:
            key = str(int(rng.integers(10_000, 100_000)))
            prompt = corpus.passkey_prompt(tokenizer, length=length, depth=depth, passkey=key,
                                           haystack=haystack)
            total = len(prompt.ids) + new_tokens
            dense = DensePrefills(runner, settings[0].attention, prompt.ids, total)
            for setting in settings:
                cache, logits = _setting_cache(runner, setting, dense, prompt.ids, total)
                first = int(jnp.argmax(logits))
                inputs = [first] + [0] * (new_tokens - 2)
                force = [True] + [False] * (new_tokens - 2)
                _, top1, _, _ = runner.decode(setting.attention, cache, inputs, inputs, force,
                                              setting.weight_dtype)
                answer = tokenizer.decode([first] + top1.tolist())
                hit = corpus.passkey_found(answer, key)
                records.append(dict(setting.row(), length=length, depth=depth, passkey=key,
                                    answer=answer, hit=hit))
                if progress:
                    progress(f"passkey L={length} depth={depth:g} {setting.name}: "
                             f"{'hit' if hit else 'miss'} {answer!r}")
    return records


def teacher_forced(runner: Runner, tokenizer, settings: list[Setting], *, lengths: list[int],
                   num_tokens: int, books: tuple[str, ...] = corpus.EVAL_BOOKS,
                   progress=None) -> list[dict]:
    """One record per (setting, length, book): agreement with dense and perplexity over the
    last `num_tokens` positions of an L-token window of the book."""
    records = []
    for length in lengths:
        for book in books:
            ids = corpus.book_ids(tokenizer, book)
            if len(ids) < length + 1:
                raise ValueError(f"book {book} has {len(ids)} tokens; {length + 1} needed")
            prefix = ids[:length - num_tokens].tolist()
            inputs = ids[length - num_tokens:length].tolist()
            targets = ids[length - num_tokens + 1:length + 1].tolist()
            dense = DensePrefills(runner, settings[0].attention, prefix, length)
            reference = None
            for setting in settings:
                cache, _ = _setting_cache(runner, setting, dense, prefix, length)
                _, top1, logp, top_logp = runner.decode(setting.attention, cache, inputs,
                                                        targets, [True] * num_tokens,
                                                        setting.weight_dtype)
                if reference is None:
                    reference, reference_top_logp = top1, top_logp
                confident, num_confident = confident_agreement(top1, reference,
                                                               reference_top_logp)
                rec = dict(setting.row(), length=length, book=book, tokens=num_tokens,
                           agreement=top1_agreement(top1, reference),
                           confident_agreement=confident, confident_tokens=num_confident,
                           perplexity=perplexity(-logp),
                           accuracy=float((top1 == np.asarray(targets)).mean()))
                records.append(rec)
                if progress:
                    progress(f"forced L={length} {book} {setting.name}: agreement "
                             f"{rec['agreement']:.4f} ppl {rec['perplexity']:.3f}")
    return records


# ---- summaries and plots ---------------------------------------------------------------------

def summarize(passkey: list[dict], forced: list[dict]) -> list[dict]:
    """Per setting: passkey hits, cells at or above dense, and per length the token-weighted
    agreement, perplexity, and agreement where dense was confident (top-1 probability >= 0.5)."""
    names = list(dict.fromkeys([r["setting"] for r in passkey + forced]))
    dense_hits = {(r["length"], r["depth"]): r["hit"] for r in passkey if r["setting"] == "dense"}
    rows = []
    for name in names:
        p = [r for r in passkey if r["setting"] == name]
        f = [r for r in forced if r["setting"] == name]
        row = {"setting": name, "passkey_hits": sum(r["hit"] for r in p), "passkey_cells": len(p),
               "cells_ge_dense": sum(r["hit"] >= dense_hits[(r["length"], r["depth"])]
                                     for r in p)}
        for length in sorted({r["length"] for r in f}):
            at = [r for r in f if r["length"] == length]
            tokens = sum(r["tokens"] for r in at)
            row[f"agreement@{length}"] = sum(r["agreement"] * r["tokens"] for r in at) / tokens
            nll = sum(np.log(r["perplexity"]) * r["tokens"] for r in at) / tokens
            row[f"ppl@{length}"] = float(np.exp(nll))
            confident = [r for r in at if r.get("confident_tokens")]
            if confident:
                n = sum(r["confident_tokens"] for r in confident)
                row[f"confident_agreement@{length}"] = sum(
                    r["confident_agreement"] * r["confident_tokens"] for r in confident) / n
                row[f"confident_tokens@{length}"] = n
        rows.append(row)
    return rows


def plot_passkey(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    names = list(dict.fromkeys(r["setting"] for r in records))
    lengths = sorted({r["length"] for r in records})
    depths = sorted({r["depth"] for r in records})
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    cmap = ListedColormap(["#d9534f", "#5cb85c"])
    for ax, name in zip(axes.flat, names):
        grid = np.zeros((len(depths), len(lengths)))
        for r in records:
            if r["setting"] == name:
                grid[depths.index(r["depth"]), lengths.index(r["length"])] = r["hit"]
        ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n % 1024 == 0 else str(n)
                                            for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
        ax.set_title(f"{name}\n{int(grid.sum())}/{grid.size} hits", fontsize=8)
        ax.set_xlabel("context", fontsize=7)
        ax.set_ylabel("depth", fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle("passkey retrieval (green: hit)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_agreement(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in summary for k in r if k.startswith("agreement@")},
                  key=lambda k: int(k.split("@")[1]))
    if not keys:
        return
    names = [r["setting"] for r in summary if r["setting"] != "dense" and keys[0] in r]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names) + 2), 3.6))
    width = 0.8 / len(keys)
    for j, key in enumerate(keys):
        vals = [next(r.get(key, np.nan) for r in summary if r["setting"] == n) for n in names]
        ax.bar(np.arange(len(names)) + j * width, vals, width, label=key.split("@")[1] + " tokens")
    ax.axhline(0.99, color="k", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(names)) + width * (len(keys) - 1) / 2, names, rotation=35,
                  ha="right", fontsize=7)
    ax.set_ylabel("top-1 agreement with dense")
    ax.set_ylim(min(0.8, min(r[k] for r in summary for k in keys if k in r) - 0.02), 1.005)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- command line ----------------------------------------------------------------------------

def _previous(path: Path) -> list[dict]:
    """Records of an earlier run in the results folder (a part skipped now keeps them)."""
    return json.loads(path.read_text())["records"] if path.is_file() else []


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lserve_jax.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="checkpoint (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--pattern", help="head pattern TSV (default: the checkpoint's shipped one)")
    p.add_argument("--baseline", help="a second pattern to compare (e.g. the profiling one)")
    p.add_argument("--lengths", type=_ints, default=[1024, 2048, 4096, 8192],
                   help="passkey prompt lengths (capped at the model's context)")
    p.add_argument("--depths", type=_floats, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--budgets", type=_ints, default=[256, 512, 1024, 4096])
    p.add_argument("--sparsities", type=_floats, default=[0.0, 0.25, 0.5, 0.75])
    p.add_argument("--windows", type=_ints, default=[1024],
                   help="scaled prefill ctx_local_tokens to evaluate")
    p.add_argument("--main-budget", type=int, default=1024)
    p.add_argument("--main-sparsity", type=float, default=0.5)
    p.add_argument("--ppl-lengths", type=_ints, default=[2048, 4096, 8192])
    p.add_argument("--ppl-tokens", type=int, default=128)
    p.add_argument("--haystack", choices=corpus.HAYSTACKS, default="filler")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--keep-first-pages", type=int, default=SparsityConfig().keep_first_pages,
                   help="LServe knob for every LServe setting (pages kept as attention sink)")
    p.add_argument("--impl", type=normalize_impl, choices=IMPLS, default=None)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quant", type=parse_quant, default=[("auto", "auto")],
                   help="KV-cache:weight dtype pairs to run every setting with, e.g. "
                   "auto:auto,int8:auto,int4:auto,int8:int8 (KV auto/int8/int4, weights "
                   "auto/int8)")
    p.add_argument("--skip-passkey", action="store_true",
                   help="skip the passkey grid (an earlier run's passkey.json in --out is kept)")
    p.add_argument("--skip-forced", action="store_true",
                   help="skip teacher forcing (an earlier run's agreement.json is kept)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    log.setLevel(logging.INFO)
    from lserve_jax.checkpoint import load_text_model
    from lserve_jax.llm import default_impl

    try:
        path, config, params, tokenizer = load_text_model(args.ckpt, dtype=args.dtype,
                                                          purpose="the evaluation")
        pattern = args.pattern or head_pattern.default_pattern(args.ckpt)
        if pattern is None:
            raise ValueError("no shipped head pattern for this checkpoint: pass --pattern")
        context = config.max_position_embeddings
        lengths = sorted({min(n, context - args.new_tokens) for n in args.lengths})
        ppl_lengths = sorted({min(n, context - 1) for n in args.ppl_lengths})
        if args.ppl_tokens < 1 or min(ppl_lengths, default=args.ppl_tokens + 1) <= args.ppl_tokens:
            raise ValueError("--ppl-tokens must be >= 1 and below every --ppl-lengths")
        if any(not 0.0 <= d <= 1.0 for d in args.depths) or not args.depths:
            raise ValueError(f"--depths {args.depths} must be in [0, 1]")
        if args.new_tokens < 2:
            raise ValueError("--new-tokens must be >= 2")
        for n in lengths:  # raises for a length too short to hold a passkey prompt
            corpus.passkey_prompt(tokenizer, length=n, depth=0.0, passkey="12345",
                                  haystack=args.haystack)
        base = SparsityConfig(page_size=args.page_size, keep_first_pages=args.keep_first_pages)
        settings = build_settings(
            config, pattern=pattern, baseline=args.baseline, budgets=args.budgets,
            sparsities=args.sparsities, windows=args.windows, main_budget=args.main_budget,
            main_sparsity=args.main_sparsity, impl=args.impl or default_impl(), sparsity=base)
        settings = with_quantization(settings, args.quant)
        kv_scales = None
        if any(kv != "auto" for kv, _ in args.quant):
            from lserve_jax import kv_quant

            kv_scales = kv_quant.load_or_calibrate(path, params, config, tokenizer)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    max_tokens = max(lengths + [n + 1 for n in ppl_lengths]) + args.new_tokens
    runner = Runner(config, params, max_tokens=max_tokens, kv_scales=kv_scales)
    meta = {"checkpoint": str(path), "pattern": str(pattern), "baseline": args.baseline,
            "settings": [s.row() | {"name": s.name} for s in settings],
            "haystack": args.haystack, "backend": jax.default_backend(),
            "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
            "dtype": args.dtype, "page_size": args.page_size,
            "keep_first_pages": args.keep_first_pages, "quant": args.quant,
            "commit": git_commit()}
    say = log.info
    t0 = time.perf_counter()
    passkey, forced = _previous(out / "passkey.json"), _previous(out / "agreement.json")
    if not args.skip_passkey:
        passkey = passkey_grid(runner, tokenizer, settings, lengths=lengths, depths=args.depths,
                               new_tokens=args.new_tokens, haystack=args.haystack,
                               seed=args.seed, progress=say)
        (out / "passkey.json").write_text(json.dumps(dict(meta, records=passkey), indent=1))
        plot_passkey(passkey, out / "passkey.png")
    if not args.skip_forced:
        forced = teacher_forced(runner, tokenizer, settings, lengths=ppl_lengths,
                                num_tokens=args.ppl_tokens, progress=say)
        (out / "agreement.json").write_text(json.dumps(dict(meta, records=forced), indent=1))
    summary = summarize(passkey, forced)
    plot_agreement(summary, out / "agreement.png")
    meta["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(dict(meta, summary=summary), indent=1))
    for row in summary:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
