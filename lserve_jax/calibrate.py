"""Find streaming heads: `python -m lserve_jax.calibrate --ckpt PATH --out DIR/full_attention_heads.tsv`.

Two methods write DuoAttention's `full_attention_heads.tsv` (one row per layer, one gate per KV
head, read by `lserve_jax.head_pattern`) plus `settings.json` beside it:

* `duo` (default), DuoAttention's optimization (arXiv 2410.10819): the model is frozen and each
  (layer, KV head) gets a gate α, initialised to 1. The attention output of the head's query
  group is α·full + (1 − α)·streaming (sink + recent tokens). The gates minimise the MSE between
  the final hidden states of the all-full model and of the gated model on the answer span of
  synthetic multi-passkey prompts, plus `l1`·mean(|α|), with AdamW, clamped to [0, 1] after
  each step. The loss curve is saved as `loss.png`.
* `profile`, a cheap baseline: one forward with full attention over book text; a head's gate is
  the share of its attention mass (mean over its query heads and the query positions that have
  tokens outside the window) that falls outside the sink + recent window.

Everything runs through the plain-jnp attention below (differentiable, and small enough at
calibration lengths), on whatever device JAX has.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lserve_jax import corpus, head_pattern
from models import llama, weight_quant
from models.config import LlamaConfig

METHODS = ("duo", "profile")
log = logging.getLogger("lserve_jax")


def attention_masks(t: int, sink: int, recent: int) -> tuple[jax.Array, jax.Array]:
    """Causal mask and streaming (Λ) mask [T, T]: key s visible to query t in the Λ mask when
    s < sink or t − s < recent (the recent window includes the query itself)."""
    pos = jnp.arange(t)
    causal = pos[None, :] <= pos[:, None]
    streaming = causal & ((pos[None, :] < sink) | (pos[:, None] - pos[None, :] < recent))
    return causal, streaming


def _scores(q, k):
    """q [B, T, Hq, D], k [B, T, Hkv, D] -> f32 scores [B, Hkv, G, T, S]."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, hq // hkv, d).astype(jnp.float32)
    return jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(jnp.float32)) * (d ** -0.5)


def _attend(probs, v, out_dtype):
    """probs [B, Hkv, G, T, S], v [B, S, Hkv, D] -> [B, T, Hq, D]."""
    b, hkv, g, t, _ = probs.shape
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(jnp.float32))
    return out.reshape(b, t, hkv * g, -1).astype(out_dtype)


def gated_attention(q, k, v, gate, *, sink: int, recent: int) -> jax.Array:
    """DuoAttention's mixed attention for one layer.

    q [B, T, Hq, D]; k, v [B, T, Hkv, D]; gate [Hkv] -> [B, T, Hq, D]. Each KV head's query
    group gets gate·full + (1 − gate)·streaming, both causal softmax attentions.
    """
    s = _scores(q, k)
    causal, streaming = attention_masks(q.shape[1], sink, recent)
    full = jax.nn.softmax(jnp.where(causal, s, -jnp.inf), axis=-1)
    stream = jax.nn.softmax(jnp.where(streaming, s, -jnp.inf), axis=-1)
    g = gate.astype(jnp.float32)[None, :, None, None, None]
    return _attend(g * full + (1.0 - g) * stream, v, q.dtype)


def gated_hidden_states(params, tokens, gates, *, config: LlamaConfig, sink: int, recent: int,
                        remat: bool = True) -> jax.Array:
    """Final hidden states [B, T, E] with every layer's attention gated by gates [L, Hkv]."""
    def attend(i, q, k, v):
        return gated_attention(q, k, v, gates[i], sink=sink, recent=recent)

    return llama.hidden_states(params, tokens, config=config, attend=attend, remat=remat)


def distillation_loss(gates, params, tokens, answer_mask, target, *, config, sink, recent,
                      l1: float, remat: bool = False):
    """MSE on the answer span between the gated model's and the teacher's final hidden states,
    plus l1·mean(|gates|). Returns (loss, mse)."""
    hidden = gated_hidden_states(params, tokens, gates, config=config, sink=sink, recent=recent,
                                 remat=remat)
    err = jnp.square(hidden.astype(jnp.float32) - target.astype(jnp.float32)).mean(-1)
    mask = answer_mask.astype(jnp.float32)
    mse = (err * mask).sum() / jnp.maximum(mask.sum(), 1.0)
    return mse + l1 * jnp.abs(gates).mean(), mse


