"""A `select`'s scoring step: prompt logprobs for N choices after a cached prefix, with the page faults it takes.

    python bench/bench_logprob_step.py [--config configs/smollm2-135m-int8.yaml] [--prefix 850] [--choices 4]
                                       [--choice-tokens 11] [--repeats 8] [--rounds 2] [--json OUT]

Each round starts one engine process per setting of `engine.retain_freed_memory` (false, then true: the setting
is process-wide, so each gets a fresh process). In it, `--repeats` times: the cache flushed, a fresh random
`--prefix`-token prompt prefilled, then the `--choices` continuations of `--choice-tokens` random tokens each
scored with prompt logprobs from two tokens before the prefix's end (what `select` sends; a full-logits step),
and the same again without logprobs (the floor: the same tokens, attention and matmuls, one logits row a
chunk). Printed per setting: each scoring step's wall time and the minor page faults the process took during
it (getrusage), and the medians. Peer: skipped (llama-server returns no logprobs for prompt tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def child(args) -> dict:
    """One engine with the given retain setting; the repeats' (ms, faults) with and without logprobs."""
    sys.path.insert(0, ROOT)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from sgl_jax.config import load_config
    from sgl_jax.engine import Engine

    cfg = load_config(args.config, {"retain_freed_memory": args.retain == "true"}).engine
    eng = Engine(cfg, progress=False)
    eng.wait_compiled()
    rng = random.Random(args.seed)
    vocab = eng.vocab_size
    fresh = lambda n: [rng.randrange(vocab // 8, vocab) for _ in range(n)]  # noqa: E731 -- no cache hits
    out = {"logprobs": [], "plain": []}
    for _ in range(args.repeats):
        for kind in ("logprobs", "plain"):
            eng.flush_cache()
            prefix = fresh(args.prefix)
            eng.generate(input_ids=prefix, sampling_params={"max_new_tokens": 0})
            cands = [prefix + fresh(args.choice_tokens) for _ in range(args.choices)]
            kw = dict(return_logprob=True, logprob_start_len=args.prefix - 2) if kind == "logprobs" else {}
            f0, t0 = faults(), time.perf_counter()
            eng.generate(input_ids=cands, sampling_params={"max_new_tokens": 0, "temperature": 0}, **kw)
            out[kind].append((1e3 * (time.perf_counter() - t0), faults() - f0))
    eng.shutdown()
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "smollm2-135m-int8.yaml"))
    ap.add_argument("--prefix", type=int, default=850)
    ap.add_argument("--choices", type=int, default=4)
    ap.add_argument("--choice-tokens", type=int, default=11)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", dest="json_path")
    ap.add_argument("--retain", help=argparse.SUPPRESS)  # the child process's setting
    args = ap.parse_args(argv)
    if args.retain:
        print(json.dumps(child(args)))
        return
    runs = []
    for rnd in range(1, args.rounds + 1):
        for retain in ("false", "true"):
            cmd = [sys.executable, os.path.abspath(__file__), "--retain", retain, "--config", args.config,
                   "--prefix", str(args.prefix), "--choices", str(args.choices), "--choice-tokens",
                   str(args.choice_tokens), "--repeats", str(args.repeats), "--seed", str(args.seed)]
            p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800)
            if p.returncode != 0:
                sys.exit(f"the child failed:\n{p.stderr[-4000:]}")
            res = json.loads(p.stdout.strip().splitlines()[-1])
            runs.append({"round": rnd, "retain_freed_memory": retain == "true", **res})
            print(f"round {rnd}, retain_freed_memory={retain}:")
            for kind in ("logprobs", "plain"):
                ms = [m for m, _ in res[kind]]
                fl = [f for _, f in res[kind]]
                print(f"  {kind:8s} ms {' / '.join(f'{m:.1f}' for m in ms)}  (median {statistics.median(ms):.1f})")
                print(f"  {'':8s} faults {' / '.join(str(f) for f in fl)}  (median {statistics.median(fl):.0f})")
    print(f"{args.choices} choices x {args.choice_tokens} tokens after a {args.prefix}-token prefix; the floor is "
          "the plain row (the same step without logprobs); peer skipped: llama-server returns no prompt logprobs")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"argv": sys.argv[1:], "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
