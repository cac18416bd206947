"""A GGUF with a real model's metadata and tokenizer but random weights, for benchmarks where the real weights
cannot go: the device machine receives at most 64 MiB of files and SmolLM2's Q4_1 GGUF is 98 MB, while its
metadata and tokenizer alone are ~2 MB.

    python bench/random_gguf.py --from MODEL.gguf --vocab-only OUT.gguf     # metadata + tokenizer, no tensors
    python bench/random_gguf.py --from VOCAB.gguf --out OUT.gguf [--seed 0] [--layers N]
                                                                            # + random F16 weights of its shapes

The random weights (sgl_jax.models.testing.tiny_state_dict's distribution) have the shapes the metadata gives
(`--layers N` overrides block_count, for smoke runs). A random model writes meaningless text, but constrained
decoding still yields output that matches its schema, so an engine benchmark on it measures the mechanics
(steps, jump-forward, host overhead, device step time), not output quality. llama's q/k row permutation is
not applied: it would only permute random rows. numpy + gguf, no jax.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

_HF_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}  # ModelConfig.family -> model_type


def copy_metadata(reader, writer, layers: int | None) -> None:
    """Every key/value of `reader` except the file header and the architecture (the writer adds it)."""
    import gguf

    arch = reader.fields["general.architecture"].contents()
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        if layers is not None and key == f"{arch}.block_count":
            value = layers
        sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub_type=sub)


def hf_config(cfg) -> dict:
    """The config.json fields tiny_state_dict reads, from a ModelConfig."""
    return dict(model_type=_HF_MODEL_TYPE[cfg.family], vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                tie_word_embeddings=cfg.tie_word_embeddings)


def write(src: str, out: str, vocab_only: bool, seed: int = 0, layers: int | None = None) -> str:
    import gguf

    from sgl_jax.models.config import ModelConfig
    from sgl_jax.models.loader import read_gguf
    from sgl_jax.models.testing import gguf_tensor_name, tiny_state_dict

    reader, meta = read_gguf(src)
    arch = meta["general.architecture"]
    if layers is not None:
        meta[f"{arch}.block_count"] = layers
    has_output = any(t.name == "output.weight" for t in reader.tensors) or bool(meta.get("sgl_jax.untied"))
    writer = gguf.GGUFWriter(out, arch)
    copy_metadata(gguf.GGUFReader(src), writer, layers)  # needs the value types: gguf-py's reader
    if vocab_only and has_output and "sgl_jax.untied" not in reader.fields:  # no output.weight tells it
        writer.add_bool("sgl_jax.untied", True)
    if not vocab_only:
        cfg = ModelConfig.from_gguf(meta, has_output_weight=has_output, name=os.path.basename(src))
        for hf, arr in tiny_state_dict(hf_config(cfg), seed).items():
            writer.add_tensor(gguf_tensor_name(hf), arr.astype(np.float16) if arr.ndim == 2 else arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from", dest="src", required=True, help="a GGUF (the real model, or a --vocab-only file)")
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--vocab-only", metavar="OUT", help="write the metadata and tokenizer only")
    group.add_argument("--out", help="write the metadata, tokenizer and random weights")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, help="override the block count (smaller smoke-test models)")
    a = ap.parse_args(argv)
    path = write(a.src, a.vocab_only or a.out, bool(a.vocab_only), a.seed, a.layers)
    print(f"{path}: {os.path.getsize(path) / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
