"""`python -m bench.programs`: see bench/programs/__init__.py and runner.py."""

from __future__ import annotations

import argparse
import os
import sys

import bench.programs as package
from bench.programs import WORKLOADS, common, parse_workloads, runner


def parse_set(items: list[str]) -> dict:
    """`key=value` engine/server overrides, typed as the config field is (sgl_jax.config)."""
    from sgl_jax.config import leaf_fields, parse_value, resolve_key

    out = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        section, path = resolve_key(key.strip())
        tp = leaf_fields()[path[-1]][2] if section == "engine" else str
        out[path[-1]] = parse_value(text, tp)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.programs", description=package.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="all", help=f"all, or a comma list of: {', '.join(WORKLOADS)}")
    ap.add_argument("--backend", default="engine",
                    help="engine, http or upstream; a comma list (e.g. engine,http) runs each in turn, --rounds times")
    ap.add_argument("--rounds", type=int, default=1,
                    help="with several backends: alternate them this many times and print them side by side")
    ap.add_argument("--data", default=common.DEFAULT_DATA, help="the workload data folder (shared/workloads)")
    ap.add_argument("--full", action="store_true", help="the paper's sizes (default: the CPU sizes)")
    ap.add_argument("--json", dest="json_path", default=None, help="write the results here")
    ap.add_argument("--n", type=int, default=None, help="programs per workload (default: the scale's)")
    ap.add_argument("--latency-programs", type=int, default=8,
                    help="programs run one at a time for latency (beyond a workload's throughput batch: more loaded)")
    ap.add_argument("--paired-latency", type=int, default=0, metavar="N",
                    help="with several backends: only single-program latency, N programs a workload, each program "
                         "on every backend in turn with all of them alive at once (no throughput runs)")
    ap.add_argument("--paired-throughput", type=int, default=0, metavar="R",
                    help="with several backends: only throughput, R rounds a workload, each round the workload's "
                         "batch on every backend in turn with all of them alive at once")
    ap.add_argument("--threads", type=int, default=None, help="run_batch num_threads (default: auto, or the "
                    "workload's own, e.g. 1 for generative agents)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default=runner.DEFAULT_CONFIG, help="engine/server preset")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="engine config override, e.g. --set max_running_requests=32 (repeatable)")
    ap.add_argument("--url", default=None, help="an already running server for http/upstream")
    ap.add_argument("--ablations", nargs="?", const="all", default="",
                    help="also run these settings, each on a fresh engine/server: all, or a comma list of "
                         "radix (cache off), dfs (dfs-weight), fcfs, jf (jump-forward off, JSON only)")
    ap.add_argument("--peer", choices=["auto", "off", "only"], default="auto",
                    help="auto: also run llama.cpp's llama-server (--llama-server, on PATH, or the build of "
                         "bench/build_llama_server.sh) on the same GGUF; only: just the peer")
    ap.add_argument("--llama-server", default=None, help="the llama-server binary for the peer run")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.data):
        raise SystemExit(f"--data {args.data}: no such folder")
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    bad = [b for b in backends if b not in ("engine", "http", "upstream")]
    if bad or not backends:
        raise SystemExit(f"--backend {args.backend}: each must be engine, http or upstream")
    if args.rounds < 1:
        raise SystemExit(f"--rounds {args.rounds}: at least 1")
    kw = dict(data_dir=args.data, full=args.full, n=args.n, latency_programs=args.latency_programs, seed=args.seed,
              threads=args.threads, config=args.config, overrides=parse_set(args.overrides), url=args.url,
              ablations=args.ablations, json_path=args.json_path, llama_server=args.llama_server,
              peer={"auto": True, "off": False}.get(args.peer, args.peer))
    if args.paired_latency or args.paired_throughput:
        if len(backends) < 2 or args.url or (args.paired_latency and args.paired_throughput):
            raise SystemExit("--paired-latency / --paired-throughput: one of them, two or more backends (e.g. "
                             "--backend engine,http), no --url")
        if args.paired_latency:
            runner.paired_latency(backends, parse_workloads(args.workloads), args.paired_latency, **kw)
        else:
            runner.paired_throughput(backends, parse_workloads(args.workloads), args.paired_throughput, **kw)
    elif len(backends) == 1 and args.rounds == 1:
        runner.run(backends[0], parse_workloads(args.workloads), **kw)
    else:
        runner.run_rounds(backends, args.rounds, parse_workloads(args.workloads), **kw)


if __name__ == "__main__":
    sys.exit(main())
