"""This machine's ceilings, measured in the calling process: memory copy bandwidth and GEMM rates.

Run it alone (`python bench/floors.py [--quick] [--json OUT]`) or import the functions; bench_model.py
calls `measure_all` so that its floors come from the same process and the same moment as its figures.
Everything is best-of-N: on a shared machine the best run is the closest to the hardware's ceiling.

  copy_bandwidth(nbytes, threads)  numpy copy of an nbytes float32 array; bytes read + written per second
  read_bandwidth(nbytes, threads)  numpy sum of an nbytes float32 array, threads slices at once; bytes read per second
  device_copy_bandwidth(nbytes)    the same on jax's default device (HBM on a GPU/TPU): a jitted x + 1
  numpy_gemm_rate(n)               f32 numpy (OpenBLAS) n x n x n; FLOP/s
  jnp_gemm_rate(m, k, n, dtype)    jitted jnp.dot [m,k] x [k,n]; FLOP/s
  int8_gemm_rate(m, k, n)          the packed int8 matmul (pallas_kernels/cpu_matmul.cc: AMX where the CPU has it)
                                   on a compute-bound [m,k] x [k,n]; OP/s. There is no other int8 GEMM here
                                   (XLA converts int8 weights to float before its dot): for int8 weights this is
                                   the GEMM ceiling in the sense numpy's is for float32, a library's best rate
  int8_matmul_times(m, k, n, dtype)  one [m,k] x [k,n] matmul with float vs int8 weights (converted in the
                                   graph, scaled after the dot, as sgl_jax.models.llama.Linear does); us

    python bench/floors.py [--quick] [--json OUT]                 # the host's floors (and the device's, if any)
    python bench/floors.py --device-only [--sizes-mib 1024,4096]  # device copy bandwidth + the int8 matmul
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


def read_bandwidth(nbytes: int = 1 << 30, threads: int = 2, repeats: int = 4) -> float:
    """Bytes/s read by a float32 sum over an `nbytes` array split in contiguous slices, one Python thread each (numpy
    releases the GIL in the reduction): the ceiling for a kernel that only reads, like the paged attention."""
    n = nbytes // 4
    src = np.ones(n, np.float32)
    bounds = np.linspace(0, n, threads + 1).astype(np.int64)

    def fn():
        ts = [threading.Thread(target=np.add.reduce, args=(src[a:b],)) for a, b in zip(bounds[:-1], bounds[1:])]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    t = _best_time(fn, repeats)
    del src
    return nbytes / t


def device_copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Bytes/s of a jitted elementwise `x + 1` over an `nbytes` float32 array on jax's default device, read +
    write counted (2 * nbytes a call), timed to `block_until_ready` (a device-to-device copy that XLA cannot
    elide). Best of `repeats` after a warm-up call."""
    import jax
    import jax.numpy as jnp

    x = jnp.zeros((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a + jnp.float32(1))
    t = _best_time(lambda: f(x).block_until_ready(), repeats, warmup=2)
    del x
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


def int8_gemm_rate(m: int = 512, k: int = 1536, n: int = 1536, repeats: int = 5, min_time: float = 0.2) -> float:
    """OP/s (2 per multiply-add) of the packed int8 matmul on [m,k] x [k,n], all cores, activations quantized in
    the call as the model's are (see the module docstring). 0.0 where the native kernel is not built."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels import cpu_matmul
    from sgl_jax.models.packing import pack_io, to_quads

    if not cpu_matmul.packed_available():
        return 0.0
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32))
    w = jnp.asarray(to_quads(pack_io(rng.integers(-127, 128, (k, n)).astype(np.int8))))
    s = jnp.ones((n,), jnp.float32)
    f = jax.jit(cpu_matmul.packed_matmul)
    f(x, w, s).block_until_ready()
    return 2 * m * k * n / _best_time(lambda: f(x, w, s).block_until_ready(), repeats, min_time=min_time)


def int8_matmul_times(m: int, k: int, n: int, dtype: str = "float32", repeats: int = 300) -> dict:
    """Best-of-`repeats` microseconds of one jitted [m,k] x [k,n] matmul in `dtype`: float weights vs int8
    weights converted in the graph and scaled per output channel after the dot. Also the compiled HLO's
    instruction lines that touch the convert or the dot, to see whether XLA fused the convert into it."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    dt = jnp.dtype(dtype)
    x = jnp.asarray(rng.standard_normal((m, k), np.float32)).astype(dt)
    w = rng.standard_normal((k, n)).astype(np.float32)
    scale = np.abs(w).max(axis=0) / 127
    q = jnp.asarray(np.clip(np.rint(w / scale), -127, 127).astype(np.int8))
    fl = jax.jit(lambda x, w: jnp.dot(x, w))
    i8 = jax.jit(lambda x, q, s: (jnp.dot(x, q.astype(x.dtype), preferred_element_type=jnp.float32) * s
                                  ).astype(x.dtype))
    out: dict = {"shape": f"[{m},{k}] x [{k},{n}]", "dtype": dtype, "n": repeats}
    for name, fn, args in (("float_us", fl, (x, jnp.asarray(w).astype(dt))),
                            ("int8_us", i8, (x, q, jnp.asarray(scale)))):
        out[name] = 1e6 * _best_time(lambda: fn(*args).block_until_ready(), repeats, warmup=5)
    hlo = i8.lower(x, q, jnp.asarray(scale)).compile().as_text()
    out["int8_hlo"] = [ln.strip()[:200] for ln in hlo.splitlines()
                       if ("convert" in ln or "dot(" in ln or "custom-call" in ln or "fusion(" in ln)
                       and "metadata" not in ln[:20]][:12]
    return out


def measure_all(quick: bool = False, log=print) -> dict:
    """Every ceiling bench_model.py uses, as a dict of plain floats (bytes/s and FLOP/s) and the platform.

    On a GPU/TPU `copy_bw` is the device's (HBM) copy bandwidth; the host's stays in `copy_bw_host`."""
    import jax

    res: dict = {"platform": jax.default_backend()}
    nbytes = (256 << 20) if quick else (1 << 30)
    rep = 2 if quick else 4
    res["copy_bw_1t"] = copy_bandwidth(nbytes, 1, rep)
    res["copy_bw_2t"] = copy_bandwidth(nbytes, 2, rep)
    res["copy_bw"] = max(res["copy_bw_1t"], res["copy_bw_2t"])
    log(f"  memory copy {nbytes >> 20} MiB (read+write): 1 thread {res['copy_bw_1t'] / 1e9:.1f} GB/s, "
        f"2 threads {res['copy_bw_2t'] / 1e9:.1f} GB/s")
    if res["platform"] != "cpu":  # the weights and the KV pool live in device memory: its bandwidth is the floor
        dev_bytes = (256 << 20) if quick else (4 << 30)
        res["copy_bw_host"] = res["copy_bw"]
        res["copy_bw"] = res["copy_bw_device"] = device_copy_bandwidth(dev_bytes)
        log(f"  device copy {dev_bytes >> 20} MiB on {jax.devices()[0].device_kind} (read+write): "
            f"{res['copy_bw_device'] / 1e9:.0f} GB/s (the floors below use it)")
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


def device_report(sizes_mib: list[int], log=print) -> dict:
    """Device copy bandwidth at each size, and one Llama-3-8B-shaped int8 vs float matmul (gate/up projection at
    batch 1 and 64, in bfloat16 on an accelerator, float32 on a CPU)."""
    import jax

    dev = jax.devices()[0]
    res: dict = {"platform": jax.default_backend(), "device": dev.device_kind, "copy_bw": {}}
    log(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    for mib in sizes_mib:
        bw = res["copy_bw"][mib] = device_copy_bandwidth(mib << 20)
        log(f"  device copy {mib} MiB (x + 1, read+write): {bw / 1e9:.0f} GB/s")
    dtype = "float32" if res["platform"] == "cpu" else "bfloat16"
    k, n = (576, 1536) if res["platform"] == "cpu" else (4096, 14336)
    for m in (1, 64):
        mm = res[f"int8_matmul_{m}"] = int8_matmul_times(m, k, n, dtype, repeats=100)
        log(f"  matmul {mm['shape']}: {dtype} {mm['float_us']:.1f} us, int8 converted + scaled {mm['int8_us']:.1f} us "
            f"({mm['int8_us'] / mm['float_us']:.2f}x)")
    log("  compiled int8 matmul (HLO lines with convert / dot / fusion / custom-call):")
    for line in res["int8_matmul_64"]["int8_hlo"]:
        log(f"    {line}")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="256 MiB copies, fewer repeats")
    ap.add_argument("--device-only", action="store_true",
                    help="only jax's default device: copy bandwidth at --sizes-mib and the int8 matmul check")
    ap.add_argument("--sizes-mib", default="1024,4096", help="--device-only: copy sizes in MiB")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.device_only:
        res = device_report([int(x) for x in args.sizes_mib.split(",")])
    else:
        print(f"floors on {os.cpu_count()} CPUs (best of several runs):")
        res = measure_all(args.quick)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    sys.exit(main() and 0)
