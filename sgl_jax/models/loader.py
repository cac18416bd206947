"""Checkpoint loading: a GGUF file or a Hugging Face directory -> (ModelConfig, params pytree, tokenizer).

Both formats are first mapped to Hugging Face tensor names, then into our pytree (names documented
in `llama.py`), each tensor checked against the shape `jax.eval_shape` derives from the config.
Tensors are converted one at a time (dequantize or read the memory-mapped payload, transpose, cast,
hand to jax, drop the numpy copy), so peak host memory stays near the final parameter bytes plus one
tensor. GGUF payloads are dequantized by our own `gguf_quants`; llama.cpp's Q/K row permutation
(applied by its converter to the `llama` architecture only) is undone so RoPE sees the HF layout.
With `quantization="int8"` each weight matrix `quant.int8_axis` selects is quantized per output channel as
it is converted (int8 kernel + float32 scale, see sgl_jax.models.quant); a GGUF's own quantized blocks are
dequantized first, then requantized. With `quantization="gguf"` a GGUF's Q4_1 linears keep the file's blocks
(leaf `q4_1`, [out, in / 32, 20], rows unpermuted like the dequantized ones) and everything else is as with
"int8" (quant.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from sgl_jax.models import gguf_quants, quant
from sgl_jax.models.config import ModelConfig, UnsupportedModelError
from sgl_jax.models.hub import resolve_model
from sgl_jax.models.llama import param_shapes


class ModelLoadError(ValueError):
    """A checkpoint could not be loaded; the message names the file and the problem."""


@dataclasses.dataclass
class LoadedModel:
    config: ModelConfig
    params: dict
    tokenizer: Any  # sgl_jax.models.tokenizer.Tokenizer
    path: str
    dtype: Any
    quantization: str = "none"

    @property
    def vocab_size(self) -> int:
        """The token ids that mean something: the tokenizer's vocabulary.

        `config.vocab_size` (the embedding rows) may be larger (Qwen2/Qwen3 pad to a multiple of 128); ids
        from `vocab_size` up to it are padding, never sampled and rejected in requests.
        """
        return int(self.tokenizer.vocab_size)


def check_vocab(cfg: ModelConfig, tokenizer, path: str) -> None:
    """The tokenizer's vocabulary must fit the model's embedding (padding rows past it are fine)."""
    n = int(tokenizer.vocab_size)
    if n > cfg.vocab_size:
        raise ModelLoadError(f"{path}: the tokenizer has {n} tokens but the model's embedding has only "
                             f"{cfg.vocab_size} rows (vocab_size); ids {cfg.vocab_size}..{n - 1} would have no "
                             "embedding")


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# KV pools only (sgl_jax.config.KV_DTYPES), with SGLang's names for them
_KV_DTYPES = {**_DTYPES, "float8_e4m3fn": jnp.float8_e4m3fn, "float8_e5m2": jnp.float8_e5m2,
              "fp8_e4m3": jnp.float8_e4m3fn, "fp8_e5m2": jnp.float8_e5m2}


def canonical_dtype(dtype, kv: bool = False) -> Any:
    """The jnp type a dtype name (or dtype) stands for; `kv=True` admits the KV pool's float8 types too."""
    names = _KV_DTYPES if kv else _DTYPES
    if isinstance(dtype, str):
        if dtype not in names:
            raise ValueError(f"{'KV ' if kv else ''}dtype {dtype!r} is unknown; expected one of {sorted(names)}")
        return names[dtype]
    return jnp.dtype(dtype).type


def load_model(model: str, dtype="float32", progress: bool = True, quantization: str = "none",
               placement=None) -> LoadedModel:
    """Load a named model (e.g. "smollm2-135m"), a `.gguf` file or a Hugging Face directory.

    `placement(config) -> place`: where each tensor goes, decided once the model's config is read; `place(path,
    host_array, dtype)` returns the device array (tensor parallel: only each device's shard is copied to it,
    sgl_jax/parallel/tp.py). Default: the default device."""
    from sgl_jax.models.tokenizer import Tokenizer

    path = resolve_model(model)
    if os.path.isdir(path):
        cfg, params = load_weights(path, dtype, progress, quantization, placement)
        tok = Tokenizer.from_hf_dir(path)
    else:  # the file is parsed once, for the weights and the tokenizer
        reader, meta = read_gguf(path)
        cfg, params = _build_from_gguf(path, reader, meta, dtype, progress, quantization, placement)
        tok = Tokenizer.from_gguf({**reader.fields, "__source__": path})
    check_vocab(cfg, tok, path)
    return LoadedModel(cfg, params, tok, path, canonical_dtype(dtype), quantization)


