"""Tiny random-weight checkpoints in the standard Hugging Face format, for tests and reference scripts.

numpy + json only (no torch, no jax), deterministic from a seed, so the test suite and the
reference generator (tools/make_model_reference.py, which runs Hugging Face transformers) build
byte-identical checkpoints independently.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np

_BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=256,
             hidden_act="silu", bos_token_id=1, eos_token_id=2, torch_dtype="float32")

# name -> config.json for one tiny model per family/feature we support.
TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(_BASE, model_type="llama", architectures=["LlamaForCausalLM"], rope_theta=10000.0,
                  tie_word_embeddings=False, attention_bias=False, mlp_bias=False),
    "llama3-tied-mqa": dict(_BASE, model_type="llama", architectures=["LlamaForCausalLM"], rope_theta=500000.0,
                            num_key_value_heads=1, tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
                            rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                              high_freq_factor=4.0, original_max_position_embeddings=64)),
    "mistral-swa": dict(_BASE, model_type="mistral", architectures=["MistralForCausalLM"], rope_theta=10000.0,
                        sliding_window=8, tie_word_embeddings=False, head_dim=16),
    "qwen2": dict(_BASE, model_type="qwen2", architectures=["Qwen2ForCausalLM"], rope_theta=1000000.0,
                  tie_word_embeddings=True, use_sliding_window=False, sliding_window=None),
    "qwen3": dict(_BASE, model_type="qwen3", architectures=["Qwen3ForCausalLM"], rope_theta=1000000.0,
                  head_dim=32, tie_word_embeddings=False, attention_bias=False, use_sliding_window=False,
                  sliding_window=None),
}


def tiny_state_dict(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights with Hugging Face names and [out, in] Linear layout."""
    rng = np.random.default_rng(seed)
    V, E, F, L = cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    H, K = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = cfg.get("head_dim") or E // H

    def w(*shape, scale=0.08):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    sd = {"model.embed_tokens.weight": w(V, E, scale=0.5), "model.norm.weight": norm(E)}
    for i in range(L):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = norm(E)
        sd[p + "post_attention_layernorm.weight"] = norm(E)
        sd[p + "self_attn.q_proj.weight"] = w(H * D, E)
        sd[p + "self_attn.k_proj.weight"] = w(K * D, E)
        sd[p + "self_attn.v_proj.weight"] = w(K * D, E)
        sd[p + "self_attn.o_proj.weight"] = w(E, H * D)
        if cfg["model_type"] == "qwen2":
            sd[p + "self_attn.q_proj.bias"] = w(H * D, scale=0.2)
            sd[p + "self_attn.k_proj.bias"] = w(K * D, scale=0.2)
            sd[p + "self_attn.v_proj.bias"] = w(K * D, scale=0.2)
        if cfg["model_type"] == "qwen3":
            sd[p + "self_attn.q_norm.weight"] = norm(D)
            sd[p + "self_attn.k_norm.weight"] = norm(D)
        sd[p + "mlp.gate_proj.weight"] = w(F, E)
        sd[p + "mlp.up_proj.weight"] = w(F, E)
        sd[p + "mlp.down_proj.weight"] = w(E, F)
    if not cfg.get("tie_word_embeddings", False):
        sd["lm_head.weight"] = w(V, E, scale=0.2)
    return sd


def save_safetensors(tensors: dict[str, np.ndarray], path: str) -> None:
    """Write float32 tensors in the safetensors format (8-byte header size, JSON header, raw data)."""
    header, offset, blobs = {}, 0, []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name], dtype=np.float32)
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        blobs.append(arr.tobytes())
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for b in blobs:
            f.write(b)


def write_tiny_checkpoint(name: str, directory: str, seed: int = 0, shards: int = 1, **overrides) -> str:
    """Write config.json + safetensors (optionally sharded with an index) for TINY_CONFIGS[name]."""
    cfg = dict(TINY_CONFIGS[name], **overrides)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    sd = tiny_state_dict(cfg, seed)
    if shards == 1:
        save_safetensors(sd, os.path.join(directory, "model.safetensors"))
    else:
        names = sorted(sd)
        weight_map = {}
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: sd[n] for n in names[s::shards]}
            save_safetensors(part, os.path.join(directory, fname))
            weight_map.update({n: fname for n in part})
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return directory


