"""Benchmark of sgl_jax's model core on CPU (SmolLM2-135M): prefill and decode, beside floors and a peer.

    python bench/bench_model.py [--dtype float32|bfloat16|both] [--quick] [--json OUT] [--wait-quiet S]
                                [--peer-python PY | --no-peer] [--attention auto|jnp|none|...]
                                [--quant none|int8|both] [--random-weights PRESET [--layers N]]

Default: float32 with the peer, ~4.5 min on the 2-core machine (--dtype both ~7 min, --quick ~1 min).
The machine is shared: each section logs how busy it was beforehand, the table gives the fastest call
beside every median and warns when other work was running (--wait-quiet waits for an idle machine).

What is timed: the jitted forward (`CausalLM.apply` under jax.jit, the KV pool donated, as the engine and
tests/helpers.PagedRunner drive it) on inputs already on the device, until `block_until_ready` on the
logits; compilation excluded (timed separately), median of the timed calls after 2 warm-up calls.
  prefill  one sequence of 512 new tokens in one call (page size 16), for several prefill block sizes
           (block_q: query tokens per attention row); tok/s = 512 / median time.
  decode   B sequences of one new token each, each sequence's KV length = the context (its pages
           assigned consecutively from a pool sized for the largest batch x context), ms per step.
Floors, measured in the same process (bench/floors.py):
  memory   bytes that must be read / measured copy bandwidth (read+write counted): the weights
           (all parameters in the compute dtype), plus for decode the KV of B x context tokens;
  compute  cfg.flops_per_token() x tokens / the best measured GEMM rate (f32 or bf16 as computed)
           (attention's own FLOPs excluded, as in flops_per_token; they add 4*ctx*H*D*L per token).
Peer: Hugging Face transformers (fp32, eager PyTorch on CPU, SDPA attention) on the same GGUF weights,
same prompt length, batch sizes and contexts, run in this process when torch is importable, otherwise
in a subprocess of --peer-python (default /work/refvenv/bin/python when it exists).

`--attention none` swaps the attention for an identity (q passes through; the KV write stays) to show
how much of a step the attention takes (experiment (b) in bench/notes.md); `--attention auto` (the default) is
the model's own backend choice, what the engine runs (the native kernel on CPU, the Pallas kernels on an
accelerator); `jnp`, `cpu_native`, `pallas_gpu`, `pallas_tpu` name one. Steps are compiled with the runner's
options for their token count (`--xla-defaults`: XLA's defaults).

`--quant int8` (or both) times the int8 weight-only model (sgl_jax/models/quant.py) beside the float one: the
memory floor counts its own weight bytes (int8 + scales), and a single [1,576] x [576,1536] matmul is timed
f32 vs int8-converted-in-the-graph (bench/floors.py int8_matmul_times). `--random-weights llama-3-8b` replaces SmolLM2 by random weights (made on
the device, nothing downloaded) with the shapes of a sgl_jax.models.config.PRESETS entry (`--layers N` keeps
its first N layers, for a smoke run); no peer then. On a GPU/TPU the memory floor uses the device's copy
bandwidth (bench/floors.py device_copy_bandwidth) instead of the host's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PEER_PYTHON = "/work/refvenv/bin/python"
PAGE_SIZE = 16
PREFILL_LEN = 512
XLA_DEFAULTS = False  # --xla-defaults: compile with XLA:CPU's default fusions instead of the runner's options
MODEL_BACKENDS = ("jnp", "cpu_native", "auto", "pallas_gpu", "pallas_tpu")  # the model's own attention backends


def _log(*a):
    print(*a, flush=True)


def _median_time(fn, n: int, warmup: int = 2) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts


# ------------------------------------------------------------------------------------------ sgl_jax
def _attention_override(name: str):
    """Patch llama.get_attention_backend for experiments; returns an undo function."""
    from sgl_jax.models import llama
    from sgl_jax.models.attention import AttentionFn

    orig = llama.get_attention_backend
    if name in MODEL_BACKENDS:
        return lambda: None
    if name == "none":
        def fn(q, k_pages, v_pages, page_table, kv_lens, q_positions, **kw):
            return q  # [R, Bq, H, D]: attention skipped, everything else unchanged
    else:  # an alternative from bench_attention_layout (head-major pool layout only)
        sys.path.insert(0, HERE)
        import bench_attention_layout as bal
        import functools
        from sgl_jax.models.attention import paged_block_attention, paged_decode_attention
        table = {"hm_dec": bal.paged_decode_hm, "flat": bal.paged_attention_flat, "block": paged_block_attention,
                 "gather_dec": paged_decode_attention,
                 "flat_dec": bal.paged_decode_flat, "chunk4_dec": bal.paged_decode_chunked,
                 "qcast_dec": bal.paged_decode_qcast, "page_major": bal.page_major_decode,
                 "page_major_noguard": functools.partial(bal.page_major_decode, guard=False)}
        if name not in table:
            raise SystemExit(f"--attention {name!r}: expected jnp, none or one of {sorted(table)}")
        alt = table[name]
        decode_only = name not in ("flat", "block")

        def fn(q, k_pages, v_pages, page_table, kv_lens, q_positions, *, sm_scale, sliding_window=None,
               soft_cap=None):
            if q.shape[1] != 1 and decode_only:  # decode-only variants: prefill rows keep jnp
                from sgl_jax.models.attention import paged_attention
                return paged_attention(q, k_pages, v_pages, page_table, kv_lens, q_positions, sm_scale=sm_scale)
            return alt(q, k_pages, v_pages, page_table, kv_lens, q_positions, sm_scale=sm_scale)
    llama.get_attention_backend = lambda _name="jnp": AttentionFn(name, fn)

    def undo():
        llama.get_attention_backend = orig
    return undo


def random_params(cfg, dtype: str, quantization: str = "none", seed: int = 0) -> dict:
    """Random weights with `cfg`'s parameter shapes, made on the default device leaf by leaf (N(0, 0.02);
    int8 leaves uniform in [-127, 127] with a 0.02 / 127 scale). For timing only: the numbers mean nothing."""
    import jax
    import jax.numpy as jnp

    from sgl_jax.models import quant
    from sgl_jax.models.llama import param_shapes

    flat, tree = jax.tree_util.tree_flatten_with_path(param_shapes(cfg, getattr(jnp, dtype)))
    keys = jax.random.split(jax.random.PRNGKey(seed), len(flat))
    params: dict = {}
    for (kp, leaf), key in zip(flat, keys):
        path = tuple(k.key for k in kp)
        node = params
        for k in path[:-1]:
            node = node.setdefault(k, {})
        axis = quant.int8_axis(path, cfg.tie_word_embeddings) if quantization == "int8" else None
        if axis is None:
            node[path[-1]] = (0.02 * jax.random.normal(key, leaf.shape, jnp.float32)).astype(leaf.dtype)
            continue
        node[path[-1]] = jax.random.randint(key, leaf.shape, -127, 128, jnp.int8)
        node["scale"] = jnp.full((leaf.shape[1 - axis],), 0.02 / 127, jnp.float32)
    jax.block_until_ready(params)
    return params


class ModelBench:
    """Weights, one KV pool and a jitted, KV-donating forward for one dtype and quantization."""

    def __init__(self, dtype: str, num_pages: int, attention: str = "jnp", quantization: str = "none",
                 random_preset: str | None = None, layers: int | None = None, packed: bool | None = None,
                 kv_dtype: str | None = None, attention_math: str = "float32"):
        """packed: weights panel-packed for the CPU's native matmul (sgl_jax.models.packing); None = as the engine
        does (CPU, float32, the kernel built). kv_dtype: the KV pool's dtype (None: `dtype`). attention_math: the
        engine's key of that name."""
        import dataclasses

        import jax
        import jax.numpy as jnp

        from sgl_jax.models.attention import AttnMetadata
        from sgl_jax.models.config import PRESETS
        from sgl_jax.models.llama import CausalLM, init_kv_cache
        from sgl_jax.models.loader import load_weights

        self.jax, self.jnp = jax, jnp
        self.dtype = dtype
        t0 = time.perf_counter()
        if random_preset:
            if random_preset not in PRESETS:
                raise SystemExit(f"--random-weights {random_preset!r}: expected one of {sorted(PRESETS)}")
            self.path = f"random:{random_preset}"
            self.cfg = PRESETS[random_preset]
            if layers:
                self.cfg = dataclasses.replace(self.cfg, num_layers=layers)
            self.params = random_params(self.cfg, dtype, quantization)
        else:
            from sgl_jax.models.hub import resolve_model

            self.path = resolve_model("smollm2-135m")
            self.cfg, self.params = load_weights(self.path, dtype, progress=False, quantization=quantization)
        from sgl_jax.models import packing

        if packed is None:
            packed = packing.packs_here(dtype)
        if packed:
            self.params = packing.pack_params(self.params, self.cfg.tie_word_embeddings)
        self.packed = packed
        self.load_s = time.perf_counter() - t0
        self.weight_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(self.params))
        self.kv_dtype = kv_dtype or dtype
        self.itemsize = jnp.dtype(self.kv_dtype).itemsize  # of the KV pool (what kv_bytes_per_token is priced by)
        self.undo = _attention_override(attention)
        model = CausalLM(self.cfg, getattr(jnp, dtype), attention if attention in MODEL_BACKENDS else "jnp",
                         attention_math=attention_math)

        def forward(params, ids, kv, logits_idx, meta_arrays, block_q):
            meta = AttnMetadata(*meta_arrays, block_q=block_q)
            return model.apply({"params": params}, ids, meta, kv, logits_idx)

        self.fwd = jax.jit(forward, donate_argnums=(2,), static_argnames=("block_q",))
        self.kv = init_kv_cache(self.cfg, num_pages, PAGE_SIZE, getattr(jnp, self.kv_dtype))
        self.num_pages = num_pages

    def close(self):
        self.undo()
        del self.kv, self.params

    def _run_fn(self, b, options: dict | None = None):
        """A call of the forward on packed batch `b`, compiled once with `options` (None: the runner's options for
        b's token count, or XLA's defaults under --xla-defaults)."""
        jnp = self.jnp
        meta = tuple(jnp.asarray(m) for m in (b.positions, b.slot_mapping, b.dec_page_table, b.dec_kv_lens,
                                              b.pre_page_table, b.pre_kv_lens))
        ids, li = jnp.asarray(b.input_ids), jnp.asarray(b.logits_indices)

        from sgl_jax.executables import step_compile_options

        # compiled with the runner's options for this many tokens (unless --xla-defaults)
        opts = options if options is not None else {} if XLA_DEFAULTS else step_compile_options(len(b.input_ids))
        compiled = self.fwd.lower(self.params, ids, self.kv, li, meta, block_q=b.block_q).compile(
            compiler_options=opts)

        def run():
            logits, self.kv = compiled(self.params, ids, self.kv, li, meta)
            logits.block_until_ready()
            return logits
        return run

    @staticmethod
    def prefill_pages(length: int, at: int = 0, chunks: int = 1) -> int:
        """Pool pages `prefill_batch(length, at=at, chunks=chunks)` uses (page 0 aside)."""
        shared = at // PAGE_SIZE
        return shared + chunks * (math.ceil((at + length) / PAGE_SIZE) - shared)

    def prefill_batch(self, length: int = PREFILL_LEN, block_q: int = 64, at: int = 0, chunks: int = 1):
        """`chunks` sequences of `length` random tokens from position `at` (after `at` cached tokens: a prompt whose
        prefix is in the cache; several: a fork's branches, a select's choices), sharing the whole pages of those
        `at` tokens, each with its own pages from there on. The same tokens on every call."""
        from sgl_jax.batch import SeqChunk, pack
        import numpy as np

        shared = at // PAGE_SIZE
        own = math.ceil((at + length) / PAGE_SIZE) - shared
        assert 1 + self.prefill_pages(length, at, chunks) <= self.num_pages
        rng = np.random.default_rng(0)
        tables = [list(range(1, 1 + shared)) + list(range(1 + shared + i * own, 1 + shared + (i + 1) * own))
                  for i in range(chunks)]
        return pack([SeqChunk(rng.integers(0, self.cfg.vocab_size, length).tolist(), at, t) for t in tables],
                    page_size=PAGE_SIZE, block_q=block_q)

    def time_batch(self, b, n: int) -> dict:
        t0 = time.perf_counter()
        run = self._run_fn(b)
        run()
        compile_s = time.perf_counter() - t0
        med, ts = _median_time(run, n)
        return {"median_s": med, "min_s": min(ts), "max_s": max(ts), "n": n, "compile_s": compile_s}

    def prefill(self, block_q: int, n: int, length: int = PREFILL_LEN) -> dict:
        r = self.time_batch(self.prefill_batch(length, block_q), n)
        r["tok_s"] = length / r["median_s"]
        return r

    def decode_batch(self, batch: int, ctx: int, shared: int = 0):
        """`batch` sequences of one new token at KV length `ctx`, pages assigned consecutively; with `shared`, the
        sequences share the pages of their first `shared` tokens (whole pages: a fork's branches over one prompt)."""
        from sgl_jax.batch import SeqChunk, pack
        import numpy as np

        pp, common = math.ceil(ctx / PAGE_SIZE), min(shared, ctx - 1) // PAGE_SIZE
        own = pp - common
        assert 1 + common + batch * own <= self.num_pages
        rng = np.random.default_rng(1)
        chunks = [SeqChunk([int(rng.integers(self.cfg.vocab_size))], ctx - 1,
                           list(range(1, 1 + common)) + list(range(1 + common + i * own, 1 + common + (i + 1) * own)))
                  for i in range(batch)]
        return pack(chunks, page_size=PAGE_SIZE, block_q=1)

    def decode(self, batch: int, ctx: int, n: int) -> dict:
        r = self.time_batch(self.decode_batch(batch, ctx), n)
        r["ms"] = 1e3 * r["median_s"]
        return r


