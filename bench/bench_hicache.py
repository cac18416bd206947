"""The hierarchical prefix cache: multi-turn chat through a device pool too small for it, and load vs recompute.

    python bench/bench_hicache.py chat  [--config configs/smollm2-135m-int8.yaml] [--convs 8] [--turns 4]
                                        [--system 256] [--question 48] [--answer 128] [--pool-fraction 0.25]
    python bench/bench_hicache.py table [--config ...] [--lengths 16,64,256,1024,4096]
    python bench/bench_hicache.py restart [--config ...] [--prompt 2000] [--disk-dir DIR]
    (all: [--json OUT])

chat: the SGLang paper's synthetic multi-turn workload (seeded random prompts: a system prompt per conversation,
then per turn a question and a long answer, `--answer` greedy tokens with ignore_eos), all conversations' turn t
submitted together, turn after turn, in-process (`Engine`). Three engines on the same preset, one after another:
  unbounded    the preset's pool (holds every conversation): the hit rate an unbounded device cache reaches
  device-only  a pool of `--pool-fraction` of the final working set, `disable_hierarchical_cache` (evicted = lost)
  +host        the same pool with the host tier on (evicted pages move to host memory and are loaded back)
Per engine: hit rate (cached / prompt tokens, as the engine counts them), output tokens/s, wall time, and the host
tier's counters. The floor beside them is the unbounded engine's own run (everything reused; the compute left is
what no cache can save). Peer: skipped (llama-server keeps one slot's prompt per slot, no tiered prefix cache to
compare with).

restart: a `--prompt`-token prompt (random tokens) served by an engine with a disk tier (`cache.disk_dir`, a fresh
temporary directory unless given), the engine shut down, a new engine on the same directory, the same prompt: the
time to its first token (greedy, 1 output token) cold against after the restart, and the pages read back.

table: for each prefix length, one engine (host tier on) times a request of that many cached tokens plus one new
token both ways: recomputed (the cache flushed first) and loaded from the host tier (the prefix served once, then
every device page demoted), and prints the cost model's choice (`TransferCosts.load_pays`) beside the faster one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def _engine(config: str, **overrides):
    from sgl_jax.config import load_config
    from sgl_jax.engine import Engine

    return Engine(load_config(config, overrides).engine, progress=False)


def _conversations(n, system, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(100, 40000) for _ in range(system)] for _ in range(n)]


def run_chat(engine, convs, turns, question, answer, seed=1) -> dict:
    rng = random.Random(seed)
    hist = [list(c) for c in convs]
    sp = {"temperature": 0, "max_new_tokens": answer, "ignore_eos": True}
    prompt = cached = out = 0
    t0 = time.perf_counter()
    for _ in range(turns):
        for h in hist:
            h += [rng.randrange(100, 40000) for _ in range(question)]
        res = engine.generate(input_ids=hist, sampling_params=sp)
        for h, r in zip(hist, res):
            h += r["output_ids"]
            prompt += r["meta_info"]["prompt_tokens"]
            cached += r["meta_info"]["cached_tokens"]
            out += len(r["output_ids"])
    wall = time.perf_counter() - t0
    st = engine.stats()
    return {"wall_s": wall, "prompt_tokens": prompt, "cached_tokens": cached, "hit_rate": cached / prompt,
            "output_tokens": out, "out_tok_s": out / wall, "tiers": st["cache_tiers"],
            "steps": st["num_steps"], "decode_steps": st["num_decode_steps"], "retractions": st["num_retractions"],
            "final_tokens": sum(len(h) for h in hist)}


def chat(args) -> dict:
    convs = _conversations(args.convs, args.system)
    per_conv = args.system + args.turns * (args.question + args.answer)
    ps = 16
    ctx = per_conv + 64
    pool_pages = max(int(args.pool_fraction * args.convs * per_conv / ps), -(-ctx // ps) + 1)
    common = dict(max_context_len=ctx)
    results = {}
    for name, kw in (("unbounded", {}),
                     ("device-only", dict(max_num_pages=pool_pages + 1, disable_hierarchical_cache=True)),
                     ("+host", dict(max_num_pages=pool_pages + 1))):
        e = _engine(args.config, **common, **kw)
        try:
            e.wait_compiled()
            run_chat(e, convs[:1], 1, args.question, 4, seed=99)  # first-use compilations outside the timing
            e.flush_cache()
            results[name] = run_chat(e, convs, args.turns, args.question, args.answer)
        finally:
            e.shutdown()
        r = results[name]
        print(f"  {name}: hit {r['hit_rate']:.1%}, {r['out_tok_s']:.1f} out tok/s, {r['wall_s']:.1f} s",
              file=sys.stderr, flush=True)
    ws = results["unbounded"]["final_tokens"]
    print(f"multi-turn chat: {args.convs} conversations x {args.turns} turns (system {args.system}, question "
          f"{args.question}, answer {args.answer} tokens); working set {ws} tokens, small pool {pool_pages} pages of "
          f"{ps} ({pool_pages * ps / ws:.0%} of it); floor: the unbounded run; peer: skipped (see the docstring)")
    print("| cache | hit rate | output tok/s | wall s | steps (decode) | retractions | demoted | loaded pages | "
          "host tokens loaded |\n|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        t = r["tiers"]
        print(f"| {name} | {r['hit_rate']:.1%} | {r['out_tok_s']:.1f} | {r['wall_s']:.1f} | {r['steps']} "
              f"({r['decode_steps']}) | {r['retractions']} | {t['pages_demoted']} | {t['pages_promoted']} | "
              f"{t['host_tokens_loaded']} |")
    h, d, u = results["+host"], results["device-only"], results["unbounded"]
    print(f"+host vs device-only: throughput {h['out_tok_s'] / d['out_tok_s']:.2f}x (target >= 1.5x); hit rate "
          f"{h['hit_rate']:.1%} vs unbounded {u['hit_rate']:.1%} ({100 * (u['hit_rate'] - h['hit_rate']):.1f} points; "
          f"target <= 5)")
    return {"pool_pages": pool_pages, "working_set_tokens": ws, "results": results}


def table(args) -> dict:
    lengths = [int(x) for x in args.lengths.split(",")]
    longest = max(lengths) + 64
    e = _engine(args.config, max_context_len=longest, page_width_buckets=[-(-longest // 16)])
    rows = []
    try:
        e.wait_compiled()
        s = e.scheduler
        costs = s.transfer_costs
        rng = random.Random(3)
        sp = {"temperature": 0, "max_new_tokens": 1, "ignore_eos": True}

        def timed(ids):
            t0 = time.perf_counter()
            r = e.generate(input_ids=ids, sampling_params=sp)
            return time.perf_counter() - t0, r["meta_info"]["cached_tokens"]

        def demote_all():
            e.loop.call(lambda: s.cache.evict(s.cache.evictable_pages))

        timed([rng.randrange(100, 40000) for _ in range(40)])  # first-use compilations
        for n in lengths:
            ids = [rng.randrange(100, 40000) for _ in range(n + 1)]
            recompute, load = [], []
            for _ in range(args.repeats):
                e.flush_cache()
                t, c = timed(ids)
                assert c == 0, c
                recompute.append(t)
                demote_all()
                t, c = timed(ids)
                load.append(t)
                loaded = c
            rc, ld = min(recompute), min(load)
            choice = "load" if costs.load_pays(n) else "recompute"
            best = "load" if ld < rc else "recompute"
            taken = ld if choice == "load" else rc
            rows.append({"tokens": n, "recompute_s": rc, "load_s": ld, "cached_on_load": loaded, "choice": choice,
                         "faster": best, "choice_vs_best": taken / min(rc, ld)})
            print(f"  {n}: recompute {1e3 * rc:.1f} ms, load {1e3 * ld:.1f} ms ({loaded} cached)", file=sys.stderr,
                  flush=True)
    finally:
        e.shutdown()
    print(f"load vs recompute (a request of n cached tokens + 1 new, host tier -> device vs prefill; best of "
          f"{args.repeats}); cost model: {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in costs.as_dict().items()})}")
    print("| prefix tokens | recompute ms | load ms | tokens loaded | model's choice | faster | choice / faster |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']} | {1e3 * r['recompute_s']:.1f} | {1e3 * r['load_s']:.1f} | {r['cached_on_load']} | "
              f"{r['choice']} | {r['faster']} | {r['choice_vs_best']:.2f} |")
    return {"costs": costs.as_dict(), "rows": rows}


def restart(args) -> dict:
    import tempfile

    disk = args.disk_dir or tempfile.mkdtemp(prefix="sgl_jax_disk_")
    ids = [random.Random(7).randrange(100, 40000) for _ in range(args.prompt)]
    sp = {"temperature": 0, "max_new_tokens": 1, "ignore_eos": True}
    ctx = max(2048, args.prompt + 64)
    kw = dict(disk_dir=disk, max_context_len=ctx, page_width_buckets=[-(-ctx // 16)])
    times, outs, tiers = [], [], []
    for run in ("cold, no disk tier", "cold", "after restart"):
        e = _engine(args.config, **dict(kw, disk_dir="") if run.endswith("no disk tier") else kw)
        try:
            e.wait_compiled()
            e.generate(input_ids=[5, 6, 7], sampling_params=sp)  # first-use compilations outside the timing
            t0 = time.perf_counter()
            r = e.generate(input_ids=ids, sampling_params=sp)
            times.append(time.perf_counter() - t0)
            outs.append(r)
            tiers.append(e.stats()["cache_tiers"])
        finally:
            e.shutdown()
        print(f"  {run}: {1e3 * times[-1]:.0f} ms, {r['meta_info']['cached_tokens']} cached", file=sys.stderr,
              flush=True)
    same = outs[1]["output_ids"] == outs[2]["output_ids"] == outs[0]["output_ids"]
    print(f"warm restart: a {args.prompt}-token prompt, time to first token cold {1e3 * times[1]:.0f} ms (without a "
          f"disk tier {1e3 * times[0]:.0f} ms: the write-through costs {times[1] / times[0] - 1:+.0%}), after a restart "
          f"{1e3 * times[2]:.0f} ms: {times[1] / times[2]:.1f}x faster than cold (target >= 3x); "
          f"{outs[2]['meta_info']['cached_tokens']} tokens cached, {tiers[2].get('disk_read', 0)} pages read from "
          f"{disk} ({tiers[2].get('disk_bytes', 0) / 1e6:.0f} MB on disk); same first token: {same}")
    return {"ttft_s": times, "cached": [o["meta_info"]["cached_tokens"] for o in outs], "tiers": tiers,
            "disk_dir": disk}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["chat", "table", "restart"])
    ap.add_argument("--config", default=os.path.join(os.path.dirname(HERE), "configs", "smollm2-135m-int8.yaml"))
    ap.add_argument("--convs", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--system", type=int, default=256)
    ap.add_argument("--question", type=int, default=48)
    ap.add_argument("--answer", type=int, default=128)
    ap.add_argument("--pool-fraction", type=float, default=0.25)
    ap.add_argument("--lengths", default="16,64,256,1024,4096")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=2000)
    ap.add_argument("--disk-dir", default="")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    out = {"chat": chat, "table": table, "restart": restart}[args.what](args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), **out}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
