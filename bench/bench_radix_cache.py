"""Micro-benchmark of the host-side RadixCache (not a test).

Inserts N requests that share a few long "system prompt" prefixes, then times
match_prefix (hits on the full request, ending inside edges so splits happen),
peek_prefix_len, lock/unlock, and evict in small chunks until the tree is empty.

    .venv/bin/python bench/bench_radix_cache.py [--requests 10000] [--page-size 16]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sgl_jax.cache import PageAllocator, RadixCache  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--prefixes", type=int, default=100)
    ap.add_argument("--prefix-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rng = random.Random(args.seed)
    ps = args.page_size
    vocab = 32_000
    prefixes = [[rng.randrange(vocab) for _ in range(args.prefix_len)] for _ in range(args.prefixes)]
    reqs = []
    for _ in range(args.requests):
        base = prefixes[rng.randrange(len(prefixes))]
        cut = rng.randrange(len(base) // 2, len(base) + 1)  # share a random part of the prefix
        tail = [rng.randrange(vocab) for _ in range(rng.randrange(32, 512))]
        reqs.append(base[:cut] + tail)
    total_tokens = sum(len(r) for r in reqs)
    alloc = PageAllocator(total_tokens // ps + 2)
    cache = RadixCache(alloc, ps)

    t0 = time.perf_counter()
    for r in reqs:
        n = len(r) // ps
        cache.insert(r[: n * ps], alloc.alloc(n))
    t_ins = time.perf_counter() - t0
    cache.check_integrity()
    print(f"requests={len(reqs)} tokens={total_tokens} page_size={ps} nodes={cache.num_nodes} cached_pages={cache.cached_pages}")
    print(f"insert:          {t_ins / len(reqs) * 1e6:8.1f} us/op  (avg {total_tokens / len(reqs):.0f} tokens)")

    queries = [r + [rng.randrange(vocab) for _ in range(7)] for r in rng.sample(reqs, len(reqs))]
    t0 = time.perf_counter()
    hit = 0
    for q in queries:
        hit += cache.match_prefix(q).num_tokens
    t_match = time.perf_counter() - t0
    print(f"match_prefix:    {t_match / len(queries) * 1e6:8.1f} us/op  (hit {hit / sum(map(len, queries)):.1%} of tokens)")

    t0 = time.perf_counter()
    for q in queries:
        cache.peek_prefix_len(q)
    print(f"peek_prefix_len: {(time.perf_counter() - t0) / len(queries) * 1e6:8.1f} us/op")

    handles = [cache.match_prefix(q).node for q in queries[:1000]]
    t0 = time.perf_counter()
    for h in handles:
        cache.lock(h)
    for h in handles:
        cache.unlock(h)
    print(f"lock+unlock:     {(time.perf_counter() - t0) / len(handles) * 1e6:8.1f} us/pair")

    cache.check_integrity()
    chunk = 16
    calls = freed = 0
    nodes0 = cache.num_nodes
    t0 = time.perf_counter()
    while True:
        k = cache.evict(chunk)
        if not k:
            break
        calls += 1
        freed += k
    t_ev = time.perf_counter() - t0
    assert cache.cached_pages == 0 and alloc.num_free == alloc.num_total
    print(
        f"evict({chunk}):       {t_ev / calls * 1e6:8.1f} us/op  ({t_ev / freed * 1e6:.2f} us/page, "
        f"{t_ev / nodes0 * 1e6:.2f} us/node; {freed} pages, {nodes0} nodes)"
    )


if __name__ == "__main__":
    main()