def interleaved_times(runs: dict, rounds: int, per_round: int = 3) -> dict:
    """{key: [seconds, ...]} for calls `runs[key]()`, two warm-up calls each, then `rounds` rounds that call every
    run `per_round` times in turn: every variant sees the same (shared, drifting) machine."""
    for f in runs.values():
        f()
        f()
    times = {k: [] for k in runs}
    for _ in range(rounds):
        for k, f in runs.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    return times


def bench_sgl_jax(dtype: str, plan: dict, attention: str = "jnp", quantization: str = "none",
                  random_preset: str | None = None, layers: int | None = None) -> dict:
    num_pages = 1 + max(max(plan["batches"], default=0) * math.ceil(max(plan["ctxs"], default=0) / PAGE_SIZE),
                        math.ceil(PREFILL_LEN / PAGE_SIZE))
    mb = ModelBench(dtype, num_pages, attention, quantization, random_preset, layers)
    out = {"dtype": dtype, "quantization": quantization, "model": mb.path, "attention": attention,
           "weight_bytes": mb.weight_bytes, "load_s": mb.load_s,
           "kv_bytes_per_token": mb.cfg.kv_bytes_per_token(mb.itemsize), "flops_per_token": mb.cfg.flops_per_token(),
           "num_pages": num_pages, "page_size": PAGE_SIZE, "prefill": {}, "decode": {}}
    _log(f"[sgl_jax {dtype} quantization={quantization} {mb.path}] weights {mb.weight_bytes / 1e6:.0f} MB "
         f"loaded in {mb.load_s:.1f} s; KV pool {num_pages} pages x {PAGE_SIZE} "
         f"({2 * mb.cfg.num_layers * mb.kv[0][0].nbytes / 1e9:.2f} GB)")
    for bq in plan["block_qs"]:
        r = mb.prefill(bq, plan["prefill_n"])
        out["prefill"][str(bq)] = r
        _log(f"  prefill {PREFILL_LEN} block_q={bq:<4d} {r['tok_s']:7.1f} tok/s  ({1e3 * r['median_s']:.0f} ms, "
             f"min {1e3 * r['min_s']:.0f}; compile {r['compile_s']:.1f} s)")
    for ctx in plan["ctxs"]:
        for B in plan["batches"]:
            r = mb.decode(B, ctx, plan["decode_n"])
            out["decode"][f"{B}x{ctx}"] = r
            _log(f"  decode B={B:<3d} ctx={ctx:<4d} {r['ms']:8.1f} ms/step  (min {1e3 * r['min_s']:.1f}, "
                 f"max {1e3 * r['max_s']:.1f}; compile {r['compile_s']:.1f} s)")
    mb.close()
    return out