def load_weights(path: str, dtype="float32", progress: bool = True,
                 quantization: str = "none", placement=None) -> tuple[ModelConfig, dict]:
    """(config, params) of a `.gguf` file or a Hugging Face directory, without the tokenizer.

    quantization: "none" (every tensor in `dtype`) or "int8" (weight matrices int8 + per-channel scales)."""
    dtype = canonical_dtype(dtype)
    quant.check_quantization(quantization)
    if os.path.isdir(path):
        cfg, tensors, n = _hf_source(path)
        return cfg, _build_params(cfg, tensors, n, dtype, path, progress, quantization, placement)
    reader, meta = read_gguf(path)
    return _build_from_gguf(path, reader, meta, dtype, progress, quantization, placement)


def _build_from_gguf(path, reader, meta, dtype, progress, quantization, placement=None):
    cfg, tensors, n = _gguf_source(path, reader, meta, keep_q4_1=quantization == "gguf")
    return cfg, _build_params(cfg, tensors, n, dtype, path, progress, quantization, placement)


# ------------------------------------------------------------------------------------------ mapping
_LAYER_MAP = {
    "self_attn.q_proj.weight": ("self_attn", "q_proj", "kernel"),
    "self_attn.k_proj.weight": ("self_attn", "k_proj", "kernel"),
    "self_attn.v_proj.weight": ("self_attn", "v_proj", "kernel"),
    "self_attn.o_proj.weight": ("self_attn", "o_proj", "kernel"),
    "self_attn.q_proj.bias": ("self_attn", "q_proj", "bias"),
    "self_attn.k_proj.bias": ("self_attn", "k_proj", "bias"),
    "self_attn.v_proj.bias": ("self_attn", "v_proj", "bias"),
    "self_attn.q_norm.weight": ("self_attn", "q_norm", "weight"),
    "self_attn.k_norm.weight": ("self_attn", "k_norm", "weight"),
    "input_layernorm.weight": ("input_layernorm", "weight"),
    "post_attention_layernorm.weight": ("post_attention_layernorm", "weight"),
    "mlp.gate_proj.weight": ("mlp", "gate_proj", "kernel"),
    "mlp.up_proj.weight": ("mlp", "up_proj", "kernel"),
    "mlp.down_proj.weight": ("mlp", "down_proj", "kernel"),
}
_TOP_MAP = {
    "model.embed_tokens.weight": ("embed_tokens", "embedding"),
    "model.norm.weight": ("norm", "weight"),
    "lm_head.weight": ("lm_head", "kernel"),
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")


def hf_name_to_path(name: str) -> tuple[str, ...] | None:
    """Our pytree path for a Hugging Face tensor name; None for tensors we do not use."""
    if name in _TOP_MAP:
        return _TOP_MAP[name]
    m = _LAYER_RE.fullmatch(name)
    if m and m.group(2) in _LAYER_MAP:
        return (f"layers_{m.group(1)}",) + _LAYER_MAP[m.group(2)]
    return None


# A tensor source yields (hf_name, thunk returning a float numpy array in HF layout).
TensorSource = Iterator[tuple[str, Callable[[], np.ndarray]]]


def _default_place(path: tuple[str, ...], arr: np.ndarray, dtype=None) -> jax.Array:
    return jnp.asarray(arr, dtype=dtype)


@dataclasses.dataclass
class Q4Blocks:
    """A GGUF Q4_1 Linear weight kept in the file's blocks (quantization "gguf"): `blocks` uint8 [out, in / 32, 20]
    in HF row order; `shape` is the matrix's, [out, in]."""
    blocks: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.blocks.shape[0], self.blocks.shape[1] * gguf_quants.QK


def _leaves(arr, key: tuple[str, ...], cfg: ModelConfig, dtype, quantization: str,
            place=_default_place) -> dict:
    """The pytree leaves of one tensor in HF layout ([out, in] for a Linear): {name: jax array}, each put where
    `place(path, host array, dtype)` says. A Q4Blocks becomes the leaf `q4_1` in place of the kernel."""
    if isinstance(arr, Q4Blocks):
        return {"q4_1": place(key[:-1] + ("q4_1",), np.ascontiguousarray(arr.blocks))}
    axis = quant.int8_axis(key, cfg.tie_word_embeddings) if quantization in ("int8", "gguf") else None
    if axis is not None:
        # HF layout: output channels are rows for Linears and the embedding alike, so reduce over axis 1
        q, scale = quant.quantize_int8(arr, axis=1)
        if key[-1] == "kernel":
            q = q.T  # [out, in] -> [in, out]
        return {key[-1]: place(key, np.ascontiguousarray(q)), "scale": place(key[:-1] + ("scale",), scale)}
    if key[-1] == "kernel":
        arr = arr.T  # HF Linear [out, in] -> [in, out]
    return {key[-1]: place(key, np.ascontiguousarray(arr), dtype)}


def _build_params(cfg: ModelConfig, tensors: TensorSource, count: int, dtype, path: str, progress: bool,
                  quantization: str = "none", placement=None):
    expected = jax.tree_util.tree_flatten_with_path(param_shapes(cfg, dtype))[0]
    expected = {tuple(k.key for k in kp): leaf.shape for kp, leaf in expected}
    params: dict = {}
    seen = set()
    place = _default_place if placement is None else placement(cfg)
    bar = tqdm(total=count, desc=f"loading {Path(path).name}", unit="tensor", disable=not progress,
               leave=False)
    for name, thunk in tensors:
        bar.update(1)
        key = hf_name_to_path(name)
        if key is None:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            raise ModelLoadError(f"{path}: unexpected tensor {name!r} for a {cfg.family} model")
        if key not in expected:
            raise ModelLoadError(f"{path}: tensor {name!r} does not belong to this config "
                                 f"(tie_word_embeddings={cfg.tie_word_embeddings})")
        arr = thunk()
        shape = tuple(reversed(arr.shape)) if key[-1] == "kernel" else tuple(arr.shape)  # ours is [in, out]
        if shape != tuple(expected[key]):
            raise ModelLoadError(f"{path}: tensor {name!r} has shape {shape}, expected {tuple(expected[key])}")
        node = params
        for k in key[:-1]:
            node = node.setdefault(k, {})
        try:
            node.update(_leaves(arr, key, cfg, dtype, quantization, place))
        except ValueError as e:  # quantize_int8: a non-finite weight
            raise ModelLoadError(f"{path}: tensor {name!r}: {e}") from None
        del arr
        seen.add(key)
    bar.close()
    missing = sorted(set(expected) - seen)
    if missing:
        raise ModelLoadError(f"{path}: missing tensors {['.'.join(m) for m in missing[:5]]}"
                             f"{' ...' if len(missing) > 5 else ''}")
    return params


# ------------------------------------------------------------------------------ Hugging Face dirs
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": "bfloat16", "F64": np.float64}


def _read_safetensors_header(path: str) -> tuple[dict, int]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ModelLoadError(f"{path}: truncated safetensors file (no header)")
        n = int.from_bytes(raw, "little")
        if n <= 0 or 8 + n > size:
            raise ModelLoadError(f"{path}: corrupt safetensors header length {n} (file is {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ModelLoadError(f"{path}: corrupt safetensors header: {e}") from None
    header.pop("__metadata__", None)
    for name, info in header.items():
        end = info["data_offsets"][1]
        if 8 + n + end > size:
            raise ModelLoadError(f"{path}: truncated safetensors file: tensor {name!r} ends at byte "
                                 f"{8 + n + end}, file has {size}")
    return header, 8 + n


def _safetensors_tensors(files: list[str]) -> tuple[TensorSource, int]:
    import ml_dtypes

    entries = []
    for fpath in files:
        header, base = _read_safetensors_header(fpath)
        for name, info in header.items():
            entries.append((fpath, base, name, info))

    def gen():
        for fpath, base, name, info in entries:
            dt = _ST_DTYPES.get(info["dtype"])
            if dt is None:
                raise ModelLoadError(f"{fpath}: tensor {name!r} has unsupported dtype {info['dtype']}")
            dt = ml_dtypes.bfloat16 if dt == "bfloat16" else dt
            start, end = info["data_offsets"]

            def thunk(fpath=fpath, base=base, start=start, end=end, dt=dt, shape=tuple(info["shape"])):
                mm = np.memmap(fpath, dtype=np.uint8, mode="r", offset=base + start, shape=(end - start,))
                return mm.view(dt).reshape(shape).astype(np.float32)

            yield name, thunk

    return gen(), len(entries)


def _hf_source(path: str):
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise ModelLoadError(f"{path}: not a Hugging Face model directory (no config.json)")
    with open(cfg_path) as f:
        try:
            cfg = ModelConfig.from_hf(json.load(f), name=os.path.basename(os.path.normpath(path)))
        except UnsupportedModelError as e:
            raise ModelLoadError(f"{cfg_path}: {e}") from None
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted({os.path.join(path, v) for v in json.load(f)["weight_map"].values()})
    else:
        files = sorted(str(p) for p in Path(path).glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors files")
    for fp in files:
        if not os.path.exists(fp):
            raise ModelLoadError(f"{fp}: listed in the index but missing")
    tensors, n = _safetensors_tensors(files)
    return cfg, tensors, n


# ------------------------------------------------------------------------------------------- GGUF
_GGUF_LAYER = {
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}


def gguf_name_to_hf(name: str) -> str | None:
    if name in _GGUF_TOP:
        return _GGUF_TOP[name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if m and m.group(2) in _GGUF_LAYER:
        return f"model.layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}"
    return None


_GGUF_BIG_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores",
                    "tokenizer.ggml.token_type")


def read_gguf(path: str):
    """Open a GGUF file; (GGUFFile, metadata dict without the tokenizer's big arrays). Errors name the file."""
    from sgl_jax.models.gguf_file import GGUFFile

    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such file")
    try:
        reader = GGUFFile(path)
    except Exception as e:  # noqa: BLE001 - corrupt/truncated input raises a variety of errors
        raise ModelLoadError(f"{path}: not a valid GGUF file or truncated ({type(e).__name__}: {e})") from None
    meta = {}
    for k, v in reader.fields.items():
        if k in _GGUF_BIG_ARRAYS:  # the tokenizer reads these itself; here only their length matters
            meta[k + ".count"] = len(v)
        else:
            meta[k] = v.tolist() if isinstance(v, np.ndarray) else v
    return reader, meta


def _keeps_q4_1(hf_name: str) -> bool:
    """Whether a Q4_1 tensor stays in its blocks under quantization "gguf": the transformer's Linears (q/k/v/o,
    gate/up/down), which llama.Linear runs from blocks; the LM head and the embedding are requantized to int8."""
    key = hf_name_to_path(hf_name)
    return key is not None and len(key) >= 2 and key[-1] == "kernel" and key[-2] in quant.LINEARS \
        and key[-2] != "lm_head"


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation: per head, rows (hd/2, 2) interleaved -> (2, hd/2)."""
    rows = w.shape[0]
    hd = rows // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_source(path: str, reader, meta, keep_q4_1: bool = False):
    names = {t.name for t in reader.tensors}
    try:
        cfg = ModelConfig.from_gguf(meta, has_output_weight="output.weight" in names,
                                    name=os.path.basename(path))
    except UnsupportedModelError as e:
        raise ModelLoadError(f"{path}: {e}") from None
    permute = meta.get("general.architecture") == "llama"

    def gen():
        for t in reader.tensors:
            hf = gguf_name_to_hf(t.name)
            if hf is None:
                if t.name in ("rope_freqs.weight",):
                    continue
                raise ModelLoadError(f"{path}: unexpected tensor {t.name!r}")

            def thunk(t=t, hf=hf):
                shape = tuple(int(x) for x in reversed(t.shape))
                keep = keep_q4_1 and int(t.tensor_type) == int(gguf_quants.QT.Q4_1) and _keeps_q4_1(hf)
                try:
                    if keep:
                        arr = gguf_quants.raw_blocks(t.data, t.tensor_type, shape, what=f"{path}: {t.name}")
                    else:
                        arr = gguf_quants.dequantize(t.data, t.tensor_type, shape, what=f"{path}: {t.name}")
                except ValueError as e:  # unsupported type, or a payload of the wrong size
                    raise ModelLoadError(str(e)) from None
                if permute and hf.endswith(("q_proj.weight", "q_proj.bias")):
                    arr = unpermute_qk(arr, cfg.num_heads)
                elif permute and hf.endswith(("k_proj.weight", "k_proj.bias")):
                    arr = unpermute_qk(arr, cfg.num_kv_heads)
                return Q4Blocks(np.ascontiguousarray(arr)) if keep else arr

            yield hf, thunk

    return cfg, gen(), len(reader.tensors)
