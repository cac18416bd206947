"""The Engine end to end on a tiny random GGUF model (2 layers, byte-level tokenizer, vocab 300)."""

import asyncio
import random
import threading
import time

import jax
import numpy as np
import pytest

from helpers import SUITE_CACHE, PagedRunner
from sgl_jax.engine import Engine
from sgl_jax.errors import InvalidRequestError
from sgl_jax.models.loader import load_weights
from sgl_jax.models.testing import write_tiny_gguf

SMALL = dict(page_size=4, max_context_len=128, max_running_requests=8, max_prefill_tokens=64, prefill_block=8,
             decode_buckets=[1, 4, 8], prefill_block_buckets=[2, 8], max_mixed_blocks=2,
             page_width_buckets=[32], max_top_logprobs=5, compile_cache_dir=SUITE_CACHE, kv_memory_gb=0.01,
             full_logit_rows=8)  # a prompt's logprobs over several steps (test_logprobs_match_model: 20 rows)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_gguf("llama", str(tmp_path_factory.mktemp("tiny") / "tiny.gguf"))


@pytest.fixture(scope="module")
def engine(tiny_path):
    with Engine(model=tiny_path, progress=False, **SMALL) as e:
        yield e


def reference_greedy(path, prompt_ids, n, kv_dtype=None):
    """`n` greedy tokens after `prompt_ids` from PagedRunner on the checkpoint's weights (the engine's
    independent twin: the jnp attention), its KV pool in `kv_dtype` (None: float32). Its page tables and prompt
    blocks are padded to buckets of 16 pages and 8 blocks, so the suite's many calls compile a handful of shapes
    rather than one per context length."""
    cfg, params = load_weights(path, progress=False)
    pages, blocks = -(-(len(prompt_ids) + n) // 4), -(-len(prompt_ids) // 8)
    runner = PagedRunner(cfg, params, num_pages=64, page_size=4, block_q=8, nan_fill=False, kv_dtype=kv_dtype,
                         page_width=-(-pages // 16) * 16, prefill_blocks=-(-blocks // 8) * 8)
    (logits,) = runner.step([(0, prompt_ids, 0, None)])
    out = [int(logits[-1].argmax())]
    for i in range(n - 1):
        (logits,) = runner.step([(0, [out[-1]], len(prompt_ids) + i, None)])
        out.append(int(logits[-1].argmax()))
    return out


def prompts(k, seed=0, lo=3, hi=40):
    rng = random.Random(seed)
    return [[rng.randrange(3, 297) for _ in range(rng.randrange(lo, hi))] for _ in range(k)]


GREEDY = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}


def test_greedy_matches_independent_forward(engine, tiny_path):
    for ids in prompts(3, seed=1):
        out = engine.generate(input_ids=ids, sampling_params=GREEDY)
        assert out["output_ids"] == reference_greedy(tiny_path, ids, 12)
        assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 12}
        assert out["meta_info"]["prompt_tokens"] == len(ids)
    engine.check_integrity()


def test_float8_kv_pool_greedy_matches_independent_forward(tiny_path):
    """A float8 KV pool, named as SGLang names it (`fp8_e4m3`; the host tier's tests take `fp8_e5m2`): the pool
    holds float8_e4m3fn codes as uint8 (a quarter of float32's page bytes), and greedy outputs through the engine
    (the native CPU kernel reading the codes) equal the independent forward's with a pool of the same dtype (the
    jnp attention widening them), prompts from 3 to 60 tokens; the cache's invariants hold after."""
    import jax.numpy as jnp

    dtype = "float8_e4m3fn"
    # warmup off: only the shapes these prompts reach compile (warmup has tests of its own)
    with Engine(model=tiny_path, progress=False, **dict(SMALL, kv_dtype="fp8_e4m3", warmup=False)) as e:
        assert e.runner.kv[0][0].dtype == jnp.uint8 and e.runner.kv_format == dtype  # the codes, and their format
        k = e.runner.kv[0][0]
        assert e.runner.page_bytes == 2 * len(e.runner.kv) * k[0].size  # one byte an element
        for ids in prompts(3, seed=31, lo=3, hi=60):
            out = e.generate(input_ids=ids, sampling_params=GREEDY)
            assert out["output_ids"] == reference_greedy(tiny_path, ids, 12, kv_dtype=dtype)
        e.check_integrity()


def test_float8_kv_pool_on_a_pallas_backend_is_refused_naming_it(tiny_path):
    """The Pallas kernels take float32 / bfloat16 pages: a float8 pool with one of them is refused at start-up,
    naming the dtype and the backend, before anything compiles."""
    with pytest.raises(ValueError, match="kv_dtype float8_e5m2.*pallas_gpu kernel takes float32 or bfloat16"):
        Engine(model=tiny_path, progress=False, **dict(SMALL, kv_dtype="fp8_e5m2", attention_backend="pallas_gpu"))


def test_float8_kv_pool_through_a_pallas_function_is_refused_naming_it():
    """The same refusal where the model is used without the runner (its Pallas attention function, when traced)."""
    import jax.numpy as jnp

    from sgl_jax.models.attention import get_attention_backend

    fn = get_attention_backend("pallas_gpu_interpret").fn
    q, pages = jnp.ones((1, 1, 2, 16)), jnp.zeros((4, 1, 16, 16), jnp.uint8)
    one = jnp.ones((1,), jnp.int32)
    with pytest.raises(ValueError, match="kv_dtype float8_e4m3fn.*pallas_gpu_interpret kernel takes float32 or"):
        fn(q, pages, pages, jnp.ones((1, 1), jnp.int32), one, one[:, None], sm_scale=1.0, kv_format="float8_e4m3fn")


def test_a_prefix_hold_stops_before_pages_the_step_in_flight_writes(engine):
    """While a step that computes a prefix committed ahead of it runs (`Scheduler.pending_early_pages`), a hold
    (taken between steps' host phases) locks only the pages before that prefix's: were the step to fail, the
    prefix must leave the cache, which a hold on it would prevent."""
    ids = prompts(1, seed=22, lo=30, hi=31)[0]
    engine.flush_cache()
    engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 0})
    pages = engine.cache.match_prefix(ids).pages
    assert len(pages) >= 4
    engine.scheduler.pending_early_pages = {pages[2]}  # as if the step in flight wrote pages 2.. of it
    try:
        h = engine.hold_prefix(ids)
    finally:
        engine.scheduler.pending_early_pages = set()
    assert h.num_tokens == 2 * engine.config.cache.page_size
    engine.release_prefix(h)
    h = engine.hold_prefix(ids)
    assert h.num_tokens == len(pages) * engine.config.cache.page_size
    engine.release_prefix(h)
    engine.check_integrity()


