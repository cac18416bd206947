"""The CPU few-row matmul kernels (pallas_kernels/cpu_matmul.py), int8 and float32 weights, against a float64 numpy
reference, and their use in the model: a decode forward with them equals the forward on XLA's path to float32
rounding."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels import cpu_matmul

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module", autouse=True)
def native():
    if not (cpu_matmul.int8_available() and cpu_matmul.f32_available()):  # a failure, not a skip: CI and the dev
        pytest.fail(f"the native matmul kernels did not build: {cpu_matmul.why_not()}")  # machines have a C++ compiler


def _case(rng, m, k, n, out_axis):
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.integers(-127, 128, (k, n) if out_axis == 1 else (n, k)).astype(np.int8)
    s = (rng.random(n) * 0.01).astype(np.float32)
    wk = w.astype(np.float64) if out_axis == 1 else w.T.astype(np.float64)
    return x, w, s, (x.astype(np.float64) @ wk) * s


@pytest.mark.parametrize("m,k,n,out_axis", [
    (1, 576, 1536, 1), (1, 1536, 576, 1), (3, 576, 192, 1), (16, 576, 1536, 1),  # blocks, both thread halves
    (2, 100, 300, 1), (1, 7, 5, 1), (4, 64, 257, 1),                             # ragged last block, small
    (1, 576, 4099, 0), (5, 577, 1001, 0), (16, 64, 96, 0), (1, 3, 2, 0),         # tied head layout, K % 8 != 0
])
def test_matches_float64_reference(m, k, n, out_axis):
    x, w, s, ref = _case(np.random.default_rng(m * 7 + k + n), m, k, n, out_axis)
    y = np.asarray(jax.jit(lambda x, w, s: cpu_matmul.int8_matmul(x, w, s, out_axis))(x, w, s))
    assert y.shape == (m, n) and y.dtype == np.float32
    # float32 accumulation of k products: error ~ sqrt(k) ulp of the partial sums
    tol = 4 * np.sqrt(k) * np.finfo(np.float32).eps * (np.abs(x) @ np.abs(w.astype(np.float64) if out_axis == 1
                                                                         else w.T.astype(np.float64)) * s)
    assert np.all(np.abs(y - ref) <= tol + 1e-30)


def test_non_finite_inputs_propagate_like_a_dot():
    x, w, s, _ = _case(np.random.default_rng(1), 2, 64, 300, 1)
    x[1, 5] = np.nan
    y = np.asarray(jax.jit(lambda x, w, s: cpu_matmul.int8_matmul(x, w, s, 1))(x, w, s))
    assert np.all(np.isfinite(y[0])) and np.all(np.isnan(y[1][w[5] != 0]))


def test_bad_shapes_raise_naming_the_operands():
    x = jnp.zeros((cpu_matmul.MAX_ROWS_INT8 + 1, 8), jnp.float32)
    with pytest.raises(ValueError, match="native int8 matmul"):
        cpu_matmul.int8_matmul(x, jnp.zeros((8, 4), jnp.int8), jnp.ones(4), 1)
    with pytest.raises(ValueError, match="native int8 matmul"):
        cpu_matmul.int8_matmul(jnp.zeros((1, 8)), jnp.zeros((9, 4), jnp.int8), jnp.ones(4), 1)


def test_concurrent_calls_in_one_step_do_not_deadlock():
    """Independent matmuls in one jit run side by side on XLA's pool; each hands half its work to that pool, and
    a call whose half never started runs it itself."""
    rng = np.random.default_rng(3)
    cases = [_case(rng, 1, 576, 1536, 1) for _ in range(12)]

    @jax.jit
    def many(xs, ws, ss):
        return [cpu_matmul.int8_matmul(x, w, s, 1) for x, w, s in zip(xs, ws, ss)]

    outs = many(*(list(c[i] for c in cases) for i in range(3)))
    for (_, _, _, ref), y in zip(cases, outs):
        np.testing.assert_allclose(np.asarray(y), ref, rtol=2e-5, atol=1e-4)


def test_int8_matmul_routes_decode_rows_to_the_kernel(monkeypatch):
    """llama.int8_matmul: float32 rows up to MAX_ROWS call the kernel, and give what XLA's convert + dot gives (the
    kernel switched off) to float32 rounding; more rows (prefill) never call it. The model-level check is
    tests/test_quant.py (the int8 forward, decode steps included, equals the float forward on the dequantized
    weights)."""
    from sgl_jax.models import llama

    for out_axis in (1, 0):
        x, w, s, _ = _case(np.random.default_rng(5), 3, 576, 1536, out_axis)

        def f():  # a new function each time: jit caches traces by function
            return jax.jit(lambda x: llama.int8_matmul(x, w, s, out_axis=out_axis))

        assert cpu_matmul.INT8_TARGET in f().lower(x).as_text()
        native = np.asarray(f()(x))
        big = np.zeros((cpu_matmul.MAX_ROWS_INT8 + 1, 576), np.float32)
        assert cpu_matmul.INT8_TARGET not in f().lower(big).as_text()
        monkeypatch.setitem(cpu_matmul._INT8._state, "ok", False)
        assert cpu_matmul.INT8_TARGET not in f().lower(x).as_text()
        xla = np.asarray(f()(x))
        monkeypatch.setitem(cpu_matmul._INT8._state, "ok", True)
        np.testing.assert_allclose(native, xla, rtol=1e-5, atol=1e-5 * np.abs(xla).max())


@pytest.mark.parametrize("m,k,n,out_axis", [
    (2, 576, 1536, 1), (8, 1536, 576, 1), (5, 100, 300, 1), (16, 64, 257, 1),  # blocks, both halves, ragged
    (4, 576, 4099, 0), (3, 577, 1001, 0), (2, 3, 2, 0),                         # the tied head's layout
])
def test_f32_matches_float64_reference(m, k, n, out_axis):
    rng = np.random.default_rng(m + k + n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n) if out_axis == 1 else (n, k)).astype(np.float32)
    wk = (w if out_axis == 1 else w.T).astype(np.float64)
    ref = x.astype(np.float64) @ wk
    y = np.asarray(jax.jit(lambda x, w: cpu_matmul.f32_matmul(x, w, out_axis))(x, w))
    assert y.shape == (m, n) and y.dtype == np.float32
    tol = 4 * np.sqrt(k) * np.finfo(np.float32).eps * (np.abs(x) @ np.abs(wk))
    assert np.all(np.abs(y - ref) <= tol + 1e-30)


def test_f32_routing_in_the_model(monkeypatch, tmp_path):
    """The LM head sends 2-8 float32 rows to the kernel, 1 row and 9+ rows to XLA's dot; a tiny model's decode
    logits (4 rows) with the kernel equal those without it (switched off) to float32 rounding, for an untied head
    (tiny llama: "io" layout) and a tied one (tiny qwen2: the embedding, "oi")."""
    from helpers import PagedRunner
    from sgl_jax.models.loader import load_weights
    from sgl_jax.models.testing import write_tiny_checkpoint

    lo, hi = cpu_matmul.F32_ROWS
    for rows, routed in ((1, False), (lo, True), (hi, True), (hi + 1, False)):
        assert cpu_matmul.f32_routes(jnp.ones((rows, 8), jnp.float32)) == routed, rows
    assert not cpu_matmul.f32_routes(jnp.ones((4, 8), jnp.bfloat16))
    for family in ("llama", "qwen2"):
        path = tmp_path / family
        write_tiny_checkpoint(family, str(path))
        cfg, params = load_weights(str(path), progress=False)
        outs = {}
        for on in (True, False):
            monkeypatch.setitem(cpu_matmul._F32._state, "ok", on)
            r = PagedRunner(cfg, params, num_pages=32, page_size=16, block_q=8)
            r.step([(i, list(range(3 + i, 20 + 2 * i)), 0, 0) for i in range(4)])
            work = [(i, [7 + i], 17 + i, None) for i in range(4)]  # 4 decode rows
            outs[on] = np.concatenate(r.step(work))
        np.testing.assert_allclose(outs[True], outs[False], atol=2e-5, rtol=2e-5)


# ------------------------------------------------------------------------------------------ panel-packed weights
def quantize_rows_ref(x: np.ndarray, block: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's activation quantization, restated in numpy: per row and block of 32 inputs, d = max|x| / 127
    and q = round-half-even(x * (127 / max|x|)), in float32 as the kernel computes them. -> (q [M, K] as float64,
    d per input [M, K] float64)."""
    m, k = x.shape
    q, d = np.zeros((m, k)), np.zeros((m, k))
    for k0 in range(0, k, block):
        xb = x[:, k0:k0 + block].astype(np.float32)
        amax = np.abs(xb).max(axis=1, keepdims=True)
        with np.errstate(divide="ignore"):
            inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
        q[:, k0:k0 + block] = np.rint(xb * inv)
        d[:, k0:k0 + block] = amax / np.float32(127)
    return q, d


