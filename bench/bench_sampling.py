"""The sampler's cost per step: penalties, bias and `sample` in one jitted call, beside a floor.

    python bench/bench_sampling.py [--vocab 49152] [--batches 1,32,64] [--repeats 7] [--json OUT]

For each batch size and each kind of request (greedy; greedy with frequency, presence and repetition penalties;
temperature only; top_k=50; top_p=0.9 on peaked logits, decided on the sorted head; top_p=0.9 on flat logits,
which takes the full-vocabulary bisection), the minimum over `--repeats` runs of one jitted call (the CPU is
shared: the minimum is the stable figure). The floor, measured in the same run: one jitted row maximum over the
same [B, V] logits, i.e. one read of them, the least any sampler does. Peer: none here (llama.cpp's sampler runs
inside its server; bench/bench_server.py compares whole served steps).
(This was tests/test_sampling.py's `test_timing_report`, which asserted nothing; the sampler's correctness tests
stay there.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from floors import _best_time  # noqa: E402

from sgl_jax.sampling import (  # noqa: E402
    SamplingBatch,
    apply_penalties_and_bias,
    init_penalty_state,
    record_tokens,
    sample,
)


def _best(fn, repeats: int) -> float:
    """The minimum of `repeats` timed calls after one warm-up, each waited for (floors._best_time)."""
    return _best_time(lambda: jax.block_until_ready(fn()), repeats)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--batches", default="1,32,64")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    V, slots = a.vocab, 64
    rng = np.random.default_rng(11)

    @jax.jit
    def step(logits, sb, state, rows):
        return sample(apply_penalties_and_bias(logits, sb, state, rows), sb).tokens

    floor_fn = jax.jit(lambda x: jnp.max(x, axis=-1))
    state = init_penalty_state(slots, V)
    state = record_tokens(state, jnp.arange(slots), jnp.asarray(rng.integers(0, V, slots), jnp.int32))
    rows, out = [], []
    for B in (int(b) for b in a.batches.split(",")):
        lg = rng.normal(size=(B, V)).astype(np.float32) * 2  # LM-like: a broad background, a few strong candidates
        lg[:, :20] += 12
        peaked, flat = jnp.asarray(lg), jnp.asarray(rng.normal(size=(B, V)).astype(np.float32))
        ids, seeds = jnp.arange(B, dtype=jnp.int32) % slots, np.arange(B)
        mk = lambda **kw: SamplingBatch.make(B, seeds=seeds, **kw)  # noqa: E731
        cases = {"greedy": (peaked, mk()),
                 "greedy+penalties": (peaked, mk(frequency_penalty=0.5, presence_penalty=0.3,
                                                 repetition_penalty=1.2)),
                 "temperature only": (peaked, mk(temperature=0.8)),
                 "top_k=50": (peaked, mk(temperature=0.8, top_k=50)),
                 "top_p=0.9 (peaked)": (peaked, mk(temperature=0.8, top_p=0.9)),
                 "top_p=0.9 (flat, bisect)": (flat, mk(temperature=0.8, top_p=0.9))}
        floor = _best(lambda: floor_fn(peaked), a.repeats)
        for name, (logits, sb) in cases.items():
            t = _best(lambda: step(logits, sb, state, ids), a.repeats)
            rows.append(f"B={B:3d} V={V} {name:26s} {t * 1e3:8.2f} ms   floor (one read) {floor * 1e3:6.3f} ms   "
                        f"{t / floor:6.1f}x")
            out.append(dict(batch=B, vocab=V, case=name, ms=t * 1e3, floor_ms=floor * 1e3))
    print(f"penalties+bias+sample, one jitted call, min of {a.repeats} runs ({jax.devices()[0].device_kind}); "
          "peer: none in this invocation")
    print("\n".join(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