def test_a_burst_on_a_new_prefix_shares_it_within_its_first_step(engine, tiny_path):
    """Three prompts on one uncached 30-token prefix, submitted together: the second and third are admitted in
    the first one's step, onto its pages (the scheduler commits them ahead of the step), and the outputs equal
    an independent forward of each prompt alone."""
    prefix = prompts(1, seed=21, lo=30, hi=31)[0]
    ps = [prefix + [11 + i, 5, 3] for i in range(3)]
    engine.flush_cache()
    before = engine.stats()
    outs = engine.generate(input_ids=ps, sampling_params=GREEDY)
    after = engine.stats()
    assert after["shared_in_step"] - before["shared_in_step"] == 2
    # the prefix's last 2 tokens (a partial page of 4) borrowed from the first one's rows, not computed again
    assert after["borrowed_tokens"] - before["borrowed_tokens"] == 2 * 2
    assert after["num_steps"] - before["num_steps"] == 12  # every prompt in the first step, then 11 decode steps
    for ids, out in zip(ps, outs):
        assert out["output_ids"] == reference_greedy(tiny_path, ids, 12)
    engine.check_integrity()


@pytest.mark.timeout(180)
def test_a_selects_choices_on_a_new_question_take_one_step_with_the_models_logprobs(engine, tiny_path):
    """A select's shape on an uncached question: each choice after it with prompt logprobs from the question's last
    token, submitted together. They take one step (8 logits rows here): the first computes the question, the other
    share its whole pages and borrow its rows for the rest (their keys and values written into their own pages,
    their logits rows there the first one's); every entry equals an independent forward's log-softmax."""
    q = prompts(1, seed=31, lo=23, hi=24)[0]  # 5 whole pages + 3 tokens
    choices = [[50], [40, 41]]  # the second borrows, and its own row at 40 scores 41 over the borrowed keys
    ps = [q + c for c in choices]
    start = len(q) - 1
    engine.flush_cache()
    before = engine.stats()
    outs = engine.generate(input_ids=ps, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                           logprob_start_len=start)
    after = engine.stats()
    assert after["num_steps"] - before["num_steps"] == 1
    # the other: from the page its logits rows start in (position 20) to the question's end
    assert after["borrowed_tokens"] - before["borrowed_tokens"] == len(q) - 20
    cfg, params = load_weights(tiny_path, progress=False)
    runner = PagedRunner(cfg, params, num_pages=64, page_size=4, block_q=8, nan_fill=False)
    for ids, out in zip(ps, outs):
        (logits,) = runner.step([(0, ids, 0, 0)])
        lp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
        got = out["meta_info"]["input_token_logprobs"]
        assert [e[1] for e in got] == ids[start:]
        for i, (val, tok, _) in zip(range(start, len(ids)), got):
            assert val == pytest.approx(lp[i - 1, tok], abs=1e-4), (ids[len(q):], i)
    engine.check_integrity()