def optimize_gates(params, config: LlamaConfig, samples, *, steps: int, lr: float = 0.02,
                   l1: float = 0.05, sink: int = 128, recent: int = 256, remat: bool = False,
                   progress: bool = True):
    """Train gates [L, Hkv] on `samples` (cycled, one per step). Returns (gates, history) with
    history a list of {"step", "loss", "mse", "mean_gate"} per step. `params` must be float
    (DuoAttention distils the float model's own outputs; ValueError for int8 weights)."""
    import optax
    from tqdm import tqdm

    weight_quant.require_float(params, "head-pattern calibration")
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    if not samples:
        raise ValueError("no calibration samples")
    static = dict(config=config, sink=sink, recent=recent)
    teacher = jax.jit(lambda p, t: gated_hidden_states(
        p, t, jnp.ones((config.num_layers, config.num_kv_heads), jnp.float32), remat=False,
        **static))
    targets = [teacher(params, jnp.asarray(s.ids)[None]) for s in samples]
    opt = optax.adamw(lr, weight_decay=0.0)  # the L1 term is the only regulariser

    @jax.jit
    def step(gates, opt_state, tokens, mask, target):
        (loss, mse), grad = jax.value_and_grad(distillation_loss, has_aux=True)(
            gates, params, tokens, mask, target, l1=l1, remat=remat, **static)
        updates, opt_state = opt.update(grad, opt_state, gates)
        gates = jnp.clip(optax.apply_updates(gates, updates), 0.0, 1.0)
        return gates, opt_state, loss, mse

    gates = jnp.ones((config.num_layers, config.num_kv_heads), jnp.float32)
    opt_state = opt.init(gates)
    history = []
    bar = tqdm(range(steps), desc="calibrating", disable=not progress, unit="step")
    for i in bar:
        s = samples[i % len(samples)]
        gates, opt_state, loss, mse = step(gates, opt_state, jnp.asarray(s.ids)[None],
                                           jnp.asarray(s.answer_mask)[None], targets[i % len(samples)])
        record = {"step": i + 1, "loss": float(loss), "mse": float(mse),
                  "mean_gate": float(gates.mean()), "length": int(len(s.ids))}
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", gate=f"{record['mean_gate']:.3f}")
    return np.asarray(gates, np.float64), history


def _full_probs(q, k) -> jax.Array:
    """Causal softmax attention weights [B, Hkv, G, T, S] in f32."""
    causal, _ = attention_masks(q.shape[1], 0, 1)
    return jax.nn.softmax(jnp.where(causal, _scores(q, k), -jnp.inf), axis=-1)


def _outside_mass(probs, *, sink: int, recent: int) -> jax.Array:
    """Full-attention weights [B, Hkv, G, T, S] -> [Hkv] mean mass outside sink + recent."""
    _, streaming = attention_masks(probs.shape[3], sink, recent)
    mass = jnp.where(streaming, 0.0, probs).sum(-1)  # [B, Hkv, G, T]
    return mass[..., sink + recent:].mean((0, 2, 3))


def outside_mass(q, k, *, sink: int, recent: int) -> jax.Array:
    """Per KV head [Hkv]: the mean full-attention mass outside the sink + recent window.

    q [B, T, Hq, D], k [B, T, Hkv, D]. Mean over the batch, the head's query group and the query
    positions t ≥ sink + recent (earlier ones see nothing outside the window).
    """
    return _outside_mass(_full_probs(q, k), sink=sink, recent=recent)


def profile_gates(params, config: LlamaConfig, token_rows, *, sink: int = 128,
                  recent: int = 256) -> np.ndarray:
    """The profiling baseline: gates [L, Hkv] = each head's `outside_mass` on rows of real text
    token_rows [N, T], averaged over the rows (one forward each, full attention); float
    `params` only, as `optimize_gates`."""
    weight_quant.require_float(params, "head-pattern profiling")
    token_rows = jnp.asarray(token_rows, jnp.int32)
    if token_rows.shape[1] <= sink + recent:
        raise ValueError(f"profiling needs rows longer than sink + recent = {sink + recent}")

    @jax.jit
    def run(tokens):
        masses = []

        def attend(i, q, k, v):
            probs = _full_probs(q, k)  # once, for both the statistic and the layer's output
            masses.append(_outside_mass(probs, sink=sink, recent=recent))
            return _attend(probs, v, q.dtype)

        llama.hidden_states(params, tokens, config=config, attend=attend)
        return jnp.stack(masses)  # [L, Hkv]

    total = sum(np.asarray(run(row[None]), np.float64) for row in token_rows)
    return total / token_rows.shape[0]


