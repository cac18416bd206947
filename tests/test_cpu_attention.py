"""The native CPU paged attention (pallas_kernels/cpu_attention.py) against the dense float64 reference of
test_attention.py and against its own pure-jnp reference, and in the model against the jnp backend.

The cases are test_attention's: every (page, slot) no query may see is NaN (pages nobody owns, the tail of a
row's last page, table padding, keys after the query, keys before the window) and padded query slots carry NaN
queries, so a stray read shows up as NaN; rows with nothing to see must give exactly 0. Unlike the jnp block
path, the kernel reads only visible keys, so block rows are checked with every unseen key poisoned too.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels import cpu_attention
from test_attention import _check, decode_rows, dense_reference, make_case

pytestmark = pytest.mark.timeout(300)

_native = jax.jit(cpu_attention.paged_attention,
                  static_argnames=("sm_scale", "sliding_window", "soft_cap", "bf16_math", "kv_format"))
_ref = jax.jit(cpu_attention.ref_paged_attention, static_argnames=("sm_scale", "sliding_window", "soft_cap"))


@pytest.fixture(scope="module", autouse=True)
def native():
    if not cpu_attention.available():  # a failure, not a skip: CI and the dev machines have a C++ compiler
        pytest.fail(f"the native paged attention did not build: {cpu_attention.why_not()}")


# The kernel's two forms of a decode row, each checked by the decode tests below: online (a page at a time, the
# 8-lane loops; every CPU) and two passes (all scores, one softmax, then the values; the default where the build
# has AVX2, in 16-lane loops where it has AVX-512). Without AVX2 both settings run the online form.
DECODE_PATHS = {"online": 0, "two-pass": 1 << 18}


@pytest.fixture(params=list(DECODE_PATHS))
def decode_path(request):
    before = cpu_attention.decode_two_pass_max()
    if before is not None:
        cpu_attention.decode_two_pass_max(DECODE_PATHS[request.param])
    yield request.param
    if before is not None:
        cpu_attention.decode_two_pass_max(before)


def _has_cpu_flags(*names) -> bool:
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    return all(f" {x} " in flags or f" {x}\n" in flags for x in names)


def test_decode_two_pass_setting_takes_effect():
    """The setting the decode tests switch is the kernel's: read back as set and restored where the build has the
    two-pass loops (exactly where the CPU has AVX2), absent elsewhere; a negative value is refused."""
    avx2 = _has_cpu_flags("avx2")
    before = cpu_attention.decode_two_pass_max()
    assert (before is not None) == avx2
    try:
        assert cpu_attention.decode_two_pass_max(5) == (5 if avx2 else None)
        with pytest.raises(ValueError, match="floats"):
            cpu_attention.decode_two_pass_max(-1)
    finally:
        if before is not None:
            cpu_attention.decode_two_pass_max(before)
    assert cpu_attention.decode_two_pass_max() == before


def _args(case):
    return tuple(jnp.asarray(x) for x in case)


PAGE_DTYPES = ["float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"]
# the largest grids: e5m2's loads are float16's after a shift, checked by the smaller ones and code by code
SHARED_DTYPES = PAGE_DTYPES[:4]


def _paged_as(case, dtype):
    """(the case with its k/v pages stored in `dtype`, the same values widened back to float32 for the float64
    reference): a 16-bit pool is checked against the function of the values it holds."""
    q, k, v, *rest = case
    dt = jnp.dtype(dtype)
    k16, v16 = np.asarray(k).astype(dt), np.asarray(v).astype(dt)
    return (q, k16, v16, *rest), (q, k16.astype(np.float32), v16.astype(np.float32), *rest)


@pytest.mark.parametrize("S", [4, 16])
@pytest.mark.parametrize("sliding_window", [None, 5])
@pytest.mark.parametrize("soft_cap", [None, 2.0])
@pytest.mark.parametrize("dtype", PAGE_DTYPES)
def test_decode_rows_match_dense_reference(S, sliding_window, soft_cap, dtype, decode_path):
    """Lengths 1, 2, S-1, S, S+1, 2S, 3S+2, 5S+3, a query mid-sequence, padding rows; pages in each dtype the
    kernel reads (16-bit ones against the reference on the values they hold)."""
    case = make_case(S + (sliding_window or 0), S=S, rows=decode_rows(S), sliding_window=sliding_window)
    case, widened = _paged_as(case, dtype)
    q, k, v, pt, lens, pos = widened
    kw = dict(sm_scale=0.4, sliding_window=sliding_window, soft_cap=soft_cap)
    ref = dense_reference(q, k, v, pt, lens, pos, **kw)
    _check(_native(*_args(case), **kw), ref, pos, lens, 2e-5)


@pytest.mark.parametrize("sliding_window", [None, 3])
@pytest.mark.parametrize("shared", [0, 2])
@pytest.mark.parametrize("dtype", PAGE_DTYPES)
@pytest.mark.parametrize("kv,g,d", [(2, 3, 16), (3, 3, 64)])
def test_block_rows_match_dense_reference(sliding_window, shared, dtype, kv, g, d, monkeypatch):
    """Rows of 4 queries: padded slots, a block in the middle of its sequence, a row with nothing, pages
    shared by every row (a radix-cache prefix); every unseen key poisoned. Nine rows: from 8 on, a unit of the
    kernel is a whole row (all its KV heads), below one (row, KV head) -- test_model_sized_case has 7. Heads of
    D = 16, and SmolLM2's (the shared loops of 3 queries over 8 vectors)."""
    import test_attention

    for name, val in (("KV", kv), ("G", g), ("D", d), ("H", kv * g)):
        monkeypatch.setattr(test_attention, name, val)
    S, Bq = 4, 4
    rows = [(n, [t if t >= 0 else -1 for t in range(n - Bq, n)]) for n in (9, 11, 2 * S + 1, 5 * S + 3, 2, 13, 3 * S)]
    rows += [(3 * S + 1, [S, S + 1, S + 2, S + 3]), (0, [-1] * Bq)]
    case = make_case(5, S=S, rows=rows, sliding_window=sliding_window, shared=shared)
    case, widened = _paged_as(case, dtype)
    q, k, v, pt, lens, pos = widened
    kw = dict(sm_scale=0.4, sliding_window=sliding_window, soft_cap=3.0)
    ref = dense_reference(q, k, v, pt, lens, pos, **kw)
    _check(_native(*_args(case), **kw), ref, pos, lens, 2e-5)


