"""Runs in a subprocess with simulated CPU devices (tests/test_tp.py sets XLA_FLAGS before jax starts): the same
model and the same requests on one device and tensor parallel over 2, 4 and 8; prints one JSON document with what
tests/test_tp.py compares. Not a test module itself (pytest collects test_*.py only)."""

from __future__ import annotations

import collections
import json
import os
import re
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

from helpers import PagedRunner  # noqa: E402
from sgl_jax.models.loader import load_weights  # noqa: E402
from sgl_jax.models.testing import write_tiny_checkpoint, write_tiny_gguf  # noqa: E402
from sgl_jax.parallel.tp import TPLayout, make_mesh  # noqa: E402
from sgl_jax.shapes import StepShape  # noqa: E402

# (model, overrides, tp values, attention backend): every split rule is met at least once. Tiny models: H = 4 query
# and K = 2 KV heads unless overridden (llama3-tied-mqa: K = 1; "h8" has H = 8, K = 2), F = 128, V = 320.
MODEL_CASES = [
    ("llama", {}, (2, 4, 8), "cpu_native"),   # tp 2: heads split; 4: each KV head stored twice; 8: attention replicated
    ("llama", {"num_attention_heads": 8}, (8,), "jnp"),  # 8 query heads over 8 devices, each KV head 4x
    ("llama3-tied-mqa", {}, (2, 4), "jnp"),   # one KV head (MQA) stored 2x / 4x; tied embedding split by vocabulary
    ("qwen2", {}, (2,), "cpu_native"),        # q/k/v biases split with their columns; tied embedding
    ("qwen3", {}, (2,), "jnp"),               # q/k norms (replicated) on split heads
    ("mistral-swa", {}, (4,), "cpu_native"),  # sliding window; KV heads stored twice
    ("llama", {"intermediate_size": 96, "vocab_size": 322}, (4,), "jnp"),  # MLP split, vocabulary replicated (322)
    # The Pallas kernels under shard_map (head dims 64/128/256), interpreted on CPU, on one layer (the two cases took
    # 23.1 / 7.0 s at two layers, 18.4 / 6.5 s at one: most of their time is per shape, not per layer). The TPU
    # kernel's interpreter is slow, so that case runs a prefill and one decode step.
    ("llama", {"head_dim": 64, "num_hidden_layers": 1}, (2,), "pallas_tpu_interpret"),
    ("llama", {"head_dim": 64, "num_hidden_layers": 1}, (4,), "pallas_gpu_interpret"),
]


def _work(runner, rng, vocab, light=False):
    """A prefill in two chunks, a second sequence, then mixed decode steps and a run block: logits of each
    (`light`: the first chunk and one decode step)."""
    out = []
    a = rng.integers(3, vocab, 40).tolist()
    b = rng.integers(3, vocab, 9).tolist()
    out += runner.step([(0, a[:24], 0, 0)])
    if light:
        out += runner.step([(0, [int(rng.integers(3, vocab))], 24, 24)], num_decode=4)
        return [np.asarray(x) for x in out]
    out += runner.step([(0, a[24:], 24, 24), (1, b, 0, 0)], num_blocks=8)
    pos = {0: 40, 1: 9}
    for t in range(4):
        toks = [int(rng.integers(3, vocab)) for _ in range(2)]
        out += runner.step([(0, [toks[0]], pos[0], pos[0]), (1, [toks[1]], pos[1], pos[1])], num_decode=4)
        pos = {0: pos[0] + 1, 1: pos[1] + 1}
    out += runner.step([(0, rng.integers(3, vocab, 3).tolist(), pos[0], pos[0], True)], run_q=4)
    return [np.asarray(x) for x in out]