# ------------------------------------------------------------------------------------------- peer
def _have_torch() -> bool:
    return importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None


def bench_peer(plan: dict, gguf_path: str) -> dict:
    """Hugging Face transformers fp32 on the same GGUF: prefill 512 and decode B x ctx (ms/step)."""
    import copy

    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    d = tempfile.mkdtemp(prefix="sgl_jax_peer_")
    name = os.path.basename(gguf_path)
    os.symlink(os.path.abspath(gguf_path), os.path.join(d, name))
    t0 = time.perf_counter()
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - t0
    out = {"system": f"transformers {transformers.__version__} + torch {torch.__version__}, fp32, "
                     f"{torch.get_num_threads()} threads, attn={model.config._attn_implementation}",
           "load_s": load_s, "prefill": {}, "decode": {}}
    _log(f"[peer] {out['system']}; loaded in {load_s:.1f} s")
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        ids = torch.randint(0, V, (1, PREFILL_LEN), generator=g)
        run = lambda: model(ids, use_cache=True, logits_to_keep=1)  # noqa: E731
        med, ts = _median_time(run, plan["peer_prefill_n"], warmup=1)
        out["prefill"] = {"median_s": med, "min_s": min(ts), "tok_s": PREFILL_LEN / med, "n": len(ts)}
        _log(f"  prefill {PREFILL_LEN}: {PREFILL_LEN / med:7.1f} tok/s ({1e3 * med:.0f} ms, min {1e3 * min(ts):.0f})")
        # One prefill of the longest context, cropped and repeated to build each B x ctx cache.
        if not plan["ctxs"] or not plan["batches"]:
            return out
        cmax = max(plan["ctxs"])
        base = model(torch.randint(0, V, (1, cmax), generator=g), use_cache=True, logits_to_keep=1).past_key_values
        for ctx in plan["ctxs"]:
            for B in plan["batches"]:
                cache = copy.deepcopy(base)
                cache.crop(-(cmax - (ctx - 1)))  # keep ctx - 1 tokens (crop takes -tokens_to_remove)
                cache.batch_repeat_interleave(B)
                tok = torch.randint(0, V, (B, 1), generator=g)
                ts = []
                for i in range(plan["decode_n"] + 2):  # the cache grows by one token a step, as in generate()
                    t0 = time.perf_counter()
                    model(tok, past_key_values=cache, use_cache=True)
                    ts.append(time.perf_counter() - t0)
                ts = ts[2:]
                med = statistics.median(ts)
                out["decode"][f"{B}x{ctx}"] = {"median_s": med, "min_s": min(ts), "ms": 1e3 * med, "n": len(ts)}
                _log(f"  decode B={B:<3d} ctx={ctx:<4d} {1e3 * med:8.1f} ms/step  (min {1e3 * min(ts):.1f})")
                del cache
    return out


