"""Read a Hugging Face Llama checkpoint directory: `config.json` + safetensors shard(s), no torch.

Tensors are read with `safetensors.safe_open(framework="np")`; importing `ml_dtypes` (a JAX
dependency) teaches NumPy the `bfloat16` dtype name that bf16 checkpoints need.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16" dtype name for safetensors)
import numpy as np
from safetensors import SafetensorError, safe_open

from convert.mapping import ConversionError, Rule, transpose
from convert.source import Source
from models.config import LlamaConfig

_ATTN = "model.layers.{i}.self_attn"
_MLP = "model.layers.{i}.mlp"

# HF name -> our parameter path (models/params.py), with the transform from torch's `[out, in]`.
HF_TABLE: tuple[Rule, ...] = (
    Rule("model.embed_tokens.weight", "embed"),
    Rule("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm"),
    Rule(f"{_ATTN}.q_proj.weight", "layers.{i}.wq", transpose),
    Rule(f"{_ATTN}.k_proj.weight", "layers.{i}.wk", transpose),
    Rule(f"{_ATTN}.v_proj.weight", "layers.{i}.wv", transpose),
    Rule(f"{_ATTN}.o_proj.weight", "layers.{i}.wo", transpose),
    Rule("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.mlp_norm"),
    Rule(f"{_MLP}.gate_proj.weight", "layers.{i}.w_gate", transpose),
    Rule(f"{_MLP}.up_proj.weight", "layers.{i}.w_up", transpose),
    Rule(f"{_MLP}.down_proj.weight", "layers.{i}.w_down", transpose),
    Rule("model.norm.weight", "final_norm"),
    Rule("lm_head.weight", "lm_head", transpose),
    Rule(f"{_ATTN}.rotary_emb.inv_freq", None, mode="ignore",
         why="RoPE frequencies are recomputed from the config"),
)

# With tied embeddings the model has no lm_head: a saved copy must equal the embedding ([V, H]).
_TIED_LM_HEAD = Rule("lm_head.weight", "embed", mode="equal", why="tied to the embedding")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")


def hf_table(config: LlamaConfig) -> tuple[Rule, ...]:
    if not config.tie_word_embeddings:
        return HF_TABLE
    return tuple(_TIED_LM_HEAD if r.source == "lm_head.weight" else r for r in HF_TABLE)


def _shard_files(src: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of the checkpoint (those of the index if there is one, else all),
    and the index's weight map (tensor name -> file name) or None."""
    index = src / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ConversionError(f"{index}: not a valid safetensors index ({e})") from None
        files = [src / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.exists():
                raise ConversionError(f"{index} lists {f.name!r}, which does not exist")
        return files, weight_map
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{src} holds no *.safetensors file")
    return files, None


def _tensor_index(files: list[Path]) -> dict[str, Path]:
    """Tensor name -> file. Opening each file validates its header against its size, so a
    truncated shard fails here, before anything is written."""
    where: dict[str, Path] = {}
    for f in files:
        try:
            with safe_open(f, framework="np") as h:
                names = list(h.keys())
        except (SafetensorError, OSError) as e:
            raise ConversionError(f"cannot read safetensors file {f} (truncated or corrupt?): {e}")
        for name in names:
            if name in where:
                raise ConversionError(f"tensor {name!r} is in both {where[name].name} and {f.name}")
            where[name] = f
    return where


def read_hf(src: Path) -> Source:
    """Open an HF checkpoint directory lazily: config now, tensors on demand."""
    config_file = src / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{src} has no config.json; not a Hugging Face checkpoint directory")
    try:
        hf_config = json.loads(config_file.read_text())
        config = LlamaConfig.from_hf_dict(hf_config)
    except ValueError as e:
        raise ConversionError(f"{config_file}: {e}") from None
    files, weight_map = _shard_files(src)
    where = _tensor_index(files)
    for name, fname in (weight_map or {}).items():
        if name not in where or where[name].name != fname:
            raise ConversionError(f"the safetensors index puts tensor {name!r} in {fname!r}, "
                                  f"but it is not there")

    def load(name: str) -> np.ndarray:
        try:
            with safe_open(where[name], framework="np") as h:
                return h.get_tensor(name)
        except (SafetensorError, OSError, TypeError) as e:
            raise ConversionError(f"cannot read tensor {name!r} from {where[name]}: {e}") from None

    def write_tokenizer(out: Path) -> list[str]:
        copied = []
        for fname in TOKENIZER_FILES:
            if (src / fname).is_file():
                shutil.copy2(src / fname, out / fname)
                copied.append(fname)
        return copied

    return Source(kind="hf", path=src, config=config, table=hf_table(config),
                  tensor_names=sorted(where), load=load, write_tokenizer=write_tokenizer,
                  info={"num_files": len(set(where.values()))})
