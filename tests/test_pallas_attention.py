"""Pallas ragged paged attention (GPU/Triton and TPU/Mosaic kernels) vs the jnp reference.

Everything runs on CPU in interpret mode:
  * pallas_gpu: Pallas' generic HLO interpreter (``interpret=True``);
  * pallas_tpu: the TPU interpret mode (``pltpu.InterpretParams()``) which simulates HBM/VMEM,
    DMAs and DMA semaphores and fills uninitialized VMEM scratch with NaN.
Pages that no row owns (and owned slots past kv_len, and whole pages before a sliding window)
are filled with NaN, as are padded query slots: any stray read shows up as NaN in the output.

``SGL_JAX_WIDE_SWEEP=1`` widens the parametrization (page sizes, head dims, block sizes).
``SGL_JAX_PALLAS_NATIVE=1`` (on a GPU machine, with ``JAX_PLATFORMS=cuda``; bench/device_check.sh sets both)
runs the GPU kernel natively instead: compiled by Triton and run on the device (``interpret=False``), the
model test with the real ``pallas_gpu`` backend; the TPU interpret-mode tests are skipped there (they
simulate a TPU on the host). Set ``JAX_DEFAULT_MATMUL_PRECISION=highest`` with it, so that the float32 jnp
reference does not use TF32 matmuls (the kernel's float32 dots are IEEE).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pallas_kernels.ragged_paged_attention import (  # noqa: E402
    ragged_paged_attention,
    ref_ragged_paged_attention,
    validate_inputs,
)

WIDE = os.environ.get("SGL_JAX_WIDE_SWEEP", "") == "1"
NATIVE = os.environ.get("SGL_JAX_PALLAS_NATIVE", "") == "1"
if NATIVE and jax.default_backend() != "gpu":
    raise RuntimeError(f"SGL_JAX_PALLAS_NATIVE=1 runs the GPU kernel on a GPU, but jax's default backend is "
                       f"{jax.default_backend()!r} (set JAX_PLATFORMS=cuda on a GPU machine)")
BACKENDS = ("pallas_gpu",) if NATIVE else ("pallas_gpu", "pallas_tpu")
DTYPES = ("float32", "bfloat16")
PAGE_SIZES = (16, 32, 64, 128) if WIDE else (16, 32)
# (num_kv_heads, group size G): MQA, GQA with G=3, MHA
GROUPINGS = ((1, 4), (2, 3), (2, 1))
TOL = {"float32": 2e-5, "bfloat16": 2e-2}

_ref = jax.jit(ref_ragged_paged_attention, static_argnames=("sm_scale", "sliding_window", "soft_cap"))


# ----------------------------------------------------------------------------------------
# Case construction
# ----------------------------------------------------------------------------------------


def _row_specs(S: int, prefill: bool):
    """List of (kv_len, q_positions) rows. Decode: Bq=1; prefill: Bq=8 blocks."""
    lens = [0, 1, S - 1, S, S + 1, 5 * S + 3]
    if not prefill:
        return [(n, [n - 1] if n > 0 else [-1]) for n in lens], 1
    Bq = 8
    rows = []
    for n in lens:  # last block of a chunk ending at n (short chunks leave padded slots)
        qs = list(range(max(0, n - Bq), n))
        rows.append((n, qs + [-1] * (Bq - len(qs))))
    # a block in the middle of a chunk: keys after the block exist (kv_len) but are causal-masked
    rows.append((3 * S + 5, list(range(2 * S - 3, 2 * S + 5))))
    # a chunk over a cached prefix with 3 real tokens, then padded slots
    rows.append((2 * S + 2, [2 * S - 1, 2 * S, 2 * S + 1] + [-1] * 5))
    return rows, Bq


def make_case(seed, *, dtype, S, KV, G, D, prefill, sliding_window=None, extra_pages=3):
    rng = np.random.default_rng(seed)
    rows, Bq = _row_specs(S, prefill)
    R = len(rows)
    H = KV * G
    need = [-(-n // S) for n, _ in rows]
    P = max(need) + 1  # one spare column: entries past the length point at page 0 (NaN page)
    N = 1 + sum(need) + extra_pages  # page 0 + owned pages + a few never-owned pages
    owned = rng.permutation(np.arange(1, N))[: sum(need)]
    k = rng.standard_normal((N, KV, S, D)).astype(np.float32)
    v = rng.standard_normal((N, KV, S, D)).astype(np.float32)
    poison = np.ones((N, S), bool)  # (page, slot) -> NaN unless it holds a visible key
    page_table = np.zeros((R, P), np.int32)
    q_pos = np.full((R, Bq), -1, np.int32)
    kv_lens = np.zeros((R,), np.int32)
    off = 0
    for r, (n, qs) in enumerate(rows):
        pages = owned[off: off + need[r]]
        off += need[r]
        page_table[r, : len(pages)] = pages
        kv_lens[r] = n
        q_pos[r] = qs
        first = 0
        valid_q = [t for t in qs if t >= 0]
        if sliding_window is not None and valid_q:
            # whole pages before the window of every query of the row are never needed
            first = (max(0, min(valid_q) - sliding_window + 1) // S) * S
        for j in range(first, n):
            poison[pages[j // S], j % S] = False
    k[np.broadcast_to(poison[:, None, :], (N, KV, S))] = np.nan
    v[np.broadcast_to(poison[:, None, :], (N, KV, S))] = np.nan
    q = rng.standard_normal((R, Bq, H, D)).astype(np.float32)
    q[q_pos < 0] = np.nan  # padded query slots carry garbage too
    jdt = jnp.dtype(dtype)
    return dict(
        q=jnp.asarray(q, jdt), k_pages=jnp.asarray(k, jdt), v_pages=jnp.asarray(v, jdt),
        page_table=jnp.asarray(page_table), kv_lens=jnp.asarray(kv_lens),
        q_positions=jnp.asarray(q_pos),
    )


@pytest.fixture(autouse=True)
def _reset_tpu_interpreter():
    # After an exception inside the TPU interpreter its global state must be reset before reuse.
    yield
    from jax.experimental.pallas import tpu as pltpu

    pltpu.reset_tpu_interpret_mode_state()


def check(case, backend, *, dtype, sm_scale, sliding_window=None, soft_cap=None,
          block_kv_pages=2, interpret=True):
    args = (case["q"], case["k_pages"], case["v_pages"], case["page_table"], case["kv_lens"],
            case["q_positions"])
    if NATIVE:
        interpret = False
    ref = _ref(*args, sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    out = ragged_paged_attention(*args, sm_scale=sm_scale, sliding_window=sliding_window,
                                 soft_cap=soft_cap, backend=backend, interpret=interpret,
                                 block_kv_pages=block_kv_pages)
    out = np.asarray(out.astype(jnp.float32))
    ref = np.asarray(ref.astype(jnp.float32))
    assert out.shape == case["q"].shape and out.dtype == np.float32
    assert not np.isnan(ref).any(), "reference produced NaN (test construction bug)"
    assert not np.isnan(out).any(), f"{backend}: NaN in output (stray read of a poisoned page?)"
    # queries without any visible key output exactly 0
    pos = np.asarray(case["q_positions"])
    kvl = np.asarray(case["kv_lens"])
    no_key = (pos < 0) | (kvl[:, None] == 0)
    assert np.all(out[no_key] == 0.0)
    tol = TOL[dtype]
    np.testing.assert_allclose(out, ref, atol=tol, rtol=tol)


# ----------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------


def _grid():
    """(prefill, dtype, S, grouping) cases: the full product where the kernel runs natively (a GPU) or with
    SGL_JAX_WIDE_SWEEP=1; otherwise a covering of every pair of values, each grouping with a case and its complement
    in the three two-valued settings (6 cases a backend instead of 24: the 48 interpreted cases took 87 s)."""
    full = [(p, d, S, g) for p in (False, True) for d in DTYPES for S in PAGE_SIZES for g in GROUPINGS]
    if WIDE or NATIVE:
        return full
    cases = []
    for g, bits in zip(GROUPINGS, ((0, 0, 0), (0, 0, 1), (0, 1, 0))):
        for b in (bits, tuple(1 - x for x in bits)):
            cases.append(((False, True)[b[0]], DTYPES[b[1]], PAGE_SIZES[b[2]], g))
    # every pair of the four settings' values is in some case
    pairs = lambda cs: {(i, c[i], j, c[j]) for c in cs for i in range(4) for j in range(i + 1, 4)}  # noqa: E731
    assert pairs(cases) == pairs(full)
    return cases


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prefill,dtype,S,grouping", [
    pytest.param(*c, id=f"{'prefill' if c[0] else 'decode'}-{c[1]}-{c[2]}-kv{c[3][0]}g{c[3][1]}") for c in _grid()])
def test_grid(prefill, dtype, S, grouping, backend):
    KV, G = grouping
    D = 64
    case = make_case(S * 7 + KV * 3 + G, dtype=dtype, S=S, KV=KV, G=G, D=D, prefill=prefill)
    check(case, backend, dtype=dtype, sm_scale=D ** -0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prefill", (False, True), ids=("decode", "prefill"))
def test_sliding_window(prefill, backend):
    S, W = 16, 16 + 3  # rows of ~5S skip whole pages before the window (poisoned with NaN)
    case = make_case(11, dtype="float32", S=S, KV=2, G=3, D=64, prefill=prefill,
                     sliding_window=W)
    check(case, backend, dtype="float32", sm_scale=0.125, sliding_window=W)


@pytest.mark.parametrize("backend", BACKENDS)
def test_soft_cap_bf16(backend):
    case = make_case(12, dtype="bfloat16", S=16, KV=1, G=4, D=64, prefill=True)
    # large sm_scale so the cap actually bites
    check(case, backend, dtype="bfloat16", sm_scale=1.0, soft_cap=5.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_and_soft_cap_d128(backend):
    case = make_case(13, dtype="float32", S=32, KV=2, G=3, D=128, prefill=True,
                     sliding_window=40)
    check(case, backend, dtype="float32", sm_scale=128 ** -0.5, sliding_window=40,
          soft_cap=30.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_block_table(backend):
    # block_kv_pages=None -> per-backend table; one block covers every row (mostly-empty block)
    case = make_case(14, dtype="bfloat16", S=16, KV=2, G=1, D=64, prefill=False)
    check(case, backend, dtype="bfloat16", sm_scale=0.125, block_kv_pages=None)


@pytest.mark.skipif(NATIVE, reason="TPU interpret mode: a host simulation, not a GPU check")
def test_tpu_eager_dma_and_race_detector():
    """TPU kernel with DMAs executed at .start() (not lazily at .wait()) and the interpreter's
    happens-before race detector on: an early overwrite of the buffer being computed (wrong
    double-buffer slot) or a read before the wait shows up as a mismatch or a reported race."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interp
    from jax.experimental.pallas import tpu as pltpu

    params = pltpu.InterpretParams(dma_execution_mode="eager", detect_races=True)
    case = make_case(15, dtype="float32", S=16, KV=2, G=3, D=64, prefill=True)
    check(case, "pallas_tpu", dtype="float32", sm_scale=0.125, interpret=params)
    assert tpu_interp.races is not None and not tpu_interp.races.races_found