def plot_losses(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [h["mse"] for h in history], label="distillation MSE (answer span)")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE")
    ax.set_yscale("log")
    ax2 = ax.twinx()
    ax2.plot(steps, [h["mean_gate"] for h in history], color="tab:orange", label="mean gate")
    ax2.set_ylabel("mean gate")
    ax2.set_ylim(0, 1.05)
    fig.legend(loc="center right", bbox_to_anchor=(0.86, 0.5), fontsize=8)
    ax.set_title("DuoAttention gate calibration")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    gpu = jax.default_backend() == "gpu"
    p = argparse.ArgumentParser(prog="python -m lserve_jax.calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="checkpoint (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help="output path of full_attention_heads.tsv")
    p.add_argument("--method", choices=METHODS, default="duo")
    p.add_argument("--lengths", default="1024,2048,4096" if gpu else "1024",
                   help="comma-separated sample lengths in tokens (default: 1024 on CPU)")
    p.add_argument("--steps", type=int, default=1000 if gpu else 64)
    p.add_argument("--num-samples", type=int, default=16,
                   help="distinct synthetic samples per length, cycled through the steps")
    p.add_argument("--num-passkeys", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.02 if gpu else 0.05,
                   help="AdamW learning rate (default 0.02, DuoAttention's; 0.05 for CPU's "
                        "fewer steps)")
    p.add_argument("--l1", type=float, default=0.05)
    p.add_argument("--sink", type=int, default=128, help="streaming heads' sink tokens")
    p.add_argument("--recent", type=int, default=256, help="streaming heads' recent tokens")
    p.add_argument("--profile-rows", type=int, default=4,
                   help="profile: book windows of the first length")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--remat", action="store_true",
                   help="recompute layers in the backward pass (less memory, ~1/3 more time)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    log.setLevel(logging.INFO)
    try:
        lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
        if not lengths or min(lengths) <= args.sink + args.recent:
            raise ValueError(f"--lengths must all exceed sink + recent = {args.sink + args.recent}")
        if args.steps < 1 or args.num_samples < 1:
            raise ValueError("--steps and --num-samples must be >= 1")
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        from lserve_jax.checkpoint import load_text_model

        path, config, params, tokenizer = load_text_model(args.ckpt, dtype=args.dtype,
                                                          purpose="calibration")
        if max(lengths) > config.max_position_embeddings:
            raise ValueError(f"--lengths exceed the model's context {config.max_position_embeddings}")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    settings = {"method": args.method, "checkpoint": str(path), "sink": args.sink,
                "recent": args.recent, "lengths": lengths, "dtype": args.dtype,
                "seed": args.seed, "backend": jax.default_backend(),
                "device": str(jax.devices()[0].device_kind), "jax": jax.__version__}
    if args.method == "duo":
        samples = [corpus.multi_passkey_sample(tokenizer, rng, length=n,
                                               num_passkeys=args.num_passkeys)
                   for _ in range(args.num_samples) for n in lengths]
        gates, history = optimize_gates(params, config, samples, steps=args.steps, lr=args.lr,
                                        l1=args.l1, sink=args.sink, recent=args.recent,
                                        remat=args.remat, progress=not args.no_progress)
        plot_losses(history, out.with_name("loss.png"))
        settings.update(steps=args.steps, num_samples=args.num_samples,
                        num_passkeys=args.num_passkeys, lr=args.lr, l1=args.l1,
                        remat=args.remat, optimizer="adamw(weight_decay=0)", books=list(corpus.CALIBRATION_BOOKS),
                        final_mse=history[-1]["mse"], history=history)
    else:
        n = lengths[0]
        ids = np.concatenate([corpus.book_ids(tokenizer, b) for b in corpus.CALIBRATION_BOOKS])
        starts = np.linspace(0, len(ids) - n, args.profile_rows).astype(int)
        gates = profile_gates(params, config, np.stack([ids[s:s + n] for s in starts]),
                              sink=args.sink, recent=args.recent)
        settings.update(profile_rows=args.profile_rows, books=list(corpus.CALIBRATION_BOOKS))
    settings["seconds"] = round(time.perf_counter() - t0, 1)
    head_pattern.write_head_pattern(out, gates)
    out.with_name("settings.json").write_text(json.dumps(settings, indent=1) + "\n")
    streaming = head_pattern.streaming_heads_from_gates(gates, 0.5)
    log.info("wrote %s in %.0f s; at static_sparsity 0.5: %s", out, settings["seconds"],
             head_pattern.describe(streaming))
    return 0


if __name__ == "__main__":
    sys.exit(main())
