"""This machine's ceilings, measured in the calling process: memory copy bandwidth and GEMM rates.

Run it alone (`python bench/floors.py [--quick] [--json OUT]`) or import the functions; bench_model.py
calls `measure_all` so that its floors come from the same process and the same moment as its figures.
Everything is best-of-N: on a shared machine the best run is the closest to the hardware's ceiling.

  copy_bandwidth(nbytes, threads)  numpy copy of an nbytes float32 array; bytes read + written per second
  numpy_gemm_rate(n)               f32 numpy (OpenBLAS) n x n x n; FLOP/s
  jnp_gemm_rate(m, k, n, dtype)    jitted jnp.dot [m,k] x [k,n]; FLOP/s
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import numpy as np


def _best_time(fn, repeats: int, warmup: int = 1, min_time: float = 0.0) -> float:
    """Best wall time of fn() over `repeats` runs (at least until min_time total) after `warmup` runs."""
    for _ in range(warmup):
        fn()
    best, total, n = float("inf"), 0.0, 0
    while n < repeats or total < min_time:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, total, n = min(best, dt), total + dt, n + 1
    return best


def cpu_busy_fraction(interval: float = 1.0) -> float:
    """Fraction of all CPUs busy over `interval` seconds (from /proc/stat; 0.0 where unavailable)."""
    def snap():
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        return vals[3] + vals[4], sum(vals)  # idle + iowait, total
    try:
        i0, t0 = snap()
        time.sleep(interval)
        i1, t1 = snap()
    except OSError:
        return 0.0
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def wait_for_quiet(max_wait_s: float, busy_below: float = 0.15, log=print) -> float:
    """Block until the machine is nearly idle (others' load would distort timings), at most max_wait_s.

    Returns the last busy fraction seen. On a machine shared with other jobs call this before each timed
    section; 0 disables the wait."""
    t_end = time.monotonic() + max_wait_s
    busy = cpu_busy_fraction(0.5)
    waited = False
    while busy >= busy_below and time.monotonic() < t_end:
        if not waited:
            log(f"  (waiting up to {max_wait_s:.0f} s for the machine to go quiet: {busy:.0%} busy)")
            waited = True
        time.sleep(2.0)
        busy = cpu_busy_fraction(1.0)
    return busy


def copy_bandwidth(nbytes: int = 1 << 30, threads: int = 1, repeats: int = 4) -> float:
    """Bytes/s of np.copyto of an `nbytes` float32 array, read + write counted (2 * nbytes per copy).

    threads > 1 splits the array in contiguous slices copied by Python threads (numpy releases the GIL
    for plain copies)."""
    n = nbytes // 4
    src = np.ones(n, np.float32)
    dst = np.empty_like(src)
    dst.fill(0)  # fault the pages in before timing
    if threads <= 1:
        fn = lambda: np.copyto(dst, src)  # noqa: E731
    else:
        bounds = np.linspace(0, n, threads + 1).astype(np.int64)

        def fn():
            ts = [threading.Thread(target=np.copyto, args=(dst[a:b], src[a:b]))
                  for a, b in zip(bounds[:-1], bounds[1:])]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
    t = _best_time(fn, repeats)
    del src, dst
    return 2 * nbytes / t


def numpy_gemm_rate(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an f32 n^3 numpy matmul (2 n^3 FLOPs)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    return 2 * n ** 3 / _best_time(lambda: a @ b, repeats)


def jnp_gemm_rate(m: int, k: int, n: int, dtype: str = "float32", repeats: int = 5,
                  min_time: float = 0.2) -> float:
    """FLOP/s of a jitted jnp.dot [m,k] x [k,n] (f32 accumulation for bf16 inputs)."""
    import jax
    import jax.numpy as jnp

    dt = jnp.dtype(dtype)
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (m, k), jnp.float32).astype(dt)
    b = jax.random.normal(kb, (k, n), jnp.float32).astype(dt)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    f(a, b).block_until_ready()
    return 2 * m * k * n / _best_time(lambda: f(a, b).block_until_ready(), repeats, min_time=min_time)


def measure_all(quick: bool = False, log=print) -> dict:
    """Every ceiling bench_model.py uses, as a dict of plain floats (bytes/s and FLOP/s)."""
    res: dict[str, float] = {}
    nbytes = (256 << 20) if quick else (1 << 30)
    rep = 2 if quick else 4
    res["copy_bw_1t"] = copy_bandwidth(nbytes, 1, rep)
    res["copy_bw_2t"] = copy_bandwidth(nbytes, 2, rep)
    res["copy_bw"] = max(res["copy_bw_1t"], res["copy_bw_2t"])
    log(f"  memory copy {nbytes >> 20} MiB (read+write): 1 thread {res['copy_bw_1t'] / 1e9:.1f} GB/s, "
        f"2 threads {res['copy_bw_2t'] / 1e9:.1f} GB/s")
    res["numpy_gemm_2048"] = numpy_gemm_rate(2048, 3 if quick else 5)
    log(f"  numpy f32 GEMM 2048^3: {res['numpy_gemm_2048'] / 1e9:.1f} GFLOP/s")
    for dt in ("float32", "bfloat16"):
        tag = "f32" if dt == "float32" else "bf16"
        res[f"jnp_gemm_2048_{tag}"] = jnp_gemm_rate(2048, 2048, 2048, dt, 3 if quick else 5)
        parts = [f"2048^3 {res[f'jnp_gemm_2048_{tag}'] / 1e9:.1f}"]
        for b in (1, 8, 32, 512):
            res[f"jnp_gemm_b{b}_{tag}"] = jnp_gemm_rate(b, 576, 1536, dt)
            parts.append(f"[{b},576]x[576,1536] {res[f'jnp_gemm_b{b}_{tag}'] / 1e9:.1f}")
        log(f"  jnp.dot {tag} GFLOP/s: " + ", ".join(parts))
    res["gemm"] = max(res["numpy_gemm_2048"], res["jnp_gemm_2048_f32"])
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="256 MiB copies, fewer repeats")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    print(f"floors on {os.cpu_count()} CPUs (best of several runs):")
    res = measure_all(args.quick)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    sys.exit(main() and 0)
