"""The served decode step beside the model's forward: where a served token's time goes.

    python bench/bench_served_step.py [--config configs/smollm2-135m.yaml] [--tokens 128] [--json OUT]
                                      [--set key=value ...]

One process, one engine on the preset, batch 1, greedy, EOS ignored, for a short prompt (~30 tokens) and
a long one (~480 tokens). For each, measured in the same run:
  wall/token     generate() wall time / tokens (prefill included), what a user of the Engine sees (after
                 one untimed short call on the same prompt, whose cached prefix is then flushed)
  step           the engine's own step time (runner.run: packing, the compiled step, device_get), median
                 over the decode steps, read through Engine.add_step_listener
  host           schedule + postprocess per step (the engine loop's host work), median
  compiled       the compiled step executable alone, replaying the last decode step's own inputs (its context,
                 its page table; StepInfo.inputs), inputs already on the device
  forward        the model forward alone (jit of CausalLM.apply, KV donated) on those inputs
  floor          memory floor of one batch-1 decode step: parameter bytes + KV bytes of the context,
                 over the copy bandwidth measured here (bench/floors.py), read + write counted as in
                 cpu-baselines.md
Peer: llama.cpp's llama-server (bench/peers.py finds it: `--llama-server PATH`, on PATH, or the build of
bench/build_llama_server.sh) on the same GGUF, the same templated prompts, 2 threads, one slot: its own per-token
decode timing beside its wall time per token.
Without one the peer is reported as skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import peers  # noqa: E402


def _median_ms(fn, n: int = 20, warmup: int = 3) -> float:
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn())
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def _split(eng, shape, inp) -> dict:
    """The compiled step alone and the forward alone on `shape`, replaying a served step's inputs `inp` (the
    step writes the same keys and values to the same slots again)."""
    import jax

    from sgl_jax.models.attention import AttnMetadata

    r = eng.runner
    compiled = r._compiled[shape]

    def step():
        r.kv, r.pstate, out = compiled(r.params, r.kv, r.pstate, r.cbuf, inp)
        return out

    model = r.model

    def fwd(params, kv, ids, meta_arrays, li):
        meta = AttnMetadata(*meta_arrays, block_q=r.prefill_block)
        return model.apply({"params": params}, ids, meta, kv, li)

    f = jax.jit(fwd, donate_argnums=(1,))
    ma = (inp.positions, inp.slot_mapping, inp.dec_page_table, inp.dec_kv_lens, inp.pre_page_table, inp.pre_kv_lens)

    def forward():
        logits, r.kv = f(r.params, r.kv, inp.input_ids, ma, inp.logits_indices)
        return logits

    return {"compiled_ms": _median_ms(step), "forward_ms": _median_ms(forward)}


def run(config: str, tokens: int, overrides: dict, llama_server: str | None = None) -> dict:
    import jax

    from floors import copy_bandwidth
    from sgl_jax.config import load_config
    from sgl_jax.engine import Engine
    from sgl_jax.models.hub import resolve_model

    cfg = load_config(config, overrides).engine
    t0 = time.perf_counter()
    eng = Engine(cfg, progress=False)
    up = time.perf_counter() - t0
    print(f"engine up in {up:.1f} s (compile/cache {eng.compile_seconds:.1f} s, {eng.warmup_compiles} shapes)",
          flush=True)
    eng.runner.background_done.wait()  # the background compiler would share the cores with the timed steps
    print(f"all shapes compiled after {time.perf_counter() - t0:.1f} s", flush=True)
    steps = []
    eng.add_step_listener(lambda info: steps.append(info))
    tok = eng.tokenizer
    param_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(eng.runner.params))
    pool_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(eng.runner.kv))
    kv_per_token = pool_bytes / (eng.runner.num_pages * cfg.cache.page_size)
    bw = copy_bandwidth(1 << 30, threads=2)
    long_text = " ".join(f"item {i} is a small red box;" for i in range(60))
    results = {"config": config, "engine_up_s": up, "copy_bandwidth_gbs": bw / 1e9, "rows": []}
    prompts = [(name, tok.apply_chat_template([{"role": "user", "content": text}]))
               for name, text in (("short", "Tell me a long story about a dragon."),
                                  ("long", "Summarize this list: " + long_text))]
    for name, prompt in prompts:
        # untimed: the first call of each executable pays one-off costs (page faults, thread pools)
        eng.generate(prompt=prompt + " ", sampling_params={"temperature": 0, "max_new_tokens": 4})
        eng.flush_cache()
        steps.clear()
        t = time.perf_counter()
        out = eng.generate(prompt=prompt, sampling_params={"temperature": 0, "max_new_tokens": tokens,
                                                          "ignore_eos": True})
        wall = time.perf_counter() - t
        dec = [s for s in steps if s.plan.shape.num_decode == 1 and not s.plan.prefills]
        last = dec[-1]  # the longest context
        shape = last.plan.shape
        ctx = out["meta_info"]["prompt_tokens"] + tokens
        row = {"prompt": name, "prompt_tokens": out["meta_info"]["prompt_tokens"], "tokens": tokens,
               "wall_per_token_ms": 1e3 * wall / tokens,
               "step_ms": 1e3 * statistics.median(s.step_seconds for s in dec),
               "host_ms": 1e3 * statistics.median(s.host_seconds for s in dec),
               "shape": [shape.num_decode, shape.num_blocks, shape.page_width],
               "floor_ms": 1e3 * (param_bytes + kv_per_token * ctx) / bw}
        row.update(_split(eng, shape, last.inputs))
        results["rows"].append(row)
    eng.shutdown()
    peer = peers.find_llama_server(llama_server)
    if peer:
        results["peer"] = _llama_server_rows(peer, resolve_model(cfg.model), prompts, tokens)
    else:
        results["peer"] = peers.SKIPPED
    return results


def _llama_server_rows(binary: str, gguf: str, prompts: list[tuple[str, str]], tokens: int) -> list[dict]:
    """llama.cpp's server on the same GGUF, 2 threads, one slot: the same prompts (already templated), greedy,
    `tokens` tokens with EOS ignored, one untimed call first; its own timings (prompt and per-token decode)."""
    import requests

    rows = []
    try:  # the peer failing leaves our figures standing; its table says why it has none
        with peers.LlamaServer(binary, gguf, ["-t", 2, "-np", 1, "-c", 4096]) as peer:
            for name, prompt in prompts:
                body = {"prompt": prompt, "n_predict": tokens, "temperature": 0, "ignore_eos": True,
                        "cache_prompt": False}
                requests.post(peer.url + "/completion", json=dict(body, n_predict=4), timeout=600)
                t = time.perf_counter()
                out = requests.post(peer.url + "/completion", json=body, timeout=600).json()
                wall = time.perf_counter() - t
                tm = out["timings"]
                rows.append({"prompt": name, "prompt_tokens": tm["prompt_n"], "tokens": tm["predicted_n"],
                             "wall_per_token_ms": 1e3 * wall / tm["predicted_n"],
                             "decode_per_token_ms": tm["predicted_per_token_ms"], "prompt_ms": tm["prompt_ms"]})
    except (RuntimeError, TimeoutError, requests.RequestException) as e:
        return [{"error": "llama-server failed: " + " ".join(str(e).split())[-300:]}]  # one table cell
    return rows


def report(res: dict) -> str:
    lines = [f"engine up {res['engine_up_s']:.1f} s; copy bandwidth {res['copy_bandwidth_gbs']:.1f} GB/s (2 threads)",
             "| prompt | ctx | shape (Sd, NB, P) | wall/token ms | step ms | host ms | compiled ms | forward ms | "
             "floor ms | step / forward |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['prompt']} | {r['prompt_tokens']}+{r['tokens']} | {tuple(r['shape'])} | "
                     f"{r['wall_per_token_ms']:.1f} | {r['step_ms']:.1f} | {r['host_ms']:.2f} | "
                     f"{r['compiled_ms']:.1f} | {r['forward_ms']:.1f} | {r['floor_ms']:.1f} | "
                     f"{r['step_ms'] / r['forward_ms']:.2f} |")
    if isinstance(res["peer"], str):
        lines.append(f"peer: {res['peer']}")
    else:
        lines += ["llama-server (same GGUF, 2 threads, one slot):", "| prompt | ctx | wall/token ms | decode ms/token | "
                  "prompt ms |", "|---|---|---|---|---|"]
        for r in res["peer"]:
            if "error" in r:
                lines.append(f"| {r['error']} |")
                continue
            lines.append(f"| {r['prompt']} | {r['prompt_tokens']}+{r['tokens']} | {r['wall_per_token_ms']:.1f} | "
                         f"{r['decode_per_token_ms']:.1f} | {r['prompt_ms']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=os.path.join(os.path.dirname(HERE), "configs", "smollm2-135m.yaml"))
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--llama-server", help="llama-server binary (default: bench/peers.py finds one)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    from sgl_jax.config import leaf_fields, parse_value

    leaves = leaf_fields()
    overrides = {}
    for item in args.overrides:
        k, _, v = item.partition("=")
        overrides[k] = parse_value(v, leaves[k.rpartition(".")[2]][2])
    res = run(args.config, args.tokens, overrides, args.llama_server)
    print(report(res), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