def model_cases(tmp: str) -> list[dict]:
    res = []
    for i, (name, over, tps, backend) in enumerate(MODEL_CASES):
        path = write_tiny_checkpoint(name, os.path.join(tmp, f"m{i}"), **over)
        cfg, params = load_weights(path, "float32", progress=False)
        kw = dict(attention_backend=backend, page_size=16 if backend.startswith("pallas") else 4)  # Pallas: pages >= 16
        if not backend.startswith("pallas"):  # every step but the run block in one compiled shape (not the
            kw["shape"] = dict(num_decode=4, num_blocks=8, page_width=16, num_logits=32)  # interpreted Pallas:
            # its time grows with the padded rows)
        light = backend == "pallas_tpu_interpret"
        ref = _work(PagedRunner(cfg, params, **kw), np.random.default_rng(i), cfg.vocab_size, light)
        for tp in tps:
            layout = TPLayout.plan(cfg, make_mesh(tp))
            runner = PagedRunner(cfg, params, layout=layout, **kw)
            got = _work(runner, np.random.default_rng(i), cfg.vocab_size, light)
            q = runner.params["layers_0"]["self_attn"]["q_proj"]["kernel"]
            res.append(dict(
                model=name, overrides=over, tp=tp, backend=backend, layout=layout.describe(),
                kv_copies=layout.kv_copies, shard_attention=layout.shard_attention, shard_mlp=layout.shard_mlp,
                shard_vocab=layout.shard_vocab,
                max_abs_diff=max(float(np.abs(x - y).max()) for x, y in zip(ref, got)),
                max_abs_logit=max(float(np.abs(x).max()) for x in ref),
                argmax_equal=all(bool((x.argmax(-1) == y.argmax(-1)).all()) for x, y in zip(ref, got)),
                finite=all(bool(np.isfinite(y).all()) for y in got),
                kv_shard_shape=list(runner.kv[0][0].addressable_shards[0].data.shape),
                kv_shape=list(runner.kv[0][0].shape),
                q_shard_shape=list(q.addressable_shards[0].data.shape), q_shape=list(q.shape),
                devices=len(runner.kv[0][0].sharding.device_set)))
    return res


# One decode and one prefill bucket: each engine compiles 4 step shapes (7 with [1, 4, 8] and [2, 8]).
SMALL = dict(page_size=4, max_context_len=128, max_running_requests=8, max_prefill_tokens=64, prefill_block=8,
             decode_buckets=[8], prefill_block_buckets=[8], max_mixed_blocks=2, page_width_buckets=[32],
             max_top_logprobs=5, compile_cache_dir="", kv_memory_gb=0.01, warmup=False)
PROMPTS = ["Hello there, how", "The quick brown fox jumps", "Hello there, how are"]  # the third shares a prefix


def engine_cases(tmp: str) -> dict:
    from sgl_jax.engine import Engine

    path = write_tiny_gguf("llama", os.path.join(tmp, "tiny.gguf"))
    out = {}
    for tp in (1, 2, 8):  # (tp 4, KV heads stored twice, is covered by the model cases)
        with Engine(model=path, progress=False, parallel={"tp": tp}, **SMALL) as e:
            greedy = e.generate(PROMPTS[:2], {"max_new_tokens": 10, "temperature": 0}, return_logprob=True,
                                top_logprobs_num=3)
            shared = e.generate(PROMPTS[2], {"max_new_tokens": 6, "temperature": 0}, return_logprob=True)
            regex = e.generate("Answer:", {"max_new_tokens": 16, "temperature": 0, "regex": r"(yes|no), [0-9]{3}!"})
            sampled = e.generate("Once", {"max_new_tokens": 8, "temperature": 0.9, "sampling_seed": 7})
            e.check_integrity()
            r = e.runner  # host tier round trip on the sharded pool: pages 1-3 out, into 20-22, out again
            saved = r.save_pages([1, 2, 3])
            r.host_arena[:3] = saved
            r.load_pages([(0, 20), (1, 21), (2, 22)])
            round_trip = bool((r.save_pages([20, 21, 22]) == saved).all()) and bool(saved.any())
            kv = e.runner.kv[0][0]
            hlo = r._compile(StepShape(8, 0, 32)).as_text()  # the 8-row decode step as XLA compiled it
            ops = collections.Counter(re.findall(r"= \S+ (all-reduce|all-gather|reduce-scatter|all-to-all|"
                                                 r"collective-permute)\(", hlo))
            out[tp] = dict(
                texts=[o["text"] for o in greedy] + [shared["text"]], regex=regex["text"], sampled=sampled["text"],
                logprobs=[[x[0] for x in o["meta_info"]["output_token_logprobs"]] for o in greedy + [shared]],
                top=[[[t[1] for t in row] for row in o["meta_info"]["output_top_logprobs"]] for o in greedy],
                cached_tokens=shared["meta_info"]["cached_tokens"], layout=getattr(e.runner.layout, "describe",
                                                                                  lambda: "none")(),
                round_trip=round_trip, collectives=dict(ops), num_layers=r.cfg.num_layers,
                kv_sharding=str(getattr(kv.sharding, "spec", None)), kv_devices=len(kv.sharding.device_set),
                kv_shard_shape=list(kv.addressable_shards[0].data.shape))
    return out


def main() -> None:
    assert jax.device_count() >= 8, f"run with XLA_FLAGS=--xla_force_host_platform_device_count=8 ({jax.devices()})"
    which = sys.argv[1]
    with tempfile.TemporaryDirectory() as tmp:
        result = model_cases(tmp) if which == "model" else engine_cases(tmp)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