def _pages_of_16_case(seed, kv, g, d, sliding_window, soft_cap, dtype, monkeypatch):
    """Block rows of 16 queries on pages of 16 keys at kv x g heads of d (the rows test_block_rows_on_pages_of_16
    describes), pages in `dtype`: (case, query positions, lengths, the call's keywords, the float64 reference)."""
    import test_attention

    monkeypatch.setattr(test_attention, "KV", kv)
    monkeypatch.setattr(test_attention, "G", g)
    monkeypatch.setattr(test_attention, "D", d)
    monkeypatch.setattr(test_attention, "H", kv * g)
    Bq = 16
    rows = [(16, list(range(16))), (80, list(range(64, 80))), (61, list(range(45, 61))),
            (100, [t if t < 100 else -1 for t in range(90, 106)]), (33, [32] + [-1] * (Bq - 1)),
            (0, [-1] * Bq), (130, list(range(114, 130)))]
    case = make_case(seed, S=16, rows=rows, sliding_window=sliding_window)
    case, widened = _paged_as(case, dtype)
    q, k, v, pt, lens, pos = widened
    kw = dict(sm_scale=0.2, sliding_window=sliding_window, soft_cap=soft_cap)
    return case, pos, lens, kw, dense_reference(q, k, v, pt, lens, pos, **kw)


@pytest.mark.parametrize("kv,g,d", [(3, 3, 64), (2, 4, 128), (1, 2, 64)])
@pytest.mark.parametrize("sliding_window,soft_cap", [(None, None), (37, None), (None, 2.0)])
@pytest.mark.parametrize("dtype", PAGE_DTYPES)
def test_block_rows_on_pages_of_16_match_dense_reference(kv, g, d, sliding_window, soft_cap, dtype, monkeypatch):
    """Block rows with pages of 16 keys and D = 64 / 128: a page that two or more queries of a row see takes the
    kernel's transposed-keys path (BlockPage), each query masked to its own keys there -- the causal diagonal, a
    window's edge, a row's ragged end; a page only one query sees takes the per-query path. Rows: a prefill chunk
    from position 0 (16 queries), one later in its sequence, one whose length ends mid-page, padded query slots, a
    single query, a row with nothing to see; every unseen key and padded query poisoned."""
    case, pos, lens, kw, ref = _pages_of_16_case(11 + d + kv, kv, g, d, sliding_window, soft_cap, dtype, monkeypatch)
    _check(_native(*_args(case), **kw), ref, pos, lens, 3e-5)


def test_bf16_math_available_where_the_cpu_has_avx512_bf16():
    """`bf16_math=True` takes effect exactly where the build (-march=native) has AVX512-BF16."""
    assert cpu_attention.bf16_math_available() == _has_cpu_flags("avx512_bf16")


@pytest.mark.parametrize("kv,g,d", [(3, 3, 64), (2, 4, 128)])
@pytest.mark.parametrize("sliding_window,soft_cap", [(None, None), (37, None), (None, 2.0)])
@pytest.mark.parametrize("dtype", PAGE_DTYPES)
def test_block_rows_in_bfloat16_math_match_dense_reference(kv, g, d, sliding_window, soft_cap, dtype, monkeypatch):
    """`bf16_math=True` (the engine's `attention_math: bfloat16`): block rows' q.k and p.v in bfloat16 pairs with
    float32 sums, on test_block_rows_on_pages_of_16's rows (the causal diagonal, a window's edge, ragged ends,
    padded and empty rows; every unseen key and padded query poisoned: a stray read is a NaN here too). Each of q,
    k, p, v is rounded to bfloat16 once (relative error 2^-9), so outputs are held to 4e-2 against the float64
    reference (measured 4e-3 to 1.9e-2 over these N(0, 1) cases; the float32 form's tolerance is 3e-5) -- and
    must differ from the float32 form, so the test fails if the flag did nothing. Where the CPU has no AVX512-BF16
    the flag changes nothing: bit-equal outputs."""
    case, pos, lens, kw, ref = _pages_of_16_case(23 + d + kv, kv, g, d, sliding_window, soft_cap, dtype, monkeypatch)
    out = np.asarray(_native(*_args(case), bf16_math=True, **kw))
    _check_bf16(out, np.asarray(_native(*_args(case), **kw)), ref, pos, lens, "bf16_math changed nothing")


def _check_bf16(out, other, ref, pos, lens, unchanged: str):
    """`out` (bfloat16 math) against the reference at 4e-2, and different from `other` (float32 math, or the path
    off: else `unchanged` fails it); where the CPU has no AVX512-BF16, bit-equal to `other`."""
    if not cpu_attention.bf16_math_available():
        np.testing.assert_array_equal(out, other)
        return
    _check(out, ref, pos, lens, 4e-2)
    seen = (pos >= 0) & (lens[:, None] > 0)
    print(f"max |bf16 - ref| {np.abs(out - ref)[seen].max():.2e}")
    assert np.abs(out - other)[seen].max() > 1e-5, unchanged