def _wide_params():
    if not WIDE:
        return [("float32", 16, 256, 1)]  # one D=256 case even in the default grid
    out = []
    for dtype in DTYPES:
        for S in (16, 64, 128, 256):
            for D in (64, 128, 256):
                for bp in (1, 4):
                    out.append((dtype, S, D, bp))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,S,D,bp", _wide_params())
def test_wide(dtype, S, D, bp, backend):
    case = make_case(S + D + bp, dtype=dtype, S=S, KV=2, G=2, D=D, prefill=True,
                     sliding_window=2 * S + 1 if bp > 1 else None)
    check(case, backend, dtype=dtype, sm_scale=D ** -0.5,
          sliding_window=2 * S + 1 if bp > 1 else None, soft_cap=20.0 if bp > 1 else None,
          block_kv_pages=bp)


def test_validation_errors_show_shapes():
    q = jnp.zeros((2, 1, 4, 64), jnp.float32)
    k = jnp.zeros((8, 2, 16, 64), jnp.float32)
    pt = jnp.zeros((2, 3), jnp.int32)
    kvl = jnp.zeros((2,), jnp.int32)
    pos = jnp.zeros((2, 1), jnp.int32)
    v_bad = jnp.zeros((8, 2, 32, 64), jnp.float32)
    with pytest.raises(ValueError) as e:
        validate_inputs(q, k, v_bad, pt, kvl, pos, sm_scale=0.1)
    assert "(8, 2, 16, 64)" in str(e.value) and "(8, 2, 32, 64)" in str(e.value)
    q_bad = jnp.zeros((2, 1, 4, 128), jnp.float32)
    with pytest.raises(ValueError) as e:
        ragged_paged_attention(q_bad, k, k, pt, kvl, pos, sm_scale=0.1, interpret=True)
    assert "(2, 1, 4, 128)" in str(e.value) and "(8, 2, 16, 64)" in str(e.value)
    with pytest.raises(ValueError) as e:
        validate_inputs(q, k, k, jnp.zeros((3, 3), jnp.int32), kvl, pos)
    assert "(3, 3)" in str(e.value) and "(2, 1, 4, 64)" in str(e.value)
    with pytest.raises(ValueError) as e:
        validate_inputs(q, k, k, pt, kvl, jnp.zeros((2, 2), jnp.int32))
    assert "(2, 2)" in str(e.value) and "(2, 1, 4, 64)" in str(e.value)
    with pytest.raises(ValueError, match="int32"):
        validate_inputs(q, k, k, pt.astype(jnp.float32), kvl, pos)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        validate_inputs(jnp.zeros((2, 1, 3, 64)), k, k, pt, kvl, pos)
    with pytest.raises(ValueError, match="backend"):
        ragged_paged_attention(q, k, k, pt, kvl, pos, sm_scale=0.1, backend="cuda")


