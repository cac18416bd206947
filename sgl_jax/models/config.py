"""ModelConfig: the one frozen description of a decoder-only transformer that sgl_jax can run.

Every supported family (Llama 2/3/3.1, SmolLM/SmolLM2, Mistral, Qwen2/2.5, Qwen3) is the same
pre-norm decoder with rotary embeddings, GQA and a SwiGLU MLP; the differences are flags here:
`qkv_bias` (Qwen2), `qk_norm` (Qwen3), `rope_scaling` (Llama 3.1), `sliding_window` (Mistral v0.1),
`tie_word_embeddings` (SmolLM2, small Qwens). Constructors read the two formats we load:
`from_hf()` takes a `config.json` dict, `from_gguf()` takes GGUF metadata fields. This module does not
import jax, so host code (scheduler, server config) can read a model's shape cheaply.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

# The `model_type` values (HF) / `general.architecture` values (GGUF) we run, mapped to our family name.
_HF_FAMILIES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
}
_GGUF_FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


class UnsupportedModelError(ValueError):
    """The checkpoint describes an architecture or feature sgl_jax does not run."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary-frequency rescaling. `kind` is "llama3" (Llama 3.1 wavelength-banded) or "linear"."""

    kind: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of one decoder-only model. Derived sizes are properties."""

    family: str  # "llama" | "qwen2" | "qwen3"
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
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    name: str = ""

    def __post_init__(self):
        if self.family not in ("llama", "qwen2", "qwen3"):
            raise UnsupportedModelError(f"unknown model family {self.family!r}; expected llama, qwen2 or qwen3")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def num_params(self) -> int:
        h, f, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.qkv_bias:
            attn += d * (self.num_heads + 2 * self.num_kv_heads)
        if self.qk_norm:
            attn += 2 * d
        layer = attn + 3 * h * f + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + emb + h

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def flops_per_token(self) -> int:
        """Matmul FLOPs of one token's forward pass, attention over the context excluded."""
        return 2 * (self.num_params - self.vocab_size * self.hidden_size * (0 if self.tie_word_embeddings else 1))

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], name: str = "") -> "ModelConfig":
        """From a Hugging Face `config.json` dict."""
        mtype = cfg.get("model_type")
        if mtype not in _HF_FAMILIES:
            raise UnsupportedModelError(
                f"model_type {mtype!r} is not supported; supported: {sorted(_HF_FAMILIES)}")
        family = _HF_FAMILIES[mtype]
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedModelError(f"hidden_act {act!r} is not supported; expected silu")
        sliding = cfg.get("sliding_window") if cfg.get("use_sliding_window", mtype == "mistral") else None
        return cls(
            family=family,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
            rope_scaling=_rope_scaling_from_hf(cfg),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(cfg.get("attention_bias", family == "qwen2")),
            qk_norm=family == "qwen3",
            sliding_window=int(sliding) if sliding else None,
            name=name or str(cfg.get("_name_or_path", "")),
        )

    @classmethod
    def from_gguf(cls, meta: Mapping[str, Any], has_output_weight: bool, name: str = "") -> "ModelConfig":
        """From GGUF metadata (a dict of field name -> python value)."""
        arch = meta.get("general.architecture")
        if arch not in _GGUF_FAMILIES:
            raise UnsupportedModelError(
                f"GGUF architecture {arch!r} is not supported; supported: {sorted(_GGUF_FAMILIES)}")
        family = _GGUF_FAMILIES[arch]

        def get(key, default=None):
            full = f"{arch}.{key}"
            if full in meta:
                return meta[full]
            if default is None:
                raise UnsupportedModelError(f"GGUF metadata is missing {full!r}")
            return default

        hidden = int(get("embedding_length"))
        heads = int(get("attention.head_count"))
        head_dim = int(get("attention.key_length", hidden // heads))
        vocab = int(meta.get(f"{arch}.vocab_size") or meta.get("tokenizer.ggml.tokens.count")
                    or len(meta["tokenizer.ggml.tokens"]))
        scaling = None
        stype = meta.get(f"{arch}.rope.scaling.type")
        if stype == "linear":
            scaling = RopeScaling("linear", factor=float(get("rope.scaling.factor")))
        elif stype not in (None, "none"):
            raise UnsupportedModelError(f"GGUF rope scaling type {stype!r} is not supported")
        sliding = meta.get(f"{arch}.attention.sliding_window")
        return cls(
            family=family,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=heads,
            num_kv_heads=int(get("attention.head_count_kv", heads)),
            head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=int(get("context_length", 4096)),
            tie_word_embeddings=not has_output_weight,
            qkv_bias=family == "qwen2",
            qk_norm=family == "qwen3",
            sliding_window=int(sliding) if sliding else None,
            name=name or str(meta.get("general.name", "")),
        )


def _rope_scaling_from_hf(cfg: Mapping[str, Any]) -> RopeScaling | None:
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not rs:
        return None
    kind = rs.get("rope_type") or rs.get("type")
    if kind in (None, "default"):
        return None
    if kind == "llama3":
        return RopeScaling(
            "llama3",
            factor=float(rs["factor"]),
            low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 8192)),
        )
    if kind == "linear":
        return RopeScaling("linear", factor=float(rs["factor"]))
    raise UnsupportedModelError(f"rope scaling type {kind!r} is not supported; supported: llama3, linear")


def rope_inv_freq(cfg: ModelConfig) -> list[float]:
    """Per-pair inverse frequencies (head_dim/2 floats), with the config's scaling applied."""
    d = cfg.head_dim
    inv = [1.0 / (cfg.rope_theta ** (2 * i / d)) for i in range(d // 2)]
    rs = cfg.rope_scaling
    if rs is None:
        return inv
    if rs.kind == "linear":
        return [f / rs.factor for f in inv]
    # llama3: long wavelengths are slowed by `factor`, short ones kept, a smooth ramp in between.
    low_wl = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wl = rs.original_max_position_embeddings / rs.high_freq_factor
    out = []
    for f in inv:
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(f)
        elif wl > low_wl:
            out.append(f / rs.factor)
        else:
            smooth = (rs.original_max_position_embeddings / wl - rs.low_freq_factor) / (
                rs.high_freq_factor - rs.low_freq_factor)
            out.append((1 - smooth) * f / rs.factor + smooth * f)
    return out


# Full-size configs of real models, for shape checks with jax.eval_shape (nothing is allocated).
PRESETS: dict[str, ModelConfig] = {
    "llama-3-8b": ModelConfig("llama", 128256, 4096, 14336, 32, 32, 8, 128, 1e-5, 500000.0,
                              RopeScaling("llama3", 8.0, 1.0, 4.0, 8192), 131072, name="llama-3-8b"),
    "qwen2.5-7b": ModelConfig("qwen2", 152064, 3584, 18944, 28, 28, 4, 128, 1e-6, 1000000.0, None, 32768,
                              qkv_bias=True, name="qwen2.5-7b"),
    "qwen3-8b": ModelConfig("qwen3", 151936, 4096, 12288, 36, 32, 8, 128, 1e-6, 1000000.0, None, 40960,
                            qk_norm=True, name="qwen3-8b"),
    "smollm2-135m": ModelConfig("llama", 49152, 576, 1536, 30, 9, 3, 64, 1e-5, 100000.0, None, 8192,
                                tie_word_embeddings=True, name="smollm2-135m"),
}