@pytest.fixture
def split_min_keys():
    """Sets the kernel's decode split for a test (`set(keys)`), restoring it after."""
    before = cpu_attention.decode_split_min_keys()
    yield lambda keys: cpu_attention.decode_split_min_keys(keys) if before is not None else None
    if before is not None:
        cpu_attention.decode_split_min_keys(before)


@pytest.mark.parametrize("which", ["seven", "two", "one"])
@pytest.mark.parametrize("kv,g,d", [(3, 3, 64), (1, 2, 32)])
@pytest.mark.parametrize("min_keys", [1, 3, 16])
@pytest.mark.parametrize("S", [4, 16])
@pytest.mark.parametrize("sliding_window", [None, 5])
@pytest.mark.parametrize("soft_cap", [None, 2.0])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_few_decode_rows_split_along_their_keys_match_dense_reference(which, kv, g, d, min_keys, S, sliding_window,
                                                                     soft_cap, dtype, split_min_keys, monkeypatch):
    """Fewer than 8 decode rows are cut into key ranges of at least `min_keys` keys (page-aligned) whose partial
    softmax states are merged, at head shapes the two-pass loops take (D = 64, 32) -- more ranges the fewer the
    (row, KV head) units (on two threads: 2 a unit for seven rows, 4-8 for one or two rows, fewer where a row is
    short): lengths 1, S-1, S+1, 3S+2, 5S+3, a query mid-sequence, a padding row (every unseen key NaN, as above);
    with a window, ranges wholly before it."""
    import test_attention

    for name, val in (("KV", kv), ("G", g), ("D", d), ("H", kv * g)):
        monkeypatch.setattr(test_attention, name, val)
    split_min_keys(min_keys)
    rows = {"seven": [(n, [n - 1]) for n in (1, S - 1, S + 1, 3 * S + 2, 5 * S + 3)] + [(4 * S + 1, [2 * S + 1]),
                                                                                      (0, [-1])],
            "two": [(3 * S + 2, [3 * S + 1]), (4 * S + 1, [2 * S + 1])],
            "one": [(5 * S + 3, [5 * S + 2])]}[which]
    case = make_case(S + (sliding_window or 0) + min_keys, S=S, rows=rows, sliding_window=sliding_window)
    case, widened = _paged_as(case, dtype)
    q, k, v, pt, lens, pos = widened
    kw = dict(sm_scale=0.4, sliding_window=sliding_window, soft_cap=soft_cap)
    _check(_native(*_args(case), **kw), dense_reference(q, k, v, pt, lens, pos, **kw), pos, lens, 2e-5)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_one_long_decode_row_split_matches_unsplit_and_reference(rows, dtype, split_min_keys, monkeypatch):
    """SmolLM2's heads (3 KV x 3, D = 64), pages of 16, rows of 1,000-2,000 keys: split (the default, 128 keys a
    range at least) against the same call unsplit (min keys 0) and the float64 reference; the two differ in their
    last bits (summation order), so the split did run. Without AVX2 (no split in the build): the online form
    against the reference."""
    import test_attention

    for name, val in (("KV", 3), ("G", 3), ("D", 64), ("H", 9)):
        monkeypatch.setattr(test_attention, name, val)
    lens = [2000, 1001, 1337][:rows]
    case = make_case(7 + rows, S=16, rows=[(n, [n - 1]) for n in lens], poison_unseen=True)
    case, widened = _paged_as(case, dtype)
    q, k, v, pt, lens_, pos = widened
    kw = dict(sm_scale=0.125)
    ref = dense_reference(q, k, v, pt, lens_, pos, **kw)
    if split_min_keys(128) is None:  # no AVX2: rows are never split; the online form against the reference
        assert not _has_cpu_flags("avx2"), "the build lacks the two-pass loops this CPU has"
        _check(_native(*_args(case), **kw), ref, pos, lens_, 2e-5)
        return
    split = np.asarray(_native(*_args(case), **kw))
    split_min_keys(0)
    whole = np.asarray(_native(*_args(case), **kw))
    _check(split, ref, pos, lens_, 2e-5)
    np.testing.assert_allclose(split, whole, atol=1e-6, rtol=1e-5)
    assert not np.array_equal(split, whole)


def test_decode_rows_ignore_bf16_math(decode_path):
    """Decode rows (one query a row) with pages of their own stay float32 under `bf16_math`: bit-equal outputs."""
    S = 16
    case = make_case(41, S=S, rows=decode_rows(S), sliding_window=None)
    a = np.asarray(_native(*_args(case), sm_scale=0.4, bf16_math=True))
    np.testing.assert_array_equal(a, np.asarray(_native(*_args(case), sm_scale=0.4)))