def tiny_prompts(vocab_size: int, seed: int = 1) -> list[list[int]]:
    """Token-id prompts of several lengths (1, 5, 17, 40) used by the reference logits."""
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab_size, n).tolist() for n in (1, 5, 17, 40)]


def _permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter layout for llama q/k rows (the inverse of loader.unpermute_qk)."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def gguf_tensor_name(hf: str) -> str:
    """The GGUF tensor name llama.cpp's converter gives a Hugging Face tensor name (the loader's inverse)."""
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    rest = hf.split(".", 3)[3]  # e.g. self_attn.q_proj.weight
    mod, kind = rest.rsplit(".", 1)
    return f"blk.{hf.split('.')[2]}.{_HF_TO_GGUF[mod]}.{kind}"


TINY_TOKENIZER_VOCAB = 300  # tokens of the tiny byte-level tokenizer every tiny GGUF carries


def write_tiny_gguf(name: str, path: str, seed: int = 0, vocab_size: int = TINY_TOKENIZER_VOCAB, quant: str = "F32",
                    num_layers: int | None = None, padding_scale: float = 1.0) -> str:
    """A tiny random model of family `name` as GGUF, with the tiny byte-level tokenizer's metadata.

    Written the way llama.cpp's converter writes real checkpoints: [out, in] rows, llama q/k rows
    permuted, `quant` in {"F32", "F16", "Q8_0", "Q4_1"} for the 2-D weights. Returns `path`.
    `vocab_size` above the tokenizer's 300 tokens gives the embedding padding rows (as Qwen2/Qwen3 pad to a
    multiple of 128); `padding_scale` multiplies their output rows (lm_head, or the tied embedding).
    """
    import gguf

    from sgl_jax.models.tokenizer import tiny_byte_tokenizer_metadata

    cfg = dict(TINY_CONFIGS[name], vocab_size=vocab_size)
    if num_layers is not None:
        cfg["num_hidden_layers"] = num_layers
    arch = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}[cfg["model_type"]]
    sd = tiny_state_dict(cfg, seed)
    if padding_scale != 1.0 and vocab_size > TINY_TOKENIZER_VOCAB:
        out = "lm_head.weight" if "lm_head.weight" in sd else "model.embed_tokens.weight"
        sd[out][TINY_TOKENIZER_VOCAB:] *= np.float32(padding_scale)
    H, K, E = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    D = cfg.get("head_dim") or E // H
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(E)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(H)
    w.add_head_count_kv(K)
    w.add_key_length(D)
    w.add_value_length(D)
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(vocab_size)
    meta = tiny_byte_tokenizer_metadata()
    w.add_tokenizer_model(meta["tokenizer.ggml.model"])
    w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_token_merges(meta["tokenizer.ggml.merges"])
    w.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
    w.add_pad_token_id(meta["tokenizer.ggml.padding_token_id"])
    w.add_add_bos_token(False)
    w.add_chat_template(meta["tokenizer.chat_template"])
    qtype = getattr(gguf.GGMLQuantizationType, quant)
    for hf, arr in sd.items():
        g = gguf_tensor_name(hf)
        if arch == "llama" and hf.endswith(("q_proj.weight", "q_proj.bias")):
            arr = _permute_qk(arr, H)
        elif arch == "llama" and hf.endswith(("k_proj.weight", "k_proj.bias")):
            arr = _permute_qk(arr, K)
        if arr.ndim == 2 and quant != "F32":
            data = gguf.quants.quantize(arr, qtype)
            w.add_tensor(g, data, raw_shape=data.shape, raw_dtype=qtype)
        else:
            w.add_tensor(g, np.ascontiguousarray(arr, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_tiny_padded_gguf(name: str, path: str, seed: int = 0, multiple: int = 128, padding_scale: float = 10.0,
                           **kw) -> str:
    """A tiny GGUF whose model vocabulary (embedding rows) exceeds its tokenizer's: the 300 tokens padded to
    the next multiple of `multiple` (384), as Qwen2/Qwen3 checkpoints pad theirs.

    The padding ids' output rows are scaled by `padding_scale` so that, unmasked, they would win the argmax
    (and nearly all the probability mass) for practically every input: a runtime that samples them shows.
    """
    padded = -(-TINY_TOKENIZER_VOCAB // multiple) * multiple
    if padded == TINY_TOKENIZER_VOCAB:
        padded += multiple
    return write_tiny_gguf(name, path, seed, vocab_size=padded, padding_scale=padding_scale, **kw)
