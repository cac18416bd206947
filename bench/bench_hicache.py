"""The hierarchical prefix cache: multi-turn chat through a device pool too small for it, and load vs recompute.

    python bench/bench_hicache.py chat  [--config configs/smollm2-135m-int8.yaml] [--convs 8] [--turns 4]
                                        [--system 256] [--question 48] [--answer 128] [--active K]
                                        [--pool-fraction 0.25] [--host-fraction 0.25] [--disk-dir DIR]
                                        [--touch-host] [--rounds 1]
    python bench/bench_hicache.py table [--config ...] [--lengths 16,64,256,1024,4096] [--disk-dir DIR]
    python bench/bench_hicache.py restart [--config ...] [--prompt 2000] [--disk-dir DIR]
    (all: [--json OUT])

chat: the SGLang paper's synthetic multi-turn workload (seeded random prompts: a system prompt per conversation,
then per turn a question and a long answer, `--answer` greedy tokens with ignore_eos), in-process (`Engine`): all
conversations' turn t submitted together, turn after turn (`--active 0`, the default: the small pool then also
bounds how many conversations decode at once), or users taking turns (`--active K`: the turns in round-robin
order, at most K in flight, so the pool holds the active conversations and the rest wait between turns -- the
case a host tier is for; the paper's proportions are `--question` = `--answer`). `--touch-host` faults the host
tier's slots in before the timed run (a first touch of fresh memory is slow on some VMs; see host_pool.py).
Three engines on the same preset, one after another:
  unbounded    the preset's pool (holds every conversation): the hit rate an unbounded device cache reaches
  device-only  a pool of `--pool-fraction` of the final working set, `disable_hierarchical_cache` (evicted = lost)
  +host        the same pool with the host tier on (evicted pages move to host memory and are loaded back)
and, with `--host-fraction` > 0, three more with a host tier of that fraction of the working set too, so pages
fall out of host memory as well:
  +small host                 the small pool and the small host tier, no disk tier (dropped = lost)
  +small host +disk (through) the same with a disk tier written through (every page once, as it is computed)
  +small host +disk (back)    the same written back (only pages the host tier drops)
Per engine: hit rate (cached / prompt tokens, as the engine counts them), output tokens/s, wall time, and the host
tier's counters, and where the wall time went (decode-only steps, steps with prompt tokens, host work). The
ceiling printed last is the most any cache could gain over device-only on this pool: the pool, not the cache, sets
how many conversations decode at once, so +host's decode seconds plus the prompt work no cache saves (the unbounded
run's prefill seconds) bound its wall time from below. The floor beside them is the unbounded engine's own run
(everything reused; the compute left is what no cache can save). Peer: skipped (llama-server keeps one slot's
prompt per slot, no tiered prefix cache to compare with).

restart: a `--prompt`-token prompt (random tokens) served by an engine with a disk tier (`cache.disk_dir`, a fresh
temporary directory unless given), the engine shut down, a new engine on the same directory, the same prompt: the
time to its first token (greedy, 1 output token) cold against after the restart, and the pages read back.

table: for each prefix length, one engine (host and disk tiers on) times a request of that many cached tokens plus
one new token three ways: recomputed (every tier flushed first), loaded from the host tier (the prefix served once,
then every device page demoted), and read from the disk tier (the prefix served once and written, then the device
and host tiers emptied; the files also dropped from the OS's page cache with posix_fadvise(DONTNEED) for the cold
column, where the platform has it), and prints the cost model's choices (`TransferCosts.load_pays`, `disk_pays`)
beside the faster one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
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


def run_chat(engine, convs, turns, question, answer, seed=1, active=0) -> dict:
    """The conversations' turns through `engine`, greedy, `answer` tokens each (ignore_eos). active=0: every
    conversation's turn t submitted together, turn after turn. active=K: users taking turns -- the turns in
    round-robin order (every conversation's turn 1, then every turn 2, ...), at most K requests in flight, a
    conversation's next turn submitted once its previous answer is back (K threads)."""
    import threading

    rng = random.Random(seed)
    hist = [list(c) for c in convs]
    questions = [[[rng.randrange(100, 40000) for _ in range(question)] for _ in convs] for _ in range(turns)]
    sp = {"temperature": 0, "max_new_tokens": answer, "ignore_eos": True}
    tot = {"prompt": 0, "cached": 0, "out": 0}
    steps = {"decode_s": 0.0, "decode_rows": 0, "decode_steps": 0, "prefill_s": 0.0, "host_s": 0.0}

    def on_step(info):  # where the wall time goes: decode-only steps, steps with prompt tokens, host work
        if info.plan.prefills:
            steps["prefill_s"] += info.step_seconds
        else:
            steps["decode_s"] += info.step_seconds
            steps["decode_rows"] += len(info.plan.decodes)
            steps["decode_steps"] += 1
        steps["host_s"] += info.host_seconds

    def count(h, r):
        h += r["output_ids"]
        tot["prompt"] += r["meta_info"]["prompt_tokens"]
        tot["cached"] += r["meta_info"]["cached_tokens"]
        tot["out"] += len(r["output_ids"])

    engine.add_step_listener(on_step)
    t0 = time.perf_counter()
    if active <= 0:
        for t in range(turns):
            for h, q in zip(hist, questions[t]):
                h += q
            for h, r in zip(hist, engine.generate(input_ids=hist, sampling_params=sp)):
                count(h, r)
    else:
        order = [(t, c) for t in range(turns) for c in range(len(convs))]
        done = [[threading.Event() for _ in convs] for _ in range(turns)]
        lock, errors = threading.Lock(), []

        def user():
            while True:
                with lock:
                    if not order:
                        return
                    t, c = order.pop(0)
                if t:
                    done[t - 1][c].wait()
                try:
                    r = engine.generate(input_ids=hist[c] + questions[t][c], sampling_params=sp)
                    with lock:
                        hist[c] += questions[t][c]
                        count(hist[c], r)
                except Exception as e:  # noqa: BLE001 -- reported after the run, the others go on
                    errors.append(e)
                done[t][c].set()

        threads = [threading.Thread(target=user) for _ in range(active)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if errors:
            raise errors[0]
    wall = time.perf_counter() - t0
    st = engine.stats()
    return {"wall_s": wall, "prompt_tokens": tot["prompt"], "cached_tokens": tot["cached"],
            "hit_rate": tot["cached"] / tot["prompt"], "output_tokens": tot["out"], "out_tok_s": tot["out"] / wall,
            "tiers": st["cache_tiers"], "steps": st["num_steps"], "decode_steps": st["num_decode_steps"],
            "retractions": st["num_retractions"], "final_tokens": sum(len(h) for h in hist), "step_split": steps}


def _chat_round(args, runs, convs, common: dict, touch_slots: int, host_pages: int) -> dict:
    """One engine per configuration in `runs` (name, engine overrides), one after another: {name: run_chat's}.
    `touch_slots`: the host slots `--touch-host` faults in (a working set's pages and some)."""
    results, page_bytes = {}, 0
    for name, kw in runs:
        if kw.get("host_memory_gb") == -1.0:  # host_pages pages of this preset's size
            kw = dict(kw, host_memory_gb=(host_pages + 0.5) * page_bytes / (1 << 30))
        e = _engine(args.config, **common, **kw)
        page_bytes = e.runner.page_bytes
        try:
            e.wait_compiled()
            run_chat(e, convs[:1], 1, args.question, 4, seed=99)  # first-use compilations outside the timing
            e.flush_cache()  # every tier, the disk's files too
            arena = e.runner.host_arena
            if args.touch_host and arena is not None:  # the slots a working set can use, faulted in untimed
                t0 = time.perf_counter()
                arena[:min(len(arena), touch_slots)].fill(0)
                print(f"  {name}: host slots touched in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            results[name] = run_chat(e, convs, args.turns, args.question, args.answer, active=args.active)
        finally:
            e.shutdown()
        r = results[name]
        print(f"  {name}: hit {r['hit_rate']:.1%}, {r['out_tok_s']:.1f} out tok/s, {r['wall_s']:.1f} s",
              file=sys.stderr, flush=True)
    return results


def chat(args) -> dict:
    """The chat workload's configurations, `--rounds` times (device-only and +host in swapped order every other
    round, so a drifting machine favours neither), each round's tables, and with several rounds the ratios'
    median."""
    convs = _conversations(args.convs, args.system)
    per_conv = args.system + args.turns * (args.question + args.answer)
    ps = 16
    ctx = per_conv + 64
    pool_pages = max(int(args.pool_fraction * args.convs * per_conv / ps), -(-ctx // ps) + 1)
    small = dict(max_num_pages=pool_pages + 1)
    runs = [("unbounded", {}), ("device-only", dict(small, disable_hierarchical_cache=True)), ("+host", small)]
    host_pages, disk = 0, ""
    if args.host_fraction > 0:
        import tempfile

        host_pages = max(int(args.host_fraction * args.convs * per_conv / ps), 1)
        disk = args.disk_dir or tempfile.mkdtemp(prefix="sgl_jax_disk_")
        runs += [("+small host", dict(small, host_memory_gb=-1.0)),
                 ("+small host +disk (through)", dict(small, host_memory_gb=-1.0, disk_dir=disk)),
                 ("+small host +disk (back)", dict(small, host_memory_gb=-1.0, disk_dir=disk,
                                                   write_policy="write_back"))]
    rounds = []
    for i in range(args.rounds):
        order = runs if i % 2 == 0 else [runs[0], runs[2], runs[1]] + runs[3:]
        results = _chat_round(args, order, convs, dict(max_context_len=ctx), args.convs * per_conv // ps + 64,
                              host_pages)
        rounds.append({name: results[name] for name, _ in runs})
        if args.rounds > 1:
            print(f"round {i + 1} of {args.rounds}")
        _chat_report(args, rounds[-1], pool_pages, host_pages, disk)
    if args.rounds > 1:
        ratios = [r["+host"]["out_tok_s"] / r["device-only"]["out_tok_s"] for r in rounds]
        print(f"+host vs device-only over {args.rounds} rounds: " + ", ".join(f"{x:.2f}x" for x in ratios) +
              f"; median {statistics.median(ratios):.2f}x (target >= 1.5x)")
    return {"pool_pages": pool_pages, "working_set_tokens": rounds[0]["unbounded"]["final_tokens"],
            "results": rounds[0], "rounds": rounds}


def _chat_report(args, results: dict, pool_pages: int, host_pages: int, disk: str) -> None:
    """One round's tables: per configuration its hit rate, throughput and tier counters, where the time went, the
    target's ratios and the ceiling."""
    ps = 16
    ws = results["unbounded"]["final_tokens"]
    print(f"multi-turn chat: {args.convs} conversations x {args.turns} turns (system {args.system}, question "
          f"{args.question}, answer {args.answer} tokens); working set {ws} tokens, small pool {pool_pages} pages of "
          f"{ps} ({pool_pages * ps / ws:.0%} of it); floor: the unbounded run; peer: skipped (see the docstring)")
    if args.host_fraction > 0:
        print(f"small host tier: {host_pages} pages ({host_pages * ps / ws:.0%} of the working set); disk tier {disk}")
    print("| cache | hit rate | output tok/s | wall s | steps (decode) | retractions | demoted (into a host copy) | "
          "loaded pages | host tokens loaded | host pages dropped | disk pages written | disk tokens read |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        t = r["tiers"]
        print(f"| {name} | {r['hit_rate']:.1%} | {r['out_tok_s']:.1f} | {r['wall_s']:.1f} | {r['steps']} "
              f"({r['decode_steps']}) | {r['retractions']} | {t['pages_demoted']} ({t['pages_demoted_by_copy']}) | "
              f"{t['pages_promoted']} | "
              f"{t['host_tokens_loaded']} | {t['host_pages_dropped']} | {t.get('disk_written', '-')} | "
              f"{t.get('disk_tokens_read', '-')} |")
    print("\nwhere the time goes (seconds; decode: steps with no prompt tokens, prefill: steps with some, host: "
          "scheduling and postprocessing, demotions' copies included)\n"
          "| cache | decode s | rows per decode step | prefill s | host s |\n|---|---|---|---|---|")
    for name, r in results.items():
        sp = r["step_split"]
        print(f"| {name} | {sp['decode_s']:.1f} | {sp['decode_rows'] / max(sp['decode_steps'], 1):.2f} | "
              f"{sp['prefill_s']:.1f} | {sp['host_s']:.1f} |")
    h, d, u = results["+host"], results["device-only"], results["unbounded"]
    print(f"+host vs device-only: throughput {h['out_tok_s'] / d['out_tok_s']:.2f}x (target >= 1.5x); hit rate "
          f"{h['hit_rate']:.1%} vs unbounded {u['hit_rate']:.1%} ({100 * (u['hit_rate'] - h['hit_rate']):.1f} points; "
          f"target <= 5)")
    # The most any cache can give on this pool: +host's own decode steps (the pool sets how many rows fit) plus the
    # prompt work no cache saves (the unbounded run's prefill steps), with free copies and no host work.
    ceiling = d["wall_s"] / (h["step_split"]["decode_s"] + u["step_split"]["prefill_s"])
    print(f"ceiling on this pool: device-only wall / (+host decode s + unbounded prefill s) = {ceiling:.2f}x")
    for name in [n for n in results if "disk" in n]:
        r, sh = results[name], results["+small host"]
        print(f"{name} vs +small host: hit {r['hit_rate']:.1%} vs {sh['hit_rate']:.1%}, throughput "
              f"{r['out_tok_s'] / sh['out_tok_s']:.2f}x; vs device-only {r['out_tok_s'] / d['out_tok_s']:.2f}x")


def _drop_os_cache(directory: str) -> bool:
    """Ask the OS to forget the cached contents of every page file under `directory` (no root needed)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for root, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return True


def table(args) -> dict:
    """Longer than ~80 lines: one measurement loop per row with its three ways, then the table."""
    import tempfile

    lengths = [int(x) for x in args.lengths.split(",")]
    longest = max(lengths) + 64
    disk = args.disk_dir or tempfile.mkdtemp(prefix="sgl_jax_disk_")
    e = _engine(args.config, max_context_len=longest, page_width_buckets=[-(-longest // 16)], disk_dir=disk)
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
            dt = time.perf_counter() - t0
            e.loop.call(s.disk.write_fresh)  # the write-through of its pages, outside the timing
            return dt, r["meta_info"]["cached_tokens"]

        def demote_all():
            e.loop.call(lambda: s.cache.evict(s.cache.evictable_pages))

        def memory_tiers_off():  # the device and host tiers emptied, the disk's files kept
            e.loop.call(s.cache.reset)

        timed([rng.randrange(100, 40000) for _ in range(40)])  # first-use compilations
        cold_ok = True
        for n in lengths:
            ids = [rng.randrange(100, 40000) for _ in range(n + 1)]
            got = {"recompute": [], "load": [], "disk": [], "disk cold": []}
            cached = {}
            for _ in range(args.repeats):
                e.flush_cache()
                t, c = timed(ids)
                assert c == 0, c
                got["recompute"].append(t)
                demote_all()
                t, cached["load"] = timed(ids)
                got["load"].append(t)
                for way in ("disk", "disk cold"):
                    memory_tiers_off()
                    if way == "disk cold":
                        cold_ok = _drop_os_cache(disk) and cold_ok
                    t, cached[way] = timed(ids)
                    got[way].append(t)
            best = {k: min(v) for k, v in got.items()}
            choice = {"load": "load" if costs.load_pays(n) else "recompute",
                      "disk": "disk" if costs.disk_pays(n) else "recompute"}
            row = {"tokens": n, **{f"{k.replace(' ', '_')}_s": v for k, v in best.items()},
                   "tokens_from_disk": cached["disk"], "choice_host": choice["load"], "choice_disk": choice["disk"]}
            for tier, way in (("host", "load"), ("disk", "disk"), ("disk_cold", "disk cold")):
                taken = best[way] if choice["disk" if tier != "host" else "load"] != "recompute" else best["recompute"]
                row[f"{tier}_choice_vs_best"] = taken / min(best["recompute"], best[way])
            rows.append(row)
            print(f"  {n}: " + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in best.items()), file=sys.stderr,
                  flush=True)
    finally:
        e.shutdown()
    print(f"load vs recompute (a request of n cached tokens + 1 new, greedy, 1 output token; best of {args.repeats}):"
          f" host tier -> device, disk -> host -> device (the OS's page cache warm; cold: "
          f"{'dropped with posix_fadvise' if cold_ok else 'not available here, same as warm'}), against prefill; "
          f"cost model: {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in costs.as_dict().items()})}")
    print("| prefix tokens | recompute ms | host load ms | disk ms | disk cold ms | tokens from disk | choice: host hit | "
          "choice: disk hit | host choice / best | disk choice / best | disk cold choice / best |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']} | {1e3 * r['recompute_s']:.1f} | {1e3 * r['load_s']:.1f} | {1e3 * r['disk_s']:.1f} | "
              f"{1e3 * r['disk_cold_s']:.1f} | {r['tokens_from_disk']} | {r['choice_host']} | {r['choice_disk']} | "
              f"{r['host_choice_vs_best']:.2f} | {r['disk_choice_vs_best']:.2f} | {r['disk_cold_choice_vs_best']:.2f} |")
    return {"costs": costs.as_dict(), "rows": rows, "disk_dir": disk}


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
    ap.add_argument("--active", type=int, default=0, help="chat: users taking turns, at most this many requests "
                    "in flight (0: every conversation's turn together)")
    ap.add_argument("--touch-host", action="store_true", help="chat: fault the host tier's slots in before the "
                    "timed run (a server whose host tier has been used once)")
    ap.add_argument("--pool-fraction", type=float, default=0.25)
    ap.add_argument("--host-fraction", type=float, default=0.25, help="chat: the small host tier's share of the "
                    "working set for the three small-host rows (0: leave them out)")
    ap.add_argument("--lengths", default="16,64,256,1024,4096")
    ap.add_argument("--repeats", type=int, default=2, help="table: best of this many")
    ap.add_argument("--rounds", type=int, default=1, help="chat: run the configurations this many times "
                    "(device-only and +host swapped every other round) and print the ratios' median")
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
