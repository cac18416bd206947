"""What the multi-host step channel adds to a step (sgl_jax/parallel/multihost.py).

Rank 0 pickles every step's packed inputs and sends them to each other rank before running the step. This
measures, for decode steps of the default int8 preset (SmolLM2-135M), the payload's size, the time to pickle it,
send it over loopback TCP and unpickle it on the other side (a receiver thread: the work a rank does before it can
start the step), beside the step itself (timed here, one process, one device) and beside the floor for moving
those bytes: the payload over this machine's loopback bandwidth, measured in the same run with a 64 MiB buffer.
There is no peer run: SGLang's multi-node mode broadcasts its scheduler output by torch.distributed, which is not
installed here (skipped).

    python bench/bench_multihost.py [--rows 1,32,64] [--repeats 50]
"""

from __future__ import annotations

import argparse
import os
import pickle
import socket
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from sgl_jax.parallel import multihost  # noqa: E402
from sgl_jax.shapes import StepShape  # noqa: E402


def loopback_pair():
    srv = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(srv.getsockname())
    b, _ = srv.accept()
    srv.close()
    for s in (a, b):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return a, b


def loopback_floor(a, b, size=64 << 20) -> tuple[float, float]:
    """(bytes per second through one loopback TCP connection, one-way latency of a 1-byte message): best of 5
    each, so that a payload of n bytes cannot arrive sooner than latency + n / bandwidth on this machine."""
    return size / _one_way(a, b, b"\x01" * size), _one_way(a, b, b"\x01")


def _one_way(a, b, buf) -> float:
    done = threading.Event()

    def recv():
        multihost._recv(b)
        done.set()

    best = float("inf")
    for _ in range(5):
        done.clear()
        t = threading.Thread(target=recv)
        t.start()
        t0 = time.perf_counter()
        multihost._send(a, buf)
        done.wait()
        best = min(best, time.perf_counter() - t0)
        t.join()
    return best


def channel_round(a, b, payload_obj, repeats: int) -> tuple[int, float, float]:
    """(bytes, median seconds to pickle, median seconds pickle -> send -> received and unpickled), as the channel
    pickles (all-zero arrays sent by shape)."""
    got = threading.Event()

    def recv_loop(n):
        for _ in range(n):
            pickle.loads(multihost._recv(b))
            got.set()

    t = threading.Thread(target=recv_loop, args=(repeats,))
    t.start()
    dumps, total = [], []
    size = 0
    for _ in range(repeats):
        got.clear()
        t0 = time.perf_counter()
        data = multihost.dumps(payload_obj)
        t1 = time.perf_counter()
        multihost._send(a, data)
        got.wait()
        total.append(time.perf_counter() - t0)
        dumps.append(t1 - t0)
        size = len(data)
    t.join()
    return size, statistics.median(dumps), statistics.median(total)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/smollm2-135m-int8.yaml")
    ap.add_argument("--rows", default="1,32,64")
    ap.add_argument("--repeats", type=int, default=50)
    a = ap.parse_args()
    from sgl_jax.config import load_config
    from sgl_jax.engine import Engine

    c = load_config(a.config).engine.replace(warmup=False, background_compile=False, decode_row_fill="fit")
    with Engine(c, progress=False) as e:
        r = e.runner
        width = max(r.grid.page_width_buckets)
        s_a, s_b = loopback_pair()
        bw, lat = loopback_floor(s_a, s_b)
        print(f"{jax.devices()[0].device_kind}, {os.cpu_count()} CPUs; loopback TCP {bw / 1e9:.2f} GB/s (64 MiB) and "
              f"{lat * 1e6:.0f} us one way (1 byte), best of 5; peer: SGLang multi-node (torch.distributed) not "
              f"installed here: skipped")
        print(f"{'rows':>5} {'payload KB':>11} {'pickle ms':>10} {'channel ms':>11} {'floor ms':>9} {'step ms':>8} "
              f"{'channel/step':>13}")
        for rows in [int(x) for x in a.rows.split(",")]:
            bucket = min(b for b in r.grid.decode_buckets if b >= rows)
            shape = StepShape(bucket, 0, width)
            inp = r._dummy_inputs(shape)
            size, dump_s, chan_s = channel_round(s_a, s_b, ("execute", (shape, inp)), a.repeats)
            r._compile(shape)
            times = []
            for _ in range(max(5, a.repeats // 5)):
                t0 = time.perf_counter()
                jax.block_until_ready(r.execute(shape, inp))
                times.append(time.perf_counter() - t0)
            step = statistics.median(times[1:])
            print(f"{bucket:>5} {size / 1e3:>11.1f} {dump_s * 1e3:>10.3f} {chan_s * 1e3:>11.3f} "
                  f"{(lat + size / bw) * 1e3:>9.3f} {step * 1e3:>8.2f} {chan_s / step:>12.1%}")


if __name__ == "__main__":
    main()