# ----------------------------------------------------------------------------------------
# Cross-platform lowering: Pallas -> Triton IR and Pallas -> Mosaic IR run on CPU, so the
# kernels' real-hardware lowering (Triton power-of-2 rules, Mosaic layout/op support) is
# checked here even without an accelerator.  (Compiling that IR needs the device toolchains.)
# ----------------------------------------------------------------------------------------


def _abstract_args(dtype, D=128, S=16, KV=2, G=3, Bq=8, R=3, N=24, P=6):
    dt = jnp.dtype(dtype)
    return (jax.ShapeDtypeStruct((R, Bq, KV * G, D), dt), jax.ShapeDtypeStruct((N, KV, S, D), dt),
            jax.ShapeDtypeStruct((N, KV, S, D), dt), jax.ShapeDtypeStruct((R, P), jnp.int32),
            jax.ShapeDtypeStruct((R,), jnp.int32), jax.ShapeDtypeStruct((R, Bq), jnp.int32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_kernel_lowers_to_triton(dtype):
    f = lambda *a: ragged_paged_attention(*a, sm_scale=0.1, sliding_window=20, soft_cap=30.0,
                                          backend="pallas_gpu")
    text = jax.jit(f).trace(*_abstract_args(dtype)).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text


@pytest.mark.parametrize("dtype", DTYPES)
def test_tpu_kernel_lowers_to_mosaic(dtype):
    from jax._src import mesh as mesh_lib

    f = lambda *a: ragged_paged_attention(*a, sm_scale=0.1, sliding_window=20, soft_cap=30.0,
                                          backend="pallas_tpu", block_kv_pages=4)
    dev = mesh_lib.AbstractDevice("TPU v5e", 1, "tpu")
    with jax.sharding.use_abstract_mesh(mesh_lib.AbstractMesh((1,), ("x",), abstract_device=dev)):
        text = jax.jit(f).trace(*_abstract_args(dtype)).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text


# ------------------------------------------------------------------ the model with a Pallas backend
@pytest.mark.parametrize("backend", ["pallas_gpu"] if NATIVE else ["pallas_gpu_interpret", "pallas_tpu_interpret"])
def test_model_with_pallas_backend_matches_jnp(backend, tmp_path):
    """A tiny model's logits (prefill with a cached prefix, decode rows, a run block) equal the jnp backend's."""
    import numpy as np

    from helpers import PagedRunner
    from sgl_jax.models.loader import load_weights
    from sgl_jax.models.testing import write_tiny_checkpoint

    # the kernels take head dims 64/128/256; one layer: each shape of the interpreted kernels compiles for seconds
    # (both backends' tests: 38.9 s at two layers, 35.0 s at one)
    write_tiny_checkpoint("llama", str(tmp_path), head_dim=64, num_hidden_layers=1)
    cfg, params = load_weights(str(tmp_path), progress=False)
    outs = {}
    for name in ("jnp", backend):
        r = PagedRunner(cfg, params, num_pages=16, page_size=16, block_q=8, attention_backend=name)
        a = r.step([(0, list(range(3, 23)), 0, 0), (1, list(range(40, 45)), 0, 0)])
        b = r.step([(0, [7], 20, None), (1, list(range(50, 60)), 5, 5)])
        c = r.step([(0, [8, 9, 10], 21, 21, True), (1, [11], 15, None)], run_q=4)  # a run block + a decode
        outs[name] = np.concatenate([x for x in a + b + c])
    np.testing.assert_allclose(outs[backend], outs["jnp"], atol=2e-5, rtol=2e-5)