def test_batched_equals_one_at_a_time_and_cache_hit_equals_miss(engine):
    ps = prompts(8, seed=2)
    engine.flush_cache()
    s0 = engine.stats()
    t0 = time.perf_counter()
    alone = [engine.generate(input_ids=p, sampling_params=GREEDY)["output_ids"] for p in ps]
    wall = time.perf_counter() - t0
    s1 = engine.stats()
    # the seconds the loop spent in steps: each of them counted, all within the requests' wall time
    steps = s1["num_steps"] - s0["num_steps"]
    assert 0 < s1["busy_seconds"] - s0["busy_seconds"] <= wall
    assert s1["busy_seconds"] - s0["busy_seconds"] == pytest.approx(
        sum(engine.loop.stats.step_times[-steps:]) + sum(engine.loop.stats.host_times[-steps:]))
    engine.flush_cache()
    batch = engine.generate(input_ids=ps, sampling_params=GREEDY)
    assert [b["output_ids"] for b in batch] == alone
    s2 = engine.stats()
    # every output token after the prompt's own is one decode row: one a step alone, several a step together
    # (together, a prompt's short tail may also run as decode rows)
    rows = len(ps) * (GREEDY["max_new_tokens"] - 1)
    assert s1["num_decode_rows"] - s0["num_decode_rows"] == rows == s1["num_decode_steps"] - s0["num_decode_steps"]
    together = s2["num_decode_rows"] - s1["num_decode_rows"]
    assert rows <= together <= rows + sum(map(len, ps)) and together > s2["num_decode_steps"] - s1["num_decode_steps"]
    again = engine.generate(input_ids=ps, sampling_params=GREEDY)  # every prompt now cached
    assert [b["output_ids"] for b in again] == alone
    assert all(b["meta_info"]["cached_tokens"] >= (len(p) - 1) // 4 * 4 for b, p in zip(again, ps))
    engine.check_integrity()


def test_prompt_diverging_mid_page_reuses_a_copy_of_the_cached_page(engine):
    """Partial-page reuse: a prompt sharing a cached prompt up to the middle of a page takes those tokens too,
    through a copy of the cached page into its own; greedy tokens and their logprobs equal an uncached run."""
    ps = SMALL["page_size"]
    base = prompts(1, seed=21, lo=6 * ps, hi=6 * ps + 1)[0]
    sp = {**GREEDY, "max_new_tokens": 6}
    for cut in (4 * ps + 1, 4 * ps + 3):
        other = base[:cut] + [base[cut] % 290 + 5] + base[cut + 1:cut + 5]  # differs at position `cut`
        engine.flush_cache()
        ref = engine.generate(input_ids=other, sampling_params=sp, return_logprob=True)
        engine.flush_cache()
        engine.generate(input_ids=base, sampling_params={"max_new_tokens": 0})  # caches 6 whole pages
        before = engine.stats()["partial_page_tokens"]
        got = engine.generate(input_ids=other, sampling_params=sp, return_logprob=True)
        assert got["meta_info"]["cached_tokens"] == cut
        assert engine.stats()["partial_page_tokens"] - before == cut % ps
        assert got["output_ids"] == ref["output_ids"]
        assert [e[0] for e in got["meta_info"]["output_token_logprobs"]] == pytest.approx(
            [e[0] for e in ref["meta_info"]["output_token_logprobs"]], abs=1e-5)
        engine.check_integrity()
    # a next turn: the first turn's partly filled last page was kept (a tail), so all it computed is reused
    first = base[:4 * ps + 1]
    engine.flush_cache()
    turn = engine.generate(input_ids=first, sampling_params=sp)["output_ids"]  # computes 4 pages + 2 tokens
    nxt = first + turn + base[:3]
    got = engine.generate(input_ids=nxt, sampling_params=sp, return_logprob=True)
    assert got["meta_info"]["cached_tokens"] == len(first) + len(turn) - 1
    engine.flush_cache()
    ref = engine.generate(input_ids=nxt, sampling_params=sp, return_logprob=True)
    assert got["output_ids"] == ref["output_ids"]
    assert [e[0] for e in got["meta_info"]["output_token_logprobs"]] == pytest.approx(
        [e[0] for e in ref["meta_info"]["output_token_logprobs"]], abs=1e-5)
    engine.check_integrity()


def test_seeds_reproducible_alone_and_in_batch(engine):
    sp = {"temperature": 1.0, "top_p": 0.9, "max_new_tokens": 10, "sampling_seed": 1234, "ignore_eos": True}
    p = prompts(1, seed=3)[0]
    a = engine.generate(input_ids=p, sampling_params=sp)["output_ids"]
    b = engine.generate(input_ids=p, sampling_params=sp)["output_ids"]
    others = prompts(5, seed=4)
    batch = engine.generate(input_ids=others[:2] + [p] + others[2:],
                            sampling_params=[{**sp, "sampling_seed": 7}] * 2 + [sp] + [{**sp, "sampling_seed": 9}] * 3)
    assert a == b == batch[2]["output_ids"]
    c = engine.generate(input_ids=p, sampling_params={**sp, "sampling_seed": 99})["output_ids"]
    assert c != a


def test_n_stop_min_new_and_prefill_only(engine):
    p = prompts(1, seed=5)[0]
    outs = engine.generate(input_ids=p, sampling_params={"n": 3, "temperature": 0.8, "max_new_tokens": 6,
                                                         "ignore_eos": True})
    assert len(outs) == 3 and all(len(o["output_ids"]) == 6 for o in outs)
    # prefill only: caches the prompt, returns no tokens
    pre = engine.generate(input_ids=p + [5, 6, 7, 8, 9], sampling_params={"max_new_tokens": 0})
    assert pre["output_ids"] == [] and pre["meta_info"]["finish_reason"]["type"] == "length"
    ref = engine.generate(input_ids=p, sampling_params=GREEDY)["output_ids"]
    # stop token id: the first greedy token stops generation right away, matched reported
    st = engine.generate(input_ids=p, sampling_params={**GREEDY, "stop_token_ids": [ref[2]]})
    assert st["output_ids"] == ref[:3] and st["meta_info"]["finish_reason"] == {"type": "stop", "matched": ref[2]}
    # min_new_tokens suppresses the stop id until reached
    mn = engine.generate(input_ids=p, sampling_params={**GREEDY, "stop_token_ids": [ref[0]], "min_new_tokens": 4})
    assert len(mn["output_ids"]) >= 4 and ref[0] not in mn["output_ids"][:3]


def test_stop_strings_trimmed_across_token_boundaries(engine):
    p = prompts(1, seed=6)[0]
    full = engine.generate(input_ids=p, sampling_params={**GREEDY, "max_new_tokens": 20})
    text = full["text"]
    if len(text) < 6:
        pytest.fail(f"tiny model produced too little text: {text!r}")
    stop = text[3:6]  # spans whatever token boundaries fall there
    out = engine.generate(input_ids=p, sampling_params={**GREEDY, "max_new_tokens": 20, "stop": [stop]})
    assert out["text"] == text[:text.find(stop)]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    keep = engine.generate(input_ids=p, sampling_params={**GREEDY, "max_new_tokens": 20, "stop": stop,
                                                         "no_stop_trim": True})
    assert keep["text"] == text[:text.find(stop) + 3]


def test_logprobs_match_model(engine, tiny_path):
    p = prompts(1, seed=7, lo=20, hi=21)[0]
    out = engine.generate(input_ids=p, sampling_params={**GREEDY, "max_new_tokens": 4}, return_logprob=True,
                          logprob_start_len=0, top_logprobs_num=3)
    m = out["meta_info"]
    cfg, params = load_weights(tiny_path, progress=False)
    runner = PagedRunner(cfg, params, num_pages=64, page_size=4, block_q=8, nan_fill=False)
    (logits,) = runner.step([(0, p + out["output_ids"][:-1], 0, 0)])
    lp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    assert m["input_token_logprobs"][0][0] is None and m["input_token_logprobs"][0][1] == p[0]
    assert len(m["input_token_logprobs"]) == len(p)
    for i in range(1, len(p)):
        got, tok, _ = m["input_token_logprobs"][i]
        assert tok == p[i] and got == pytest.approx(lp[i - 1, p[i]], abs=1e-4)
    for j, (got, tok, _) in enumerate(m["output_token_logprobs"]):
        assert tok == out["output_ids"][j] and got == pytest.approx(lp[len(p) - 1 + j, tok], abs=1e-4)
    top = m["output_top_logprobs"][0]
    assert [t[1] for t in top] == list(np.argsort(-lp[len(p) - 1])[:3])
    # logprob_start_len in the middle: entries from there on only
    mid = engine.generate(input_ids=p, sampling_params={**GREEDY, "max_new_tokens": 1}, return_logprob=True,
                          logprob_start_len=10)
    assert [e[1] for e in mid["meta_info"]["input_token_logprobs"]] == p[10:]
    assert mid["meta_info"]["input_token_logprobs"][0][0] == pytest.approx(lp[9, p[10]], abs=1e-4)


@pytest.mark.timeout(180)
def test_logprobs_beside_requests_without_them(engine, tiny_path):
    """A step computes the logprob normalizer only when a row reads it: a request with logprobs (prompt targets
    and sampled tokens, no top logprobs) batched with requests without gets the model's values, the others the
    same tokens as alone."""
    p, *others = prompts(4, seed=21, lo=18, hi=26)
    sp = {**GREEDY, "max_new_tokens": 6}
    alone = [engine.generate(input_ids=o, sampling_params=sp)["output_ids"] for o in others]
    results = {}

    def run(key, ids, **kw):
        results[key] = engine.generate(input_ids=ids, sampling_params=sp, **kw)

    threads = [threading.Thread(target=run, args=(i, o)) for i, o in enumerate(others)]
    threads.append(threading.Thread(target=run, args=("lp", p), kwargs=dict(return_logprob=True,
                                                                             logprob_start_len=0)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [results[i]["output_ids"] for i in range(len(others))] == alone
    out = results["lp"]
    cfg, params = load_weights(tiny_path, progress=False)
    runner = PagedRunner(cfg, params, num_pages=64, page_size=4, block_q=8, nan_fill=False)
    (logits,) = runner.step([(0, p + out["output_ids"][:-1], 0, 0)])
    lp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    got_in = [e[0] for e in out["meta_info"]["input_token_logprobs"][1:]]
    assert got_in == pytest.approx([lp[i - 1, p[i]] for i in range(1, len(p))], abs=1e-4)
    got_out = [e[0] for e in out["meta_info"]["output_token_logprobs"]]
    assert got_out == pytest.approx([lp[len(p) - 1 + j, t] for j, t in enumerate(out["output_ids"])], abs=1e-4)


@pytest.mark.timeout(180)
def test_prompt_logprobs_across_cached_page_boundaries(engine):
    """Issue 10 item 7: logprob_start_len at and around page boundaries, with the prompt cached by an
    earlier max_new_tokens=0 request or not: the same entries as an uncached run, prompt_len - start of them
    (the radix cache has no logits, so prefix reuse stops where the entries need them)."""
    ps = SMALL["page_size"]
    p = prompts(1, seed=12, lo=4 * ps + 2, hi=4 * ps + 3)[0]
    n = len(p)
    sp = {**GREEDY, "max_new_tokens": 2}

    def run(start):
        out = engine.generate(input_ids=p, sampling_params=sp, return_logprob=True, logprob_start_len=start)
        return out["meta_info"], out["output_ids"]

    engine.flush_cache()
    ref, ref_out = run(0)
    ref = ref["input_token_logprobs"]
    assert len(ref) == n and ref[0] == [None, p[0], None] and all(e[0] is not None for e in ref[1:])
    for start in sorted({1, ps - 1, ps, ps + 1, 2 * ps - 1, 2 * ps, 2 * ps + 1, 3 * ps, 4 * ps, n - 1}):
        engine.flush_cache()
        uncached, out_u = run(start)
        engine.generate(input_ids=p, sampling_params={"max_new_tokens": 0})  # caches the prompt's pages
        cached, out_c = run(start)
        for meta in (uncached, cached):
            got = meta["input_token_logprobs"]
            assert len(got) == n - start, (start, len(got))
            assert [e[1] for e in got] == p[start:]
            assert got[0][0] is not None  # only position 0 has no logprob
            assert [e[0] for e in got] == pytest.approx([e[0] for e in ref[start:]], abs=1e-4), start
        assert out_u == out_c == ref_out
        assert uncached["cached_tokens"] == 0
        # whole pages, then part of the last one the caching request filled (a page copy)
        assert cached["cached_tokens"] == min(max(start - 1, 0), n // ps * ps), (start, cached["cached_tokens"])
        engine.check_integrity()


def test_penalties_change_output_and_stay_reproducible(engine):
    p = [7] * 10
    base = engine.generate(input_ids=p, sampling_params={**GREEDY, "max_new_tokens": 16})["output_ids"]
    pen = {**GREEDY, "max_new_tokens": 16, "frequency_penalty": 2.0, "repetition_penalty": 1.5}
    a = engine.generate(input_ids=p, sampling_params=pen)["output_ids"]
    b = engine.generate(input_ids=p, sampling_params=pen)["output_ids"]
    assert a == b
    assert 7 not in a[:1] or a != base
    assert len(set(a)) >= len(set(base))


def test_streaming_sync_and_async(engine):
    p = prompts(1, seed=8)[0]
    final = engine.generate(input_ids=p, sampling_params=GREEDY)
    events = list(engine.generate(input_ids=p, sampling_params=GREEDY, stream=True))
    assert events[-1]["output_ids"] == final["output_ids"] and events[-1]["text"] == final["text"]
    assert all(e["meta_info"]["finish_reason"] is None for e in events[:-1])
    assert [len(e["output_ids"]) for e in events] == list(range(1, 13))

    async def run():
        got = await engine.async_generate(input_ids=p, sampling_params=GREEDY)
        it = await engine.async_generate(input_ids=p, sampling_params=GREEDY, stream=True)
        evs = [e async for e in it]
        return got, evs

    got, evs = asyncio.run(run())
    assert got["output_ids"] == final["output_ids"] == evs[-1]["output_ids"]


def test_abort_mid_decode_keeps_integrity(engine):
    p = prompts(1, seed=9)[0]
    it = engine.generate(input_ids=p, sampling_params={**GREEDY, "max_new_tokens": 60}, stream=True)
    for i, ev in enumerate(it):
        if i == 3:
            break
    it.close()  # closing the stream aborts the request
    engine.check_integrity()
    info = engine.get_server_info()
    assert info["num_running"] == 0 and info["num_waiting"] == 0


@pytest.mark.parametrize("bad,match", [
    ({"temperature": -1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"max_new_tokens": 10_000}, "max_new_tokens"), ({"bogus": 1}, "bogus"),
    ({"top_k": 0}, "top_k"), ({"stop_token_ids": [100000]}, "stop_token_ids"),
])
def test_invalid_sampling_params(engine, bad, match):
    with pytest.raises(InvalidRequestError, match=match):
        engine.generate(input_ids=[5, 6], sampling_params=bad)


def test_invalid_inputs(engine):
    with pytest.raises(InvalidRequestError, match="input_ids"):
        engine.generate(input_ids=[5, 100000])
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.generate(input_ids=[])
    with pytest.raises(InvalidRequestError, match="context"):
        engine.generate(input_ids=[5] * 200)
    with pytest.raises(InvalidRequestError, match="regex"):
        engine.generate(input_ids=[5], sampling_params={"regex": "a(b", "max_new_tokens": 4})


def test_no_compilation_after_warmup_on_mixed_workload(engine):
    before = engine.runner.num_compiles
    rng = random.Random(10)
    reqs = [[rng.randrange(3, 297) for _ in range(rng.randrange(1, 100))] for _ in range(20)]
    sps = [{"temperature": rng.choice([0, 0.7]), "max_new_tokens": rng.randrange(0, 25), "ignore_eos": True,
            "top_k": rng.choice([-1, 5]), "frequency_penalty": rng.choice([0.0, 0.5])} for _ in reqs]
    engine.generate(input_ids=reqs, sampling_params=sps)
    engine.generate(input_ids=reqs[:3], sampling_params={"max_new_tokens": 2}, return_logprob=True,
                    logprob_start_len=0, top_logprobs_num=2)
    assert engine.runner.num_compiles == before
    engine.check_integrity()


def test_many_long_requests_on_small_pool_retract_and_match(tiny_path):
    # warmup off: each engine compiles only the shapes these requests reach (warmup has tests of its own)
    cfg = dict(SMALL, max_num_pages=70, max_running_requests=8, new_token_ratio=0.0, warmup=False)
    ps = prompts(16, seed=11, lo=10, hi=30)
    sp = {**GREEDY, "max_new_tokens": 40}
    # the same settings run each prompt alone (one sequence fits the 70 pages): the second engine loads the first's
    # steps from the executable store
    with Engine(model=tiny_path, progress=False, **cfg) as alone:
        unloaded = [alone.generate(input_ids=p, sampling_params=sp)["output_ids"] for p in ps]
        assert alone.scheduler.num_retractions == 0
    with Engine(model=tiny_path, progress=False, **cfg) as small:
        outs = small.generate(input_ids=ps, sampling_params=sp)
        assert small.scheduler.num_retractions > 0
        small.check_integrity()
    assert [o["output_ids"] for o in outs] == unloaded


def test_mixed_block_limit_between_buckets(tiny_path):
    """max_mixed_blocks=2 with buckets [1, 4]: mixed steps stay within the 1-block bucket (no abort)."""
    cfg = dict(SMALL, prefill_block_buckets=[1, 4], max_mixed_blocks=2, warmup=False)
    with Engine(model=tiny_path, progress=False, **cfg) as e:
        ps = prompts(8, seed=12, lo=10, hi=40)
        outs = e.generate(input_ids=ps, sampling_params={**GREEDY, "max_new_tokens": 8})
        assert all(o["meta_info"]["finish_reason"]["type"] == "length" for o in outs)
        e.check_integrity()


def test_alternating_steps_with_short_remainders(tiny_path):
    """max_mixed_blocks=0 (the CPU preset): prompt remainders of 1 token and short runs never mix shapes."""
    cfg = dict(SMALL, max_mixed_blocks=0, max_prefill_tokens=16)
    with Engine(model=tiny_path, progress=False, **cfg) as e:
        ps = [list(range(3, 3 + n)) for n in (9, 17, 25, 33, 41, 3)]
        outs = e.generate(input_ids=ps, sampling_params={**GREEDY, "max_new_tokens": 6})
        assert all(o["meta_info"]["finish_reason"]["type"] == "length" for o in outs)
        alone = [e.generate(input_ids=p, sampling_params={**GREEDY, "max_new_tokens": 6})["output_ids"] for p in ps]
        assert [o["output_ids"] for o in outs] == alone
        e.check_integrity()


def test_decode_costs_measured_at_warmup(engine, tiny_path):
    """decode_row_fill=auto: every (decode bucket, page width) step is timed and the scheduler sizes by cost."""
    assert engine.scheduler.decode_fill == "cost"
    grid = engine.scheduler.grid
    assert grid is engine.runner.grid  # one grid: the runner's, read by the scheduler
    assert set(grid.costs) == {(b, w, r) for b in SMALL["decode_buckets"] for w in SMALL["page_width_buckets"]
                               for r in [0] + engine.config.shapes.run_block_buckets}
    assert all(v > 0 for v in grid.costs.values())
    with pytest.raises(ValueError, match="decode_row_fill"):
        Engine(model=tiny_path, progress=False, decode_row_fill="sometimes", **SMALL)


def test_step_costs_kept_beside_the_compilation_cache(tiny_path, monkeypatch):
    """A restart on the same machine reads the timed step costs back instead of timing every shape again."""
    from sgl_jax.runner import ModelRunner

    kw = dict(SMALL, run_block_buckets=[1, 2], decode_buckets=[1, 8], page_width_buckets=[32],
              prefill_block_buckets=[8], max_mixed_blocks=0)  # few shapes: the costs, not the grid, are the subject
    with Engine(model=tiny_path, progress=False, **kw) as e1:
        costs = e1.scheduler.grid.costs
    assert costs and any(k[2] == 2 for k in costs)
    monkeypatch.setattr(ModelRunner, "measure_decode_costs", lambda self, repeats=2: pytest.fail("timed again"))
    with Engine(model=tiny_path, progress=False, **kw) as e2:
        assert e2.scheduler.grid.costs == costs


@pytest.mark.timeout(300)
def test_before_the_background_compiler_a_plan_runs_on_a_larger_compiled_shape(tiny_path, monkeypatch):
    """While shapes are missing, a step runs on the cheapest compiled shape that holds its plan (here a
    2-block prefill at the narrow page width on the 4-block, wide first shape) with the reference's
    greedy tokens, and compiles nothing of its own."""
    from sgl_jax.runner import ModelRunner, StepShape

    def idle(self, then=None, each=None):  # the background compiler never gets to run
        self.background_done.clear()

    monkeypatch.setattr(ModelRunner, "compile_in_background", idle)
    kw = dict(SMALL, prefill_block_buckets=[1, 2, 4], page_width_buckets=[8, 32], max_prefill_tokens=32,
              max_mixed_blocks=0, decode_row_fill="fit")
    ids = prompts(1, seed=5, lo=12, hi=13)[0]  # 12 tokens: two prefill blocks of 8
    with Engine(model=tiny_path, progress=False, background_compile=True, **kw) as e:
        first = e.runner.first_shapes()
        assert first == sorted({StepShape(0, 4, 32), StepShape(1, 0, 32), StepShape(0, 1, 8), StepShape(1, 0, 8)})
        assert e.runner.compiled_shapes() == first
        assert e.runner.stand_in(StepShape(0, 2, 8)) == StepShape(0, 4, 32)
        assert e.runner.stand_in(StepShape(4, 0, 8)) == StepShape(4, 0, 8)  # nothing holds 4 decode rows
        assert e.runner.stand_in(StepShape(0, 1, 8, True)) == StepShape(0, 1, 8, True)  # no logprob shape yet
        out = e.generate(input_ids=ids, sampling_params=GREEDY)["output_ids"]
        assert out == reference_greedy(tiny_path, ids, 12)
        assert e.runner.compiled_shapes() == first and e.runner.num_compiles == len(first)
        e.check_integrity()
        e.runner.background_done.set()  # as the idle compiler's end (shutdown waits for it)


@pytest.mark.timeout(600)
def test_background_compile_serves_at_once_and_compiles_each_shape_once(tiny_path):
    """shapes.background_compile: the engine is up after the first shapes; requests that need shapes still
    missing (a batch of 8, prompt logprobs) are served meanwhile with the same outputs, and every shape is
    compiled exactly once between the engine thread and the background compiler."""
    ps = prompts(8, seed=21)
    with Engine(model=tiny_path, progress=False, **SMALL) as ref:
        want = [o["output_ids"] for o in ref.generate(input_ids=ps, sampling_params=GREEDY)]
        want_lp = ref.generate(input_ids=ps[0], sampling_params={**GREEDY, "max_new_tokens": 2},
                               return_logprob=True, logprob_start_len=0)["meta_info"]["input_token_logprobs"]
    with Engine(model=tiny_path, progress=False, background_compile=True, **SMALL) as e:
        first = set(e.runner.first_shapes())
        assert first and first < set(e.runner.shapes())
        assert first <= set(e.runner.compiled_shapes())
        outs = e.generate(input_ids=ps, sampling_params=GREEDY)  # decode bucket 8: maybe not compiled yet
        assert [o["output_ids"] for o in outs] == want
        lp = e.generate(input_ids=ps[0], sampling_params={**GREEDY, "max_new_tokens": 2}, return_logprob=True,
                        logprob_start_len=0)["meta_info"]["input_token_logprobs"]
        assert [x[1] for x in lp] == [x[1] for x in want_lp]
        assert e.wait_compiled(timeout=300)
        assert e.runner.compiled_shapes() == e.runner.shapes()
        assert e.runner.num_compiles == len(e.runner.shapes())  # none compiled twice
        assert e.scheduler.decode_fill == "cost"  # measured on the engine thread once all were compiled
        assert e.get_server_info()["background_compile_done"] is True
        e.check_integrity()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("background", [False, True])
def test_every_shape_runs_once_before_a_request_needs_it(tiny_path, monkeypatch, background):
    """An executable's first runs are slow (bench/notes.md, "First runs"), so each compiled shape is run once on
    padding before serving (the first shapes, or all without background compilation) or, compiled in the
    background, on the engine thread between steps; the runs change no output and no cache invariant."""
    from sgl_jax.runner import ModelRunner

    warmed = []
    real = ModelRunner.warm

    def spy(self, shape):
        warmed.append((shape, threading.current_thread().name))
        return real(self, shape)

    monkeypatch.setattr(ModelRunner, "warm", spy)
    ids = prompts(1, seed=5, lo=12, hi=13)[0]
    with Engine(model=tiny_path, progress=False, background_compile=background, **SMALL) as e:
        assert e.wait_compiled(timeout=300)
        shapes = [s for s, _ in warmed]
        assert sorted(shapes) == e.runner.shapes() == e.runner.compiled_shapes()  # each once
        first = set(e.runner.first_shapes()) if background else set(shapes)
        assert {t for s, t in warmed if s not in first} <= {"sgl_jax-engine"}
        assert e.generate(input_ids=ids, sampling_params=GREEDY)["output_ids"] == reference_greedy(tiny_path, ids, 12)
        e.check_integrity()


@pytest.mark.timeout(300)
def test_concurrent_compiles_of_one_shape_compile_it_once(tiny_path):
    import threading

    with Engine(model=tiny_path, progress=False, **dict(SMALL, warmup=False)) as e:
        r = e.runner
        shape = r.shapes()[-1]
        got = []
        ts = [threading.Thread(target=lambda: got.append(r._compile(shape))) for _ in range(3)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(timeout=120)
        assert len(got) == 3 and all(g is got[0] for g in got) and r.num_compiles == 1


@pytest.mark.timeout(300)
def test_shutdown_releases_the_compiled_steps(tiny_path):
    """A compiled step holds hundreds of the process's memory mappings (XLA:CPU maps each kernel's sections;
    Linux allows 65,530): shutdown frees them and the device state, so a process can build another engine while
    the old object is still referenced, and the released runner refuses to compile."""
    import gc

    def mappings():
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)

    before = mappings()
    e = Engine(model=tiny_path, progress=False, **SMALL)
    held = mappings() - before
    assert e.runner.compiled_shapes() and held > 100
    assert len(e.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 3})["output_ids"]) == 3
    e.shutdown()
    gc.collect()
    assert e.runner.compiled_shapes() == [] and e.runner.kv is None
    assert mappings() - before < held / 4
    with pytest.raises(RuntimeError, match="released"):
        e.runner._compile(e.runner.shapes()[0])
    e.shutdown()  # twice: a no-op