def _grouped_decode_case(seed, kv, g, d, alone, window):
    """Decode rows (pages of 16) that read the same pages, in a shuffled order: six branches of a fork over a
    5-page prefix (lengths past it, one ending at its edge, one query inside it), a branch that parts from the
    prefix after its first page, nine consecutive tokens of one sequence laid out as decode rows (one table),
    `alone` rows with pages of their own, and padding rows. Every (page, slot) no query sees is NaN."""
    rng = np.random.default_rng(seed)
    S = 16
    fresh = iter(rng.permutation(np.arange(1, 400)))
    own = lambda n: [int(next(fresh)) for _ in range(n)]  # noqa: E731
    prefix, seq = own(5), own(7)
    rows = []  # (table, kv_len, query position)
    for n in (81, 95, 96, 97, 130, 80):
        rows.append((prefix + own(-(-n // S) - 5), n, n - 1))
    rows.append((prefix, 80, 39))  # a query inside the prefix
    rows.append((prefix[:1] + own(3), 60, 59))  # shares only the first page
    rows += [(seq, t + 1, t) for t in range(100, 109)]
    rows += [(own(-(-n // S)), n, n - 1) for n in rng.integers(1, 120, alone)]
    rows += [([], 0, -1)] * 2
    return _decode_rows_case(rng, rows, kv, g, d, N=400, P=10, window=window)


@pytest.mark.parametrize("kv,g,d", [(3, 3, 64), (2, 4, 128), (1, 2, 64)])
@pytest.mark.parametrize("alone", [3, 9])
@pytest.mark.parametrize("window,soft_cap", [(None, None), (37, None), (None, 2.0)])
@pytest.mark.parametrize("dtype", SHARED_DTYPES)
def test_decode_rows_sharing_pages_match_dense_reference(kv, g, d, alone, window, soft_cap, dtype, monkeypatch,
                                                        decode_path):
    """Decode rows that read the same pages (a fork's branches, a sequence's tokens laid out as decode rows) beside
    rows of their own, at model head sizes on pages of 16, in float32 math: every row reads its pages alone (row
    units are whole rows from 8 rows on, else (row, KV head)). The shared pages computed once under `bf16_math`:
    test_decode_rows_sharing_pages_computed_once_match_reference."""
    import test_attention

    for name, val in (("KV", kv), ("G", g), ("D", d), ("H", kv * g)):
        monkeypatch.setattr(test_attention, name, val)
    case = _grouped_decode_case(7 + d + alone, kv, g, d, alone, window)
    case, widened = _paged_as(case, dtype)
    q, k, v, pt, lens, pos = widened
    kw = dict(sm_scale=0.2, sliding_window=window, soft_cap=soft_cap)
    ref = dense_reference(q, k, v, pt, lens, pos, **kw)
    _check(_native(*_args(case), **kw), ref, pos, lens, 3e-5)


@pytest.fixture
def shared_min_pages():
    """Sets the kernel's shared-pages path for a test (`set(pages)`, 0 off), restoring it after. A build without
    AVX-512 has no such path (every row reads its pages alone, whatever the setting): there the setter changes
    nothing, and the tests' comparisons hold the kernel to the reference and to bit-equal outputs either setting."""
    before = cpu_attention.decode_shared_min_pages()
    if before is None:
        assert not _has_cpu_flags("avx512f", "avx512vl"), "the build lacks the AVX-512 loops this CPU has"
        yield lambda pages: None
        return
    yield cpu_attention.decode_shared_min_pages
    cpu_attention.decode_shared_min_pages(before)


def _nested_fork_case(seed, kv, g, d):
    """Decode rows (pages of 16) of a tree of forks, shuffled: a 6-page prompt; two branches of 3 more pages each
    over it, each forked again into rows of their own pages (4 rows, one of 790 keys, whose own keys the kernel
    cuts in ranges; then 2, one ending exactly at a page edge); one row that parts from the prompt after 3 pages
    (too few to share); a row whose query sits inside the prompt (4 whole pages seen); rows of their own; a padding
    row. Every unseen (page, slot) is NaN."""
    rng = np.random.default_rng(seed)
    S = 16
    fresh = iter(rng.permutation(np.arange(1, 300)))
    own = lambda n: [int(next(fresh)) for _ in range(n)]  # noqa: E731
    prompt, left, right = own(6), own(3), own(3)
    rows = [(prompt + left + own(-(-n // S) - 9), n, n - 1) for n in (150, 160, 175, 790)]
    rows += [(prompt + right + own(-(-n // S) - 9), n, n - 1) for n in (160, 170)]
    rows += [(prompt[:3] + own(5), 120, 119), (prompt, 96, 70), (own(4), 60, 59), (own(2), 17, 16), ([], 0, -1)]
    return _decode_rows_case(rng, rows, kv, g, d, N=300, P=52)


def _long_prompt_case(seed, kv, g, d):
    """Decode rows (pages of 16) of a fork over a 41-page prompt (656 keys: the kernel cuts its pages in ranges),
    branches 1-60 keys past it (one at the prompt's last key), beside rows of their own and a padding row."""
    rng = np.random.default_rng(seed)
    fresh = iter(rng.permutation(np.arange(1, 300)))
    own = lambda n: [int(next(fresh)) for _ in range(n)]  # noqa: E731
    prompt = own(41)
    rows = [(prompt + own(-(-n // 16) - 41), n, n - 1) for n in (657, 660, 671, 700, 716)]
    rows += [(prompt, 656, 655), (own(30), 470, 469), (own(3), 40, 39), ([], 0, -1)]
    return _decode_rows_case(rng, rows, kv, g, d, N=300, P=46)


def _decode_rows_case(rng, rows, kv, g, d, N, P, window=None):
    """(q, k, v, table, lens, pos) for decode rows given as (pages, kv_len, query position), shuffled, pages of 16;
    every (page, slot) no query sees (past it, or before its `window`) is NaN, and padded queries too."""
    S = 16
    rows = [rows[i] for i in rng.permutation(len(rows))]
    R = len(rows)
    k = rng.standard_normal((N, kv, S, d)).astype(np.float32)
    v = rng.standard_normal((N, kv, S, d)).astype(np.float32)
    poison = np.ones((N, S), bool)
    table = np.zeros((R, P), np.int32)
    for r, (pages, n, t) in enumerate(rows):
        table[r, : len(pages)] = pages
        for j in range(max(0, t - window + 1) if window else 0, min(t + 1, n)):
            poison[pages[j // S], j % S] = False
    k[np.broadcast_to(poison[:, None, :], k.shape[:3])] = np.nan
    v[np.broadcast_to(poison[:, None, :], v.shape[:3])] = np.nan
    lens = np.asarray([n for _, n, _ in rows], np.int32)
    pos = np.asarray([[t] for _, _, t in rows], np.int32)
    q = rng.standard_normal((R, 1, kv * g, d)).astype(np.float32)
    q[pos < 0] = np.nan
    return q, k, v, table, lens, pos


@pytest.mark.parametrize("which", ["fork", "nested", "long"])
@pytest.mark.parametrize("kv,g,d", [(3, 3, 64), (2, 4, 128), (1, 2, 64)])
@pytest.mark.parametrize("min_pages", [1, 4, 6])
@pytest.mark.parametrize("soft_cap", [None, 2.0])
@pytest.mark.parametrize("dtype", SHARED_DTYPES)
def test_decode_rows_sharing_pages_computed_once_match_reference(which, kv, g, d, min_pages, soft_cap, dtype,
                                                                 shared_min_pages, monkeypatch):
    """Under `bf16_math` (the engine's `attention_math: bfloat16`), decode rows that share at least `min_pages`
    whole leading pages have them computed once for all their queries (each page widened once, q.k and p.v in
    bfloat16 pairs with float32 sums as block rows take them), their own keys past them row by row in float32, the
    partial states merged: on a fork's branches (with a sequence's tokens as rows, rows of their own, padding) and
    on a tree of forks, against the float64 reference at block rows' bfloat16 tolerance (4e-2; a state merged
    wrongly is off by O(1)), and against the same call with the path off (0), which it must differ from, so the
    path ran. Without `bf16_math`, or where the CPU has no AVX512-BF16, every row reads its pages alone in float32:
    bit-equal outputs either setting."""
    import test_attention

    for name, val in (("KV", kv), ("G", g), ("D", d), ("H", kv * g)):
        monkeypatch.setattr(test_attention, name, val)
    make = {"nested": _nested_fork_case, "long": _long_prompt_case,
            "fork": lambda s, kv, g, d: _grouped_decode_case(s, kv, g, d, 3, None)}[which]
    case, widened = _paged_as(make(3 + d + min_pages, kv, g, d), dtype)
    q, k, v, pt, lens, pos = widened
    kw = dict(sm_scale=0.2, soft_cap=soft_cap)
    ref = dense_reference(q, k, v, pt, lens, pos, **kw)
    shared_min_pages(0)
    alone = np.asarray(_native(*_args(case), **kw))
    np.testing.assert_array_equal(alone, np.asarray(_native(*_args(case), bf16_math=True, **kw)))
    _check(alone, ref, pos, lens, 3e-5)
    shared_min_pages(min_pages)
    np.testing.assert_array_equal(alone, np.asarray(_native(*_args(case), **kw)))
    out = np.asarray(_native(*_args(case), bf16_math=True, **kw))
    _check_bf16(out, alone, ref, pos, lens, "the shared-pages path did not run")


@pytest.mark.parametrize("which", ["nested", "long"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_shared_pages_merge_with_rows_own_keys_to_float32_precision(which, dtype, shared_min_pages, monkeypatch):
    """The merge itself at float32 precision: the pages several rows read hold zero keys and values, which bfloat16
    represents exactly (every shared score is 0, every shared probability exp(0 - max), every product 0), so the
    shared path's output is exact in its shared part and everything else -- the rows' own keys, in page-aligned
    ranges of at most 32 pages (a 790-key row's are cut), and the merge of all the states -- is float32: held to
    3e-5 against the float64 reference, where a key dropped or counted twice at a range's edge is not."""
    import test_attention

    for name, val in (("KV", 3), ("G", 3), ("D", 64), ("H", 9)):
        monkeypatch.setattr(test_attention, name, val)
    make = _nested_fork_case if which == "nested" else _long_prompt_case
    q, k, v, pt, lens, pos = make(17, 3, 3, 64)
    used = np.concatenate([pt[r, : -(-n // 16)] for r, n in enumerate(lens)])
    pages, counts = np.unique(used, return_counts=True)
    k[pages[counts > 1]] = 0.0  # the pages several rows read: the prompts
    v[pages[counts > 1]] = 0.0
    case, widened = _paged_as((q, k, v, pt, lens, pos), dtype)
    shared_min_pages(1)
    kw = dict(sm_scale=0.2)
    ref = dense_reference(*widened, **kw)
    _check(np.asarray(_native(*_args(case), bf16_math=True, **kw)), ref, pos, lens, 3e-5)


def _cached_prefix_block_rows(Bq):
    """Block rows (prefill chunks of `Bq` query slots, pages of 16) after cached prefixes: 300 keys cached (a chunk
    starting inside a page), 1,000 cached with padded slots past the prompt's end, 130 and 128 cached (8 whole pages),
    100 cached (6 pages: too few to share), a chunk of 3 queries after 400, a fresh prompt, and an empty row. Every
    row's first 63 pages are one prefix's (make_case's `shared`: requests on one cached prompt): the two chunks over
    128-130 keys form one run, the two over 1,000 another, the one over 300 its own (joining the 8-page run would
    hold it to 8 of its 18 pages), and the 3-query chunk, alone for the same reason, has too little work."""
    def chunk(start, n, length=None):
        return (length or start + n, [start + b if b < n else -1 for b in range(Bq)])
    return [chunk(300, Bq), chunk(1000, Bq - 5), chunk(1000, Bq), chunk(130, Bq), chunk(128, Bq), chunk(100, Bq),
            chunk(400, 3), chunk(0, Bq), (0, [-1] * Bq)]


@pytest.mark.parametrize("Bq", [16, 64])
@pytest.mark.parametrize("kv,g,d", [(3, 3, 64), (2, 4, 128)])
@pytest.mark.parametrize("soft_cap", [None, 2.0])
@pytest.mark.parametrize("dtype", PAGE_DTYPES)
def test_block_rows_over_a_cached_prefix_computed_once_match_reference(Bq, kv, g, d, soft_cap, dtype,
                                                                      shared_min_pages, monkeypatch):
    """Under `bf16_math`, a block row's pages wholly before its first query (a prompt's cached prefix) are computed
    once for all its queries in the two-pass bfloat16 form, its other keys as block rows always are, the partial
    states merged per query: against the float64 reference at bfloat16's tolerance (4e-2, every unseen key NaN),
    with an error no larger on average than the path off gives (so no key range is dropped or counted twice), and
    different from the path off (so it ran). Without AVX512-BF16: the same bits either setting."""
    import test_attention

    for name, val in (("KV", kv), ("G", g), ("D", d), ("H", kv * g)):
        monkeypatch.setattr(test_attention, name, val)
    case = make_case(29 + d + Bq, S=16, rows=_cached_prefix_block_rows(Bq), shared=63)
    case, widened = _paged_as(case, dtype)
    q, k, v, pt, lens, pos = widened
    kw = dict(sm_scale=0.2, soft_cap=soft_cap, bf16_math=True)
    ref = dense_reference(q, k, v, pt, lens, pos, sm_scale=0.2, soft_cap=soft_cap)
    shared_min_pages(0)
    off = np.asarray(_native(*_args(case), **kw))
    shared_min_pages(8)
    on = np.asarray(_native(*_args(case), **kw))
    if not cpu_attention.bf16_math_available():
        np.testing.assert_array_equal(on, off)
        return
    _check(on, ref, pos, lens, 4e-2)
    seen = (pos >= 0) & (lens[:, None] > 0)
    err_on, err_off = np.abs(on - ref)[seen].mean(), np.abs(off - ref)[seen].mean()
    print(f"mean |err| shared {err_on:.2e}, alone {err_off:.2e}")
    assert err_on < 1.5 * err_off + 1e-4
    assert np.abs(on - off)[seen].max() > 1e-5, "the shared-pages path did not run"
    for r in (5, 6):  # 6 pages cached (too few), 3 queries x 25 pages (too little work): the same bits either way
        np.testing.assert_array_equal(on[r], off[r])
    # chunks on prefixes of their own with too little work (3 queries x 25 pages, 8 x 9): the same bits either way
    alone = make_case(37 + d, S=16, rows=[(403, [400, 401, 402] + [-1] * (Bq - 3)),
                                          (158, list(range(150, 158)) + [-1] * (Bq - 8))])
    alone, _ = _paged_as(alone, dtype)
    outs = []
    for pages in (0, 8):
        shared_min_pages(pages)
        outs.append(np.asarray(_native(*_args(alone), **kw)))
    np.testing.assert_array_equal(*outs)


def test_block_rows_with_a_window_are_left_alone(shared_min_pages, monkeypatch):
    """A window (Mistral-style) keeps block rows off the shared-pages path: the same bits with it on and off."""
    import test_attention

    for name, val in (("KV", 3), ("G", 3), ("D", 64), ("H", 9)):
        monkeypatch.setattr(test_attention, name, val)
    case = make_case(31, S=16, rows=_cached_prefix_block_rows(16), sliding_window=700)
    outs = []
    for pages in (0, 8):
        shared_min_pages(pages)
        outs.append(np.asarray(_native(*_args(case), sm_scale=0.2, sliding_window=700, bf16_math=True)))
    np.testing.assert_array_equal(*outs)


def test_shared_pages_path_leaves_rows_it_cannot_share_alone(shared_min_pages, monkeypatch):
    """Under `bf16_math`, rows that share fewer whole pages than the setting give the same bits with the path on
    and off (it does not run), and so do rows sharing pages whose window starts past the prompt's start."""
    import test_attention

    dims = 3, 3, 64
    for name, val in (("KV", 3), ("G", 3), ("D", 64), ("H", 9)):
        monkeypatch.setattr(test_attention, name, val)
    windowed, whole = _grouped_decode_case(5, *dims, 3, 37), _grouped_decode_case(5, *dims, 3, None)
    outs = {}
    for pages in (0, 4, 50):
        shared_min_pages(pages)
        outs[pages] = (np.asarray(_native(*_args(windowed), sm_scale=0.2, sliding_window=37, bf16_math=True)),
                       np.asarray(_native(*_args(whole), sm_scale=0.2, bf16_math=True)))
    np.testing.assert_array_equal(outs[0][0], outs[4][0])
    np.testing.assert_array_equal(outs[0][0], outs[50][0])
    np.testing.assert_array_equal(outs[0][1], outs[50][1])
    if cpu_attention.bf16_math_available():
        assert not np.array_equal(outs[0][1], outs[4][1])  # the rows without a window did share


def test_jnp_reference_matches_dense_reference():
    """The pure-jnp reference beside the kernel is itself right (decode rows and block rows)."""
    for S, rows in ((16, decode_rows(16)), (4, [(n, list(range(n - 3, n + 1))) for n in (4, 9, 17)])):
        case = make_case(2, S=S, rows=rows, sliding_window=6)
        q, k, v, pt, lens, pos = case
        kw = dict(sm_scale=0.3, sliding_window=6, soft_cap=None)
        _check(_ref(*_args(case), **kw), dense_reference(q, k, v, pt, lens, pos, **kw), pos, lens, 2e-5)


@pytest.mark.parametrize("rows,Bq,dtype", [(64, 1, "float32"), (7, 64, "float32"), (64, 1, "float16"),
                                           (7, 64, "bfloat16"), (64, 1, "float8_e4m3fn"), (7, 64, "float8_e5m2")])
def test_model_sized_case_matches_jnp_reference(rows, Bq, dtype, decode_path):
    """SmolLM2's head shapes (9 query heads over 3 KV heads, D = 64, pages of 16): many rows of up to 1,000
    keys in a shuffled pool -- every unit of work spread over the threads -- against `ref_paged_attention`."""
    rng = np.random.default_rng(rows)
    H, KV, D, S = 9, 3, 64, 16
    lens = rng.integers(Bq, 1000, rows).astype(np.int32)
    need = -(-lens // S)
    P = int(need.max())
    N = 1 + int(need.sum())
    perm = rng.permutation(np.arange(1, N))
    table = np.zeros((rows, P), np.int32)
    off = 0
    for r in range(rows):
        table[r, : need[r]] = perm[off: off + need[r]]
        off += need[r]
    q = rng.standard_normal((rows, Bq, H, D)).astype(np.float32)
    k = rng.standard_normal((N, KV, S, D)).astype(np.float32)
    v = rng.standard_normal((N, KV, S, D)).astype(np.float32)
    pos = (lens[:, None] - Bq + np.arange(Bq)[None, :]).astype(np.int32)
    case, _ = _paged_as((q, k, v, table, lens, pos), dtype)  # the jnp reference widens 16-bit pages itself
    out = np.asarray(_native(*_args(case), sm_scale=0.125))
    np.testing.assert_allclose(out, np.asarray(_ref(*_args(case), sm_scale=0.125)), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2"])
@pytest.mark.parametrize("Bq", [1, 16])
def test_every_float8_code_widens_exactly(dtype, Bq, decode_path):
    """All 256 codes of each float8 format (subnormals, zeros of both signs, the largest, NaN; e5m2's infinities)
    through the kernel's loads: a query that sees one key gets that key's value row exactly (its probability is
    1), so each output element must equal ml_dtypes' widening of the code stored there -- the decode loads (Bq =
    1) and the block rows' (Bq = 16). The key rows hold the same codes (one NaN code among them would make every
    output NaN, so the keys are the finite codes' first 64)."""
    dt = jnp.dtype(dtype)
    codes = np.arange(256, dtype=np.uint8).view(dt)
    want = codes.astype(np.float32)
    finite = codes[np.isfinite(want)][:64]
    D, S = 64, 16
    k = np.zeros((6, 1, S, D), dt)
    v = np.zeros((6, 1, S, D), dt)
    for i in range(4):  # row i's one visible key: page i + 1, slot 0; its value row holds codes 64 i .. 64 i + 63
        k[i + 1, 0, 0] = finite
        v[i + 1, 0, 0] = codes[64 * i: 64 * (i + 1)]
    q = np.full((4, Bq, 2, D), 0.01, np.float32)
    pos = np.full((4, Bq), -1, np.int32)
    pos[:, 0] = 0
    table = np.arange(1, 5, dtype=np.int32)[:, None]
    rest = (table, np.ones(4, np.int32), pos)
    out = np.asarray(_native(*_args((q, k, v, *rest)), sm_scale=1.0))
    got = out[:, 0, :, :]  # [4, 2 heads, D]: both query heads of the KV head read the same value row
    for h in range(2):
        np.testing.assert_array_equal(got[:, h].reshape(-1), want)  # NaN where want is NaN
    # the engine's storage: the same codes as uint8, the format an attribute -- the same bits
    as_codes = _native(*_args((q, k.view(np.uint8), v.view(np.uint8), *rest)), sm_scale=1.0, kv_format=dtype)
    np.testing.assert_array_equal(np.asarray(as_codes), out)


def test_write_kv_stores_float8_codes_and_needs_the_format_of_a_uint8_pool():
    """A float8 pool's write: values clamped to the format's range, then their codes (a value past e4m3's 448 is
    448, not NaN; past e5m2's 57344, 57344, not infinity); a uint8 pool without its format is refused by name."""
    from sgl_jax.models.attention import write_kv

    pool = jnp.zeros((2, 1, 4, 8), jnp.uint8)
    k = jnp.asarray(np.array([1.0, -3.5, 500.0, -1e6, 0.01, 2.0, 7.0, 0.0], np.float32)).reshape(1, 1, 8)
    for fmt, big in (("float8_e4m3fn", 448.0), ("float8_e5m2", 57344.0)):
        kp, _ = write_kv((pool, pool), k, k, jnp.asarray([5], jnp.int32), kv_format=fmt)
        got = np.asarray(kp)[1, 0, 1].view(jnp.dtype(fmt)).astype(np.float32)
        want = np.clip(np.asarray(k).reshape(-1), -big, big).astype(jnp.dtype(fmt)).astype(np.float32)
        np.testing.assert_array_equal(got, want)
        assert np.isfinite(got).all() and got[3] == -big and got[2] == (448.0 if big == 448.0 else 512.0)
    with pytest.raises(ValueError, match="kv_format"):
        write_kv((pool, pool), k, k, jnp.asarray([5], jnp.int32))


def test_bad_operands_raise_naming_them():
    q = jnp.zeros((2, 1, 6, 16))
    k = jnp.zeros((8, 2, 4, 16))
    good = (q, k, k, jnp.zeros((2, 3), jnp.int32), jnp.ones((2,), jnp.int32), jnp.zeros((2, 1), jnp.int32))
    with pytest.raises(ValueError, match=r"page_table \[2, P\]"):
        cpu_attention.paged_attention(*good[:3], jnp.zeros((3, 3), jnp.int32), *good[4:], sm_scale=1.0)
    with pytest.raises(ValueError, match="KV heads"):
        cpu_attention.paged_attention(jnp.zeros((2, 1, 5, 16)), *good[1:], sm_scale=1.0)
    with pytest.raises(ValueError, match="float32"):
        cpu_attention.paged_attention(q.astype(jnp.bfloat16), *good[1:], sm_scale=1.0)
    with pytest.raises(ValueError, match="both the same"):
        cpu_attention.paged_attention(q, k, k.astype(jnp.float16), *good[3:], sm_scale=1.0)
    with pytest.raises(ValueError, match="float8_e4m3fn or float8_e5m2 k/v pages"):
        cpu_attention.paged_attention(q, k.astype(jnp.int8), k.astype(jnp.int8), *good[3:], sm_scale=1.0)
    with pytest.raises(ValueError, match=r"\[N, KV, S, 16\]"):
        cpu_attention.paged_attention(q, jnp.zeros((8, 2, 4, 8)), jnp.zeros((8, 2, 4, 8)), *good[3:], sm_scale=1.0)


def test_page_index_outside_the_pool_is_an_error_not_a_read(decode_path):
    q, k = jnp.ones((1, 1, 2, 8)), jnp.ones((4, 1, 4, 8))
    with pytest.raises(Exception, match="outside the pool"):
        _native(q, k, k, jnp.asarray([[1, 99]], jnp.int32), jnp.asarray([6], jnp.int32),
                jnp.asarray([[5]], jnp.int32), sm_scale=1.0).block_until_ready()
    # a block row of 3 queries, a page past the first outside the pool
    q = jnp.ones((1, 3, 2, 64))
    with pytest.raises(Exception, match="outside the pool"):
        _native(q, jnp.ones((4, 1, 16, 64)), jnp.ones((4, 1, 16, 64)), jnp.asarray([[1, 99]], jnp.int32),
                jnp.asarray([20], jnp.int32), jnp.asarray([[17, 18, 19]], jnp.int32), sm_scale=1.0).block_until_ready()
    # decode rows sharing their first page (a group unit), the second row's next page outside the pool
    q, k = jnp.ones((2, 1, 2, 64)), jnp.ones((4, 1, 16, 64))
    with pytest.raises(Exception, match="outside the pool"):
        _native(q, k, k, jnp.asarray([[1, 2], [1, 99]], jnp.int32), jnp.asarray([20, 20], jnp.int32),
                jnp.asarray([[19], [19]], jnp.int32), sm_scale=1.0).block_until_ready()
    # decode rows sharing four whole pages (the shared-pages path under bf16_math), one of them outside the pool
    q, k = jnp.ones((3, 1, 2, 64)), jnp.ones((8, 1, 16, 64))
    table = jnp.asarray([[1, 2, 99, 3, 4], [1, 2, 99, 3, 5], [1, 2, 99, 3, 6]], jnp.int32)
    for bf16 in (False, True):
        with pytest.raises(Exception, match="outside the pool"):
            _native(q, k, k, table, jnp.asarray([70, 70, 70], jnp.int32), jnp.asarray([[69], [69], [69]], jnp.int32),
                    sm_scale=1.0, bf16_math=bf16).block_until_ready()


@pytest.mark.parametrize("kv_dtype", [None, "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"])
def test_model_with_native_backend_matches_jnp(tmp_path, kv_dtype):
    """A tiny model's logits (prefill with a cached prefix, decode rows, a run block) equal the jnp backend's,
    with a float32 pool and with 16-bit ones; `auto` on CPU is the native kernel."""
    from helpers import PagedRunner
    from sgl_jax.models.attention import get_attention_backend
    from sgl_jax.models.loader import load_weights
    from sgl_jax.models.testing import write_tiny_checkpoint

    assert get_attention_backend("auto").name == "cpu_native"
    write_tiny_checkpoint("llama", str(tmp_path))
    cfg, params = load_weights(str(tmp_path), progress=False)
    outs = {}
    for name in ("jnp", "cpu_native"):
        r = PagedRunner(cfg, params, num_pages=16, page_size=16, block_q=8, attention_backend=name,
                        kv_dtype=kv_dtype)
        a = r.step([(0, list(range(3, 23)), 0, 0), (1, list(range(40, 45)), 0, 0)])
        b = r.step([(0, [7], 20, None), (1, list(range(50, 60)), 5, 5)])
        c = r.step([(0, [8, 9, 10], 21, 21, True), (1, [11], 15, None)], run_q=4)  # a run block + a decode
        outs[name] = np.concatenate([x for x in a + b + c])
    # with a 16-bit pool the jnp path rounds its probabilities to the pool's dtype before the value product (the
    # kernel keeps them in float32), so the two agree to that dtype's precision, not float32's; a float8 pool's
    # values are widened on both (models/attention.py _pv), so they agree as a float32 pool's do
    tol = {None: 2e-5, "float16": 4e-3, "bfloat16": 3e-2, "float8_e4m3fn": 2e-5, "float8_e5m2": 2e-5}[kv_dtype]
    diff = np.abs(outs["cpu_native"] - outs["jnp"]).max()
    print(f"kv {kv_dtype}: max |native - jnp| {diff:.2e}")
    np.testing.assert_allclose(outs["cpu_native"], outs["jnp"], atol=tol, rtol=tol)