def _packed_case(rng, m, k, n, int8):
    """(x, packed w, scale, reference, bound): float32 weights against the float64 product; int8 against the
    float64 product of the kernel's quantized activations (exact integer sums, then float32 per block)."""
    from sgl_jax.models.packing import pack_io, to_quads

    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.integers(-127, 128, (k, n)).astype(np.int8) if int8 else rng.standard_normal((k, n)).astype(np.float32)
    s = (rng.random(n) * 0.01).astype(np.float32) if int8 else None
    if not int8:
        ref = x.astype(np.float64) @ w.astype(np.float64)
        return x, pack_io(w), s, ref, np.abs(x).astype(np.float64) @ np.abs(w.astype(np.float64))
    q, d = quantize_rows_ref(x)
    ref = ((q * d) @ w.astype(np.float64)) * s
    bound = (np.abs(q * d) @ np.abs(w.astype(np.float64))) * s
    return x, to_quads(pack_io(w)), s, ref, bound


@pytest.mark.parametrize("int8", [False, True], ids=["f32", "int8"])
@pytest.mark.parametrize("m,k,n", [
    (1, 576, 1536), (1, 1536, 576), (1, 100, 48),       # 1 row: groups of 4 panels, then single panels
    (2, 576, 1536), (2, 7, 48),                         # 2 rows: pairs of panels, an odd one left
    (3, 64, 32), (5, 300, 96), (6, 1, 16), (8, 576, 192),  # row tiles in one pass, K = 1
    (9, 577, 64), (16, 1536, 576), (17, 256, 80),       # blocked path: k blocks of 256, a ragged last one
    (97, 300, 64), (200, 64, 48),                        # more rows than one 96-row block
])
def test_packed_matches_float64_reference(m, k, n, int8):
    if int8:  # int8 takes K in quads (1 -> 4, 7 -> 8, 577 -> 580: still a ragged last block of 32 and of 256)
        k = -(-k // 4) * 4
    x, wp, s, ref, bound = _packed_case(np.random.default_rng(m * 31 + k + n), m, k, n, int8)
    y = np.asarray(jax.jit(lambda x, w, s: cpu_matmul.packed_matmul(x, w, s))(x, wp, s))
    assert y.shape == (m, n) and y.dtype == np.float32
    tol = 4 * np.sqrt(k) * np.finfo(np.float32).eps * bound  # float32 accumulation over k
    assert np.all(np.abs(y - ref) <= tol + 1e-30)


def test_packed_int8_activation_error_is_bounded():
    """int8 weights: against the unquantized activations, the error is what quantizing x to 8 bits per block of 32
    allows (at most d / 2 per input: scale * sum_k d_k / 2 * |w_k|), and not zero; a block with an outlier
    coarsens only its own inputs."""
    from sgl_jax.models.packing import pack_io, to_quads

    rng = np.random.default_rng(7)
    m, k, n = 3, 576, 96
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[1, :32] *= 100.0  # an outlier block: its inputs get a coarse scale, the other blocks keep theirs
    w = rng.integers(-127, 128, (k, n)).astype(np.int8)
    s = (rng.random(n) * 0.01 + 0.001).astype(np.float32)
    y = np.asarray(cpu_matmul.packed_matmul(jnp.asarray(x), jnp.asarray(to_quads(pack_io(w))), jnp.asarray(s)))
    exact = (x.astype(np.float64) @ w.astype(np.float64)) * s
    _, d = quantize_rows_ref(x)
    bound = ((d / 2) @ np.abs(w.astype(np.float64))) * s
    err = np.abs(y - exact)
    assert np.all(err <= bound * 1.0001 + 1e-6) and err.max() > 0
    assert err[1].max() > err[0].max()  # the outlier block's coarse scale shows in its row


def test_packed_empty_inner_dimension_and_non_finite_rows():
    y = cpu_matmul.packed_matmul(jnp.ones((3, 0), jnp.float32), jnp.zeros((2, 0, 16), jnp.float32))
    assert y.shape == (3, 32) and not np.any(np.asarray(y))
    x, wp, s, _, _ = _packed_case(np.random.default_rng(2), 4, 64, 64, True)
    x[2, 3] = np.inf
    y = np.asarray(cpu_matmul.packed_matmul(jnp.asarray(x), jnp.asarray(wp), jnp.asarray(s)))
    assert np.all(np.isfinite(y[[0, 1, 3]])) and not np.all(np.isfinite(y[2]))


def test_packed_bad_operands_raise_naming_them():
    x = jnp.zeros((2, 8), jnp.float32)
    for w, s in ((jnp.zeros((8, 16), jnp.float32), None),        # not packed
                 (jnp.zeros((1, 9, 16), jnp.float32), None),     # K disagrees
                 (jnp.zeros((1, 8, 8), jnp.float32), None),      # panel width
                 (jnp.zeros((1, 2, 16, 4), jnp.int8), None),     # int8 without a scale
                 (jnp.zeros((1, 8, 16), jnp.int8), jnp.ones(16)),  # int8 not in quads
                 (jnp.zeros((1, 3, 16, 4), jnp.int8), jnp.ones(16)),  # int8 K disagrees
                 (jnp.zeros((1, 8, 16), jnp.float32), jnp.ones(16))):  # a scale for float weights
        with pytest.raises(ValueError, match="packed matmul"):
            cpu_matmul.packed_matmul(x, w, s)


def _cpu_has_amx() -> bool:
    with open("/proc/cpuinfo") as f:
        flags = next((ln.split() for ln in f if ln.startswith("flags")), [])
    return "amx_int8" in flags and "amx_tile" in flags


@pytest.mark.parametrize("m,k,n", [
    (4, 576, 1536), (7, 64, 48), (9, 576, 192),                    # AMX from 4 rows: one 8-row tile, one of 16
    (16, 1536, 576), (17, 576, 96),                                # one full 16-row tile, two
    (64, 576, 1536), (130, 1536, 64), (512, 64, 32),               # many tiles, a ragged last one
    (3, 576, 96), (40, 100, 48), (2, 32, 16),                      # below 4 rows or K % 32 != 0: VNNI either way
])
def test_packed_int8_amx_equals_vnni_bitwise(m, k, n):
    """Where the CPU has AMX the int8 product of 4 or more rows runs on the tile unit, and it is on by default;
    its outputs equal the VNNI tiles' bit for bit (the same exact block sums, scaled and added in the same order),
    non-finite rows included. On a CPU without AMX both runs take the VNNI path."""
    assert cpu_matmul.amx_int8() == _cpu_has_amx()
    x, wp, s, _, _ = _packed_case(np.random.default_rng(m + k + n), m, k, n, True)
    x[m // 2, 1] = np.nan
    f = jax.jit(lambda x, w, s: cpu_matmul.packed_matmul(x, w, s))
    try:
        on = cpu_matmul.amx_int8(True)
        y_amx = np.asarray(f(x, wp, s))
        assert not cpu_matmul.amx_int8(False)
        y_vnni = np.asarray(f(x, wp, s))
    finally:
        cpu_matmul.amx_int8(True)
    assert on == _cpu_has_amx()
    assert np.array_equal(y_amx, y_vnni, equal_nan=True)
    assert np.all(np.isnan(y_amx[m // 2])) and np.all(np.isfinite(np.delete(y_amx, m // 2, axis=0)))


@pytest.mark.parametrize("kind", ["f32", "int8", "q4_1"])
@pytest.mark.parametrize("m,k,n", [(1, 576, 1536), (2, 576, 96), (6, 1536, 576), (8, 576, 3072), (16, 576, 960),
                                   (33, 1536, 80), (200, 576, 48), (3, 64, 16)])
def test_packed_thread_ranges_change_no_bit(kind, m, k, n):
    """The packed kernels give each thread a contiguous range of their output panels by default (RunRanges), or
    hand the same units to whichever thread is free (RunUnits): every column is computed by the same tile either
    way, so the outputs are equal bit for bit -- with several units per range, ragged panel counts, and a NaN row."""
    rng = np.random.default_rng(m * 7 + k + n)
    if kind == "q4_1":
        from sgl_jax.models.packing import pack_q4_1
        from test_q4_1 import q4_1_blocks

        k = -(-k // 32) * 32
        args = (jnp.asarray(pack_q4_1(q4_1_blocks(rng, n, k)[0])),)
        f = jax.jit(lambda x, w: cpu_matmul.packed_q4_1_matmul(x, w))
    else:
        _, wp, sc, _, _ = _packed_case(rng, m, k, n, kind == "int8")
        args = (wp,) if sc is None else (wp, sc)
        f = jax.jit(lambda x, *a: cpu_matmul.packed_matmul(x, *a))
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[m // 2, 5] = np.nan
    assert cpu_matmul.thread_ranges()  # the default
    try:
        assert not cpu_matmul.thread_ranges(False)
        y_units = np.asarray(f(x, *args))
    finally:
        assert cpu_matmul.thread_ranges(True)
    y_ranges = np.asarray(f(x, *args))
    assert np.array_equal(y_ranges, y_units, equal_nan=True)
    assert np.all(np.isnan(y_ranges[m // 2])) and np.all(np.isfinite(np.delete(y_ranges, m // 2, axis=0)))


@pytest.mark.parametrize("units,lanes", [(1, 2), (2, 2), (3, 2), (16, 2), (16, 3), (7, 4), (5, 9), (100, 8)])
def test_range_scheduler_runs_every_unit_once(units, lanes):
    """cpu_native.h's RunRangesOn on real threads with random sleeps and yields in the units (so threads start late,
    finish their own range early and take from the others'): every unit runs exactly once, and with the end of the
    range it lies in. A claim that is not one atomic exchange fails this (checked by mutation)."""
    assert cpu_matmul.ranges_self_test(units, lanes, 200) == 0


@pytest.mark.parametrize("kind", ["f32", "int8", "q4_1"])
@pytest.mark.parametrize("m", [1, 9, 70])
def test_packed_kernels_compute_only_the_kept_rows(kind, m):
    """`keep` (a traced mask): each kept row's result is, bit for bit, that of the product of the kept rows alone
    (kept rows leading: computed in place; with holes: gathered, multiplied, put back); the other rows are zeros and
    never read -- NaN in them does not leak. A mask of the wrong length is refused, naming it."""
    rng = np.random.default_rng(m)
    k, n = 576, 96
    if kind == "q4_1":
        from sgl_jax.models.packing import pack_q4_1
        from test_q4_1 import q4_1_blocks

        args = (pack_q4_1(q4_1_blocks(rng, n, k)[0]),)
        f = jax.jit(lambda x, keep, w: cpu_matmul.packed_q4_1_matmul(x, w, keep))
    else:
        _, wp, sc, _, _ = _packed_case(rng, m, k, n, kind == "int8")
        args = (wp,) if sc is None else (wp, sc)
        f = jax.jit(lambda x, keep, *a: cpu_matmul.packed_matmul(x, *a, keep=keep))
    x = rng.standard_normal((m, k)).astype(np.float32)
    masks = [np.arange(m) < r for r in sorted({0, 1, m // 2, m - 1, m})]  # leading rows
    masks += [rng.random(m) < 0.5 for _ in range(3)] + [np.arange(m) % 3 == 2]  # holes
    for keep in masks:
        xp = np.where(keep[:, None], x, np.nan).astype(np.float32)  # skipped rows: whatever they hold is not read
        y = np.asarray(f(xp, keep, *args))
        assert y.shape == (m, n) and np.all(y[~keep] == 0.0), (kind, m, keep)
        if keep.any():
            alone = np.asarray(f(x[keep], np.ones(int(keep.sum()), bool), *args))
            assert np.array_equal(y[keep], alone), (kind, m, keep)
    with pytest.raises(ValueError, match="one entry per row"):
        f(x, np.ones(m + 1, bool), *args)


def test_pack_layouts_and_which_leaves():
    from sgl_jax.models import packing

    rng = np.random.default_rng(4)
    w = rng.standard_normal((24, 48)).astype(np.float32)  # [in, out]
    wp = packing.pack_io(w)
    assert wp.shape == (3, 24, 16) and np.array_equal(wp[1, 5], w[5, 16:32])
    assert np.array_equal(packing.unpack_io(wp), w)
    assert np.array_equal(packing.pack_oi(np.ascontiguousarray(w.T)), wp)  # [out, in] packs to the same
    with pytest.raises(ValueError, match="multiple of 16"):
        packing.pack_io(np.zeros((4, 20), np.float32))
    tied = ("embed_tokens", "embedding")
    assert packing.packed_axis(("layers_0", "mlp", "up_proj", "kernel"), (64, 128), False) == "io"
    assert packing.packed_axis(("layers_0", "mlp", "up_proj", "kernel"), (64, 120), False) is None  # 120 % 16
    assert packing.packed_axis(("layers_0", "self_attn", "q_proj", "bias"), (64,), False) is None
    assert packing.packed_axis(("lm_head", "kernel"), (64, 320), False) == "io"
    assert packing.packed_axis(tied, (320, 64), True) == "oi"
    assert packing.packed_axis(tied, (320, 64), False) is None  # an untied embedding is only looked up
    # int8: [N/16, K/4, 16, 4], column c's inputs 4q .. 4q+3 adjacent; K must be a multiple of 4
    q = packing.to_quads(wp)
    assert q.shape == (3, 6, 16, 4) and np.array_equal(q[1, 2, 5], w[8:12, 16 + 5])
    assert np.array_equal(packing.unpack_io(q), w)
    with pytest.raises(ValueError, match="multiple of 4"):
        packing.to_quads(packing.pack_io(np.zeros((6, 16), np.float32)))
    assert packing.packed_axis(("lm_head", "kernel"), (66, 320), False, int8=True) is None
    assert packing.packed_axis(("lm_head", "kernel"), (66, 320), False) == "io"
    assert packing.packed_axis(tied, (320, 66), True, int8=True) is None


def _quantized_activations(x):
    """The kernel's activation quantization (8 bits per block of 32 inputs) in jnp, an independent restatement:
    x -> q * d."""
    m, k = x.shape
    xb = jnp.pad(x, ((0, 0), (0, -k % 32))).reshape(m, -1, 32)
    amax = jnp.abs(xb).max(-1, keepdims=True)
    q = jnp.round(xb * jnp.where(amax > 0, 127.0 / jnp.where(amax > 0, amax, 1.0), 0.0))  # half to even
    return (q * (amax / 127.0)).reshape(m, -1)[:, :k]


def test_fused_linears():
    """pack_params fuses q/k/v and gate/up (packing.FUSED): kernels stacked along the panel axis, scales and biases
    concatenated in the same order; a group whose members differ (one int8, one float) stays apart."""
    from sgl_jax.models import packing

    rng = np.random.default_rng(5)
    lin = lambda n, bias=False: {"kernel": rng.standard_normal((32, n)).astype(np.float32),  # noqa: E731
                                 **({"bias": rng.standard_normal(n).astype(np.float32)} if bias else {})}
    attn = {"q_proj": lin(64, True), "k_proj": lin(16, True), "v_proj": lin(16, True), "o_proj": lin(32)}
    q8 = {"kernel": rng.integers(-127, 128, (32, 48)).astype(np.int8), "scale": np.ones(48, np.float32)}
    mlp = {"gate_proj": lin(48), "up_proj": q8, "down_proj": lin(32)}
    out = packing.pack_params({"layers_0": {"self_attn": attn, "mlp": mlp}}, tied=False)["layers_0"]
    fused = out["self_attn"]["qkv_proj"]
    assert sorted(out["self_attn"]) == ["o_proj", "qkv_proj"] and sorted(fused) == ["bias", "kernel"]
    want = np.concatenate([attn[p]["kernel"] for p in ("q_proj", "k_proj", "v_proj")], axis=1)
    assert np.array_equal(packing.unpack_io(np.asarray(fused["kernel"])), want)
    assert np.array_equal(np.asarray(fused["bias"]), np.concatenate([attn[p]["bias"] for p in ("q_proj", "k_proj",
                                                                                               "v_proj")]))
    assert sorted(out["mlp"]) == ["down_proj", "gate_proj", "up_proj"]  # float gate, int8 up: not fused
    assert out["mlp"]["up_proj"]["kernel"].ndim == 4 and out["mlp"]["gate_proj"]["kernel"].ndim == 3


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_packed_model_equals_plain(quant, monkeypatch, tmp_path):
    """A tiny model with packed weights gives the plain layout's logits to float32 rounding: prefill and decode rows,
    an untied head (tiny llama) and a tied one (tiny qwen2: the packed embedding is both the lookup and the head),
    float32 and int8; every linear and the head call the packed kernel. int8's packed kernel also quantizes the
    activations (8 bits per 32 inputs): the plain model it is compared with gets the same quantization, restated
    in jnp (_quantized_activations), in front of each of its int8 matmuls. float32 within 2e-5 of the largest
    logit. int8: at least 3 rows in 4 within 2e-5 and every row within 5 %: the packed model's fused gate/up sums
    differ from the two plain matmuls' in their last bits, and an activation that lies within that of a midpoint
    between two quantization steps rounds the other way in one of them -- one input of one block off by a step,
    which these random tiny models carry to up to ~2 % of the largest logit (seen on an AVX2-only host: tiny
    qwen2's first decode row 0.127 of 6.5, its layer 0 down_proj input the first to differ; each kernel on the same
    inputs agrees with the other to 3e-7)."""
    from helpers import PagedRunner
    from sgl_jax.models import llama, packing
    from sgl_jax.models.loader import load_weights
    from sgl_jax.models.testing import write_tiny_checkpoint

    calls, kernel = [], cpu_matmul.packed_matmul
    monkeypatch.setattr(cpu_matmul, "packed_matmul",
                        lambda x, *a, **k: calls.append(x.shape[0]) or kernel(x, *a, **k))
    plain_int8 = llama.int8_matmul
    if quant == "int8":
        monkeypatch.setattr(llama, "int8_matmul", lambda x, *a, **k: plain_int8(_quantized_activations(x), *a, **k))
    for family in ("llama", "qwen2"):
        path = tmp_path / family
        write_tiny_checkpoint(family, str(path))
        cfg, params = load_weights(str(path), progress=False, quantization=quant)
        packed = packing.pack_params(params, cfg.tie_word_embeddings)
        assert packing.is_packed(packed) and not packing.is_packed(params)
        if cfg.tie_word_embeddings:
            assert packed["embed_tokens"]["embedding"].ndim == (4 if quant == "int8" else 3)
        prefill = [(i, list(range(3 + i, 20 + 2 * i)), 0, 0) for i in range(4)]
        decode = [(i, [7 + i], 17 + i, None) for i in range(4)]  # after each prompt of 17 + i tokens
        outs = {}
        for name, p in (("plain", params), ("packed", packed)):
            r = PagedRunner(cfg, p, num_pages=32, page_size=16, block_q=8, attention_backend="cpu_native")
            calls.clear()
            outs[name] = [np.concatenate(r.step(prefill)), np.concatenate(r.step(decode))]
            # traced once per step shape: every linear (4 calls a layer) and the head, in each of the two steps
            linears = 2 * (4 * cfg.num_layers + 1)  # q/k/v and gate/up fused (packing.FUSED)
            assert len(calls) == (linears if name == "packed" else 0), (name, calls)
        for got, want in zip(outs["packed"], outs["plain"]):
            tol = 2e-5 * np.abs(want).max()
            if quant == "none":
                np.testing.assert_allclose(got, want, atol=tol, rtol=0, err_msg=family)
                continue
            rows_equal = (np.abs(got - want) <= tol).all(axis=1)
            assert rows_equal.mean() >= 0.75, (family, rows_equal)
            np.testing.assert_allclose(got, want, atol=0.05 * np.abs(want).max(), rtol=0, err_msg=family)