def run_peer(plan: dict, args) -> dict | None:
    from sgl_jax.models.hub import resolve_model

    if args.no_peer:
        return None
    gguf = resolve_model("smollm2-135m")
    if _have_torch() and not args.peer_python:
        return bench_peer(plan, gguf)
    py = args.peer_python or (DEFAULT_PEER_PYTHON if os.path.exists(DEFAULT_PEER_PYTHON) else None)
    if not py:
        _log("[peer] skipped: torch/transformers not importable here and no --peer-python "
             f"(default {DEFAULT_PEER_PYTHON} not found)")
        return None
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as f:
        tmp = f.name
    cmd = [py, os.path.abspath(__file__), "--peer-only", "--gguf", gguf, "--json", tmp,
           "--plan", json.dumps(plan)]
    _log(f"[peer] running in a subprocess: {py}")
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(HERE),
                                                                    os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        _log(f"[peer] subprocess failed with exit status {proc.returncode}; peer figures skipped")
        return None
    with open(tmp) as f:
        res = json.load(f)
    os.unlink(tmp)
    return res


# ------------------------------------------------------------------------------------------ report
def _floors_for(res: dict, floors: dict, B: int, ctx: int | None, tokens: int) -> dict:
    tag = "f32" if res["dtype"] == "float32" else "bf16"
    gemm = max(floors.get(f"jnp_gemm_2048_{tag}", 0), floors["numpy_gemm_2048"] if tag == "f32" else 0)
    kv_bytes = B * ctx * res["kv_bytes_per_token"] if ctx else 0
    mem_s = (res["weight_bytes"] + kv_bytes) / floors["copy_bw"]
    cmp_s = res["flops_per_token"] * tokens / gemm
    return {"memory_s": mem_s, "compute_s": cmp_s, "floor_s": max(mem_s, cmp_s), "gemm_flops": gemm,
            "kv_bytes": kv_bytes}


