"""Llama model configuration: a frozen dataclass read from HF `config.json` or our own JSON."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

ROPE_SCALING_TYPES = ("llama3", "linear")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """RoPE frequency scaling (HF `rope_scaling` / `rope_parameters`).

    `rope_type="linear"`: positions divided by `factor`.
    `rope_type="llama3"`: Llama-3.1's wavelength-dependent interpolation.
    """

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ROPE_SCALING_TYPES:
            raise ValueError(
                f"unsupported rope scaling {self.rope_type=}; supported: {ROPE_SCALING_TYPES}"
            )
        if not self.factor > 0:
            raise ValueError(f"rope scaling {self.factor=} must be positive")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(
                f"llama3 rope scaling needs {self.high_freq_factor=} > {self.low_freq_factor=}"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Architecture of a Llama-family decoder (Llama-2/3/3.1, SmolLM2, ...)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive int")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta={self.rope_theta} must be positive")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps={self.rms_norm_eps} must be positive")
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA group)."""
        return self.num_heads // self.num_kv_heads

    # ---- (de)serialisation -------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        """Inverse of `to_dict` (our own config JSON)."""
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> "LlamaConfig":
        """Build from a HF transformers `config.json` dict (transformers 4.x and 5.x)."""
        model_type = hf.get("model_type", "llama")
        if model_type not in ("llama", "mistral"):
            raise ValueError(f"unsupported model_type={model_type!r}; expected a Llama model")
        try:
            hidden = int(hf["hidden_size"])
            num_heads = int(hf["num_attention_heads"])
            config = dict(
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=num_heads,
            )
        except KeyError as e:
            raise ValueError(f"config.json is missing the required key {e.args[0]!r}") from None
        config["num_kv_heads"] = int(hf.get("num_key_value_heads") or num_heads)
        config["head_dim"] = int(hf.get("head_dim") or hidden // num_heads)
        config["rms_norm_eps"] = float(hf.get("rms_norm_eps", 1e-6))
        config["max_position_embeddings"] = int(hf.get("max_position_embeddings", 4096))
        config["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings", False))
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ValueError("Llama checkpoints with attention_bias/mlp_bias are not supported")
        # transformers 5 moved rope_theta and rope_scaling into `rope_parameters`.
        rope = dict(hf.get("rope_parameters") or {})
        if hf.get("rope_scaling"):
            rope.update(hf["rope_scaling"])
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        config["rope_theta"] = float(theta)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in (None, "default"):
            kwargs = dict(rope_type=rope_type, factor=float(rope.get("factor", 1.0)))
            if rope_type == "llama3":
                kwargs.update(
                    low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                    high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                    original_max_position_embeddings=int(
                        rope.get("original_max_position_embeddings", 8192)
                    ),
                )
            config["rope_scaling"] = RopeScaling(**kwargs)
        config["bos_token_id"] = hf.get("bos_token_id")
        eos = hf.get("eos_token_id")
        config["eos_token_ids"] = tuple(eos if isinstance(eos, list) else ([] if eos is None else [eos]))
        return cls(**config)

    @classmethod
    def from_json(cls, path: str | Path) -> "LlamaConfig":
        """Read our own config JSON (written by `convert`) or a HF config.json."""
        with open(path) as f:
            d = json.load(f)
        if d.get("format") == CONFIG_FORMAT:
            d.pop("format")
            return cls.from_dict(d)
        return cls.from_hf_dict(d)

    def save_json(self, path: str | Path) -> None:
        with open(path, "w") as f:
            json.dump({"format": CONFIG_FORMAT, **self.to_dict()}, f, indent=2)


CONFIG_FORMAT = "lserve_jax.llama.v1"


def rope_inv_freq(config: LlamaConfig) -> "list[float]":
    """Per-pair inverse frequencies `[head_dim/2]`, with the config's RoPE scaling applied."""
    half = config.head_dim // 2
    inv = [1.0 / config.rope_theta ** (2 * i / config.head_dim) for i in range(half)]
    s = config.rope_scaling
    if s is None:
        return inv
    if s.rope_type == "linear":
        return [f / s.factor for f in inv]
    # llama3: keep high frequencies, divide low ones by `factor`, blend in between.
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / s.factor)
        else:
            smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor
            )
            out.append((1 - smooth) * f / s.factor + smooth * f)
    return out
