"""The frontend language's own cost, and the in-process backend against HTTP on fork- and select-heavy programs.

    python bench/bench_frontend.py overhead                  # no model: µs per gen dispatch and per fork branch
    python bench/bench_frontend.py backends [--url URL] [--programs 16]

`overhead`: programs of constant text and gens run on a backend that answers instantly, so the time is the
frontend's (expression building, submission to the state's worker, the worker's execution, variable waits).
Printed beside the floors measured in the same run: a call queued to a worker thread (the least a threaded
interpreter can cost per expression) and a synchronous thread round trip (what fork and join wait for).

`backends`: the same programs (a fork(4)-then-gen program and a select chain), greedy, on (1) `EngineBackend`
in-process, (2) `RuntimeEndpoint` to a server started here on the default preset (or --url), and (3) upstream's
frontend (`sglang==0.5.10`) to the same server, the peer. Prints programs/s for a batch (`run_batch`), mean
latency of one program alone, and the cache hit rate the server or engine reports over each run, beside the
floor: the same requests' model time alone (the engine's own step time summed over the run).
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import sgl_jax.program as sgl  # noqa: E402
from sgl_jax.program.backends.base import Backend, Completion  # noqa: E402


class Instant(Backend):
    def generate(self, prompt, params):
        return Completion("x", {})

    def select(self, prompt, choices, temperature, method):
        return sgl.ChoicesDecision(choices[0], {}), None


def roundtrip_us(n: int = 5000) -> float:
    """One thread hand-off and back (submit, the worker runs it, the caller is woken), per item (best of 3)."""
    best = float("inf")
    for _ in range(3):
        q: queue.SimpleQueue = queue.SimpleQueue()
        back: queue.SimpleQueue = queue.SimpleQueue()

        def worker():
            for _ in range(n):
                q.get()()
                back.put(None)

        t = threading.Thread(target=worker)
        t.start()
        t0 = time.perf_counter()
        for _ in range(n):
            q.put(lambda: None)
            back.get()
        best = min(best, (time.perf_counter() - t0) / n)
        t.join()
    return best * 1e6


def floor_us(n: int = 20000) -> float:
    """One Python call + one queue put/get across threads, per item (best of 3)."""
    best = float("inf")
    for _ in range(3):
        q: queue.SimpleQueue = queue.SimpleQueue()
        done = threading.Event()

        def worker():
            for _ in range(n):
                q.get()()
            done.set()

        t = threading.Thread(target=worker)
        t0 = time.perf_counter()
        t.start()
        for _ in range(n):
            q.put(lambda: None)
        done.wait()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def overhead(args) -> None:
    be = Instant()
    k = 50

    @sgl.function
    def gens(s):
        for i in range(k):
            s += f"Q{i}:" + sgl.gen(f"a{i}", max_tokens=4)

    @sgl.function
    def forks(s, n):
        s += "shared prefix"
        f = s.fork(n)
        f += sgl.gen("x", max_tokens=1)
        f.join()

    def best(fn, reps=5):
        out = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            out = min(out, time.perf_counter() - t0)
        return out

    per_gen = best(lambda: gens.run(backend=be)) / k * 1e6
    per_branch = best(lambda: forks.run(n=64, backend=be)) / 64 * 1e6
    per_prog = best(lambda: forks.run(n=1, backend=be)) * 1e6
    fl, rt = floor_us(), roundtrip_us()
    print(f"frontend overhead (instant backend). Floors measured now: a queued call drained by a worker "
          f"{fl:.1f} µs/item; a synchronous thread round trip {rt:.1f} µs")
    print(f"  per gen dispatch   : {per_gen:8.1f} µs  ({per_gen / fl:.1f}x floor; 2 expressions each)")
    print(f"  per fork branch    : {per_branch:8.1f} µs  (a state, a worker thread, a gen, the join: "
          f"{per_branch / rt:.0f} round trips)")
    print(f"  per program (run)  : {per_prog:8.1f} µs  (fork(1) program: state, trace-free run, end)")


# ------------------------------------------------------------------------------------------------ backends
def programs(lang):
    """The two benchmark programs written once against a frontend module (ours or upstream's)."""

    def fork_prog(s, topic):
        s += "You are a careful assistant. Give short tips.\nTopic: " + topic + "\n"
        f = s.fork(4)
        f += lambda i: f"Tip {i + 1}:" + lang.gen("tip", max_tokens=8, stop="\n")
        f.join()

    def select_prog(s, topic):
        s += "Classify the topic. Topic: " + topic + "\n"
        s += "Is it about food?" + lang.select("food", choices=[" yes", " no"]) + "\n"
        s += "Is it about sport?" + lang.select("sport", choices=[" yes", " no"]) + "\n"
        s += "Is it about travel?" + lang.select("travel", choices=[" yes", " no"]) + "\n"

    return lang.function(fork_prog), lang.function(select_prog)


TOPICS = ["cooking pasta", "running a marathon", "visiting Japan", "learning piano", "saving money",
          "growing tomatoes", "playing chess", "writing essays", "baking bread", "hiking alone",
          "swimming laps", "packing light", "brewing coffee", "cycling to work", "reading more", "camping"]


def _time_backend(name, lang, backend, n, step_seconds):
    fork_p, sel_p = programs(lang)
    batch = [{"topic": t} for t in (TOPICS * 4)[:n]]
    out = {}
    for pname, prog in (("fork4", fork_p), ("select3", sel_p)):
        prog.run(topic="warm-up", backend=backend, temperature=0).text()
        lat = []
        for t in batch[:3]:
            t0 = time.perf_counter()
            prog.run(backend=backend, temperature=0, **t).text()  # upstream's run returns before the end
            lat.append(time.perf_counter() - t0)
        s0 = step_seconds()
        t0 = time.perf_counter()
        states = prog.run_batch(batch, backend=backend, temperature=0, num_threads=64)
        for st in states:
            st.text()
        wall = time.perf_counter() - t0
        busy = step_seconds() - s0
        out[pname] = (n / wall, statistics.mean(lat), busy / wall if busy else None)
    return out


def backends(args) -> None:
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from bench_server import Server

    srv = Server(args.url, os.path.join(ROOT, "configs", "smollm2-135m.yaml"), [])
    import asyncio

    asyncio.run(srv.wait())
    be = sgl.EngineBackend(os.path.join(ROOT, "configs", "smollm2-135m.yaml"))
    be.engine.wait_compiled()

    def server_steps():  # the server process's step time is not visible from here: "model busy" is n/a
        return 0.0

    rows = []
    try:
        rows.append(("ours, in-process engine", _time_backend("engine", sgl, be, args.programs,
                                                              lambda: sum(be.engine.step_times))))
        rows.append(("ours, HTTP", _time_backend("http", sgl, sgl.RuntimeEndpoint(srv.url), args.programs,
                                                 server_steps)))
        try:
            import sglang as upstream

            rows.append(("upstream sglang 0.5.10, HTTP", _time_backend("upstream", upstream,
                                                                      upstream.RuntimeEndpoint(srv.url),
                                                                      args.programs, server_steps)))
        except ImportError:
            print("peer skipped: sglang is not installed (pip install --no-deps sglang==0.5.10)")
    finally:
        be.shutdown()
        srv.stop()
    print(f"{args.programs} programs per batch, greedy, SmolLM2-135M on this CPU")
    print(f"{'frontend / backend':32s} {'program':8s} {'batch prog/s':>12s} {'1-program s':>12s} {'model busy':>10s}")
    for name, res in rows:
        for pname, (pps, lat, busy) in res.items():
            b = f"{busy:9.0%}" if busy is not None else "       n/a"
            print(f"{name:32s} {pname:8s} {pps:12.2f} {lat:12.3f} {b}")
    print("model busy = the engine's step time / wall time over the batch (the floor: 100% means the frontend "
          "and transport add nothing the model waits on); measured in-process only")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["overhead", "backends"])
    ap.add_argument("--url", default=None)
    ap.add_argument("--programs", type=int, default=16)
    args = ap.parse_args()
    overhead(args) if args.what == "overhead" else backends(args)


if __name__ == "__main__":
    main()