def report(results: dict) -> str:
    """The figures as markdown tables, one per dtype: median (and fastest) beside floors and the peer."""
    floors, peer = results["floors"], results.get("peer")
    nan = float("nan")
    lines = []
    bw, f32g = floors["copy_bw"] / 1e9, floors["jnp_gemm_2048_f32"] / 1e9
    where = f"device {floors['platform']}" if floors.get("platform", "cpu") != "cpu" else "host"
    lines.append(f"floors: {where} copy bandwidth {bw:.1f} GB/s (read+write), GEMM f32 {max(f32g, floors['numpy_gemm_2048'] / 1e9):.0f} "
                 f"GFLOP/s (jnp {f32g:.0f}, numpy {floors['numpy_gemm_2048'] / 1e9:.0f}), "
                 f"bf16 {floors['jnp_gemm_2048_bf16'] / 1e9:.0f} GFLOP/s")
    busy = {k: v for k, v in results.get("busy_before", {}).items() if v > 0.3}
    if busy:
        lines.append("WARNING: the machine was busy with other work before "
                     + ", ".join(f"{k} ({v:.0%})" for k, v in busy.items())
                     + ": figures are inflated by contention (memory-bound ops and the OpenMP peer suffer most); "
                       "compare the 'min' columns, or rerun with --wait-quiet")
    for res in results["sgl_jax"]:
        lines.append("")
        lines.append(f"sgl_jax {res['dtype']} quantization={res.get('quantization', 'none')} {res.get('model', '')} "
                     f"(attention={res['attention']}), weights {res['weight_bytes'] / 1e6:.0f} MB; floor = max(memory, "
                     f"compute); eff = floor / median; HF = transformers fp32; sgl/HF from medians")
        hdr = (f"| {'figure':<26} | {'sgl_jax':>8} | {'min':>8} | {'mem floor':>9} | {'cmp floor':>9} | {'eff':>4} "
               f"| {'HF fp32':>8} | {'HF min':>8} | {'sgl/HF':>6} |")
        lines.append(hdr)
        lines.append("|" + "|".join("-" * len(c) for c in hdr.split("|")[1:-1]) + "|")
        best_bq = max(res["prefill"], key=lambda k: res["prefill"][k]["tok_s"]) if res["prefill"] else None
        hp = peer.get("prefill") if peer else None
        for bq, r in res["prefill"].items():
            fl = _floors_for(res, floors, 1, None, PREFILL_LEN)
            hf, hf_min = (hp["tok_s"], PREFILL_LEN / hp["min_s"]) if hp else (nan, nan)
            name = f"prefill 512 bq={bq} tok/s" + (" *" if bq == best_bq else "")
            lines.append(f"| {name:<26} | {r['tok_s']:8.1f} | {PREFILL_LEN / r['min_s']:8.1f} | "
                         f"{PREFILL_LEN / fl['memory_s']:9.0f} | {PREFILL_LEN / fl['compute_s']:9.0f} | "
                         f"{fl['floor_s'] / r['median_s']:4.0%} | {hf:8.1f} | {hf_min:8.1f} | {r['tok_s'] / hf:6.2f} |")
        for key, r in res["decode"].items():
            B, ctx = map(int, key.split("x"))
            fl = _floors_for(res, floors, B, ctx, B)
            hd = peer["decode"].get(key) if peer else None
            hf, hf_min = (hd["ms"], 1e3 * hd["min_s"]) if hd else (nan, nan)
            lines.append(f"| {f'decode B={B} ctx={ctx} ms':<26} | {r['ms']:8.1f} | {1e3 * r['min_s']:8.1f} | "
                         f"{1e3 * fl['memory_s']:9.1f} | {1e3 * fl['compute_s']:9.1f} | {fl['floor_s'] / r['median_s']:4.0%} | "
                         f"{hf:8.1f} | {hf_min:8.1f} | {hf / r['ms']:6.2f} |")
        lines.append("(prefill: tok/s, higher is better; decode: ms/step, lower is better; sgl/HF > 1: sgl_jax faster; "
                     "* = best block_q)")
    mm = results.get("int8_matmul")
    if mm:
        lines.append("")
        lines.append(f"one matmul {mm['shape']}, best of {mm['n']}: {mm['dtype']} {mm['float_us']:.1f} us, int8 converted "
                     f"in the graph then scaled {mm['int8_us']:.1f} us ({mm['int8_us'] / mm['float_us']:.2f}x)")
    return "\n".join(lines)


