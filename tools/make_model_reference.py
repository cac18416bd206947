"""Regenerate the model reference files in tests/reference/ with Hugging Face transformers (PyTorch, fp32).

Needs torch + transformers + gguf (the test suite needs none of them):
    python -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install torch transformers gguf numpy
    /tmp/refvenv/bin/python tools/make_model_reference.py [--gguf PATH_TO_SMOLLM2_GGUF]
Writes tests/reference/tiny_<family>.npz (all-position logits of the tiny random checkpoints built by
sgl_jax.models.testing) and tests/reference/smollm2_gguf.npz (prompt ids, last-position logits and a
32-token greedy continuation of SmolLM2-135M-Instruct Q4_1 loaded by transformers' GGUF path).
"""

import argparse
import os
import shutil
import sys
import tempfile

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from sgl_jax.models.testing import TINY_CONFIGS, tiny_prompts, write_tiny_checkpoint  # noqa: E402

OUT = os.path.join(ROOT, "tests", "reference")
SMOLLM_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, in a small village nestled between two mountains, there lived an old clockmaker who",
]


def tiny_references():
    from transformers import AutoModelForCausalLM

    for name, cfg in TINY_CONFIGS.items():
        with tempfile.TemporaryDirectory() as d:
            write_tiny_checkpoint(name, d)
            model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
            model.eval()
            out = {}
            for i, ids in enumerate(tiny_prompts(cfg["vocab_size"])):
                with torch.no_grad():
                    logits = model(torch.tensor([ids])).logits[0].numpy().astype(np.float32)
                out[f"ids_{i}"] = np.array(ids, np.int32)
                out[f"logits_{i}"] = logits
            np.savez_compressed(os.path.join(OUT, f"tiny_{name}.npz"), **out)
            print("wrote", name)


def smollm_reference(gguf_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as d:
        shutil.copy(gguf_path, os.path.join(d, "m.gguf"))
        tok = AutoTokenizer.from_pretrained(d, gguf_file="m.gguf")
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file="m.gguf", dtype=torch.float32)
        model.eval()
        out = {}
        for i, text in enumerate(SMOLLM_PROMPTS):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, -1].numpy().astype(np.float32)
                gen = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                     eos_token_id=None, pad_token_id=0, suppress_tokens=None)
            out[f"ids_{i}"] = np.array(ids, np.int32)
            out[f"last_logits_{i}"] = logits
            out[f"greedy_{i}"] = gen[0, len(ids):].numpy().astype(np.int32)
        np.savez_compressed(os.path.join(OUT, "smollm2_gguf.npz"), **out)
        print("wrote smollm2")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=os.path.expanduser("~/.cache/sgl_jax/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--skip-smollm", action="store_true")
    a = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    tiny_references()
    if not a.skip_smollm:
        smollm_reference(a.gguf)