def make_plan(quick: bool) -> dict:
    if quick:
        return {"block_qs": [64, 512], "batches": [1, 32], "ctxs": [512], "prefill_n": 3, "decode_n": 5,
                "peer_prefill_n": 2}
    return {"block_qs": [64, 128, 512], "batches": [1, 8, 32, 64], "ctxs": [128, 512], "prefill_n": 5,
            "decode_n": 10, "peer_prefill_n": 3}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "both"],
                    help="both: ~6 min (bf16 is 3-10x slower on XLA:CPU; see bench/notes.md)")
    ap.add_argument("--quant", default="none", choices=["none", "int8", "both"],
                    help="weights: float (none), int8 weight-only, or both one after the other")
    ap.add_argument("--random-weights", metavar="PRESET",
                    help="random weights with the shapes of this sgl_jax.models.config.PRESETS entry (e.g. llama-3-8b) "
                         "instead of SmolLM2; implies --no-peer")
    ap.add_argument("--layers", type=int, help="with --random-weights: keep only the first N layers (smoke runs)")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repeats (~1 min)")
    ap.add_argument("--json", help="dump every figure to this file")
    ap.add_argument("--peer-python", help="interpreter with torch + transformers for the HF peer "
                                          f"(default: this one if it has torch, else {DEFAULT_PEER_PYTHON})")
    ap.add_argument("--no-peer", action="store_true", help="skip the Hugging Face peer")
    ap.add_argument("--no-floors", action="store_true", help="skip the floor measurements (and so the table; the log lines remain)")
    ap.add_argument("--attention", default="auto",
                    help="auto (what the engine runs: the native kernel on CPU) | jnp | cpu_native | pallas_gpu | "
                         "pallas_tpu (the model's backends) | "
                         "experiment: none (identity) | a bench_attention_layout variant: hm_dec, flat, flat_dec, "
                         "chunk4_dec, qcast_dec, page_major, page_major_noguard")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each section wait up to S seconds for the (shared) machine to go idle")
    ap.add_argument("--batches", help="comma list overriding the decode batch sizes")
    ap.add_argument("--ctxs", help="comma list overriding the decode contexts")
    ap.add_argument("--block-qs", help="comma list overriding the prefill block sizes")
    ap.add_argument("--decode-n", type=int, help="timed calls per decode shape (default 10, --quick 5)")
    ap.add_argument("--xla-defaults", action="store_true",
                    help="compile with XLA's default options, not the runner's (YNNPACK fusions on, on CPU)")
    ap.add_argument("--only", choices=["prefill", "decode"], help="run one part only")
    ap.add_argument("--peer-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--gguf", help=argparse.SUPPRESS)
    ap.add_argument("--plan", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.random_weights:
        args.no_peer = True
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.peer_only:  # the subprocess side of the peer: no jax needed
        res = bench_peer(json.loads(args.plan), args.gguf)
        with open(args.json, "w") as f:
            json.dump(res, f)
        return 0

    global XLA_DEFAULTS
    XLA_DEFAULTS = args.xla_defaults
    plan = make_plan(args.quick)
    for k, a in (("batches", args.batches), ("ctxs", args.ctxs), ("block_qs", args.block_qs)):
        if a:
            plan[k] = [int(x) for x in a.split(",")]
    if args.decode_n:
        plan["decode_n"] = args.decode_n
    if args.only == "prefill":
        plan["batches"], plan["ctxs"] = [], []
    elif args.only == "decode":
        plan["block_qs"] = []
    sys.path.insert(0, HERE)
    import floors as floors_mod

    t_start = time.perf_counter()
    results: dict = {"plan": plan, "cpus": os.cpu_count(), "busy_before": {}}

    def quiet(section):
        busy = floors_mod.wait_for_quiet(args.wait_quiet, log=_log) if args.wait_quiet else \
            floors_mod.cpu_busy_fraction(0.5)
        results["busy_before"][section] = round(busy, 2)
        _log(f"[{section}] machine {busy:.0%} busy before the section; load average "
             f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")

    quiet("floors")
    results["floors"] = floors_mod.measure_all(args.quick, log=_log) if not args.no_floors else {}
    dtypes = ["float32", "bfloat16"] if args.dtype == "both" else [args.dtype]
    quants = ["none", "int8"] if args.quant == "both" else [args.quant]
    if "int8" in quants:
        results["int8_matmul"] = mm = floors_mod.int8_matmul_times(1, 576, 1536, "float32")
        _log(f"  one matmul {mm['shape']}: f32 {mm['float_us']:.1f} us, int8 converted {mm['int8_us']:.1f} us")
    results["sgl_jax"] = []
    for dt in dtypes:
        for qz in quants:
            quiet(f"sgl_jax {dt} {qz}")
            results["sgl_jax"].append(bench_sgl_jax(dt, plan, args.attention, qz, args.random_weights, args.layers))
    if not args.no_peer:
        quiet("peer")
    results["peer"] = run_peer(plan, args)
    results["wall_s"] = time.perf_counter() - t_start
    if results["floors"]:
        _log("")
        _log(report(results))
    _log(f"\ntotal {results['wall_s']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
