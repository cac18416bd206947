"""Fault injection and request-lifecycle races in the engine loop (issue: no silent death).

A fault raised while handling one request (admission, constraint compile, constraint upload, the step,
postprocess, jump-forward) fails the requests it concerns with an abort event naming the phase; the
others finish exactly as without the fault, the cache invariants hold, and the engine keeps serving.
A loop that cannot go on is dead: /health-style `health()` says so, waiting requests get abort events,
new ones raise EngineDeadError at once.
"""

import asyncio
import threading

import pytest

from sgl_jax.engine import Engine, EngineProtocol
from sgl_jax.errors import EngineDeadError, InvalidRequestError
from sgl_jax.models.testing import write_tiny_gguf
from test_engine import GREEDY, SMALL, prompts

CFG = dict(SMALL, constraint_rows=1024, constraint_classes=320, constraint_slots=4,
           warmup=False)  # only the shapes the tests reach compile (warmup has tests of its own)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_gguf("llama", str(tmp_path_factory.mktemp("tiny") / "tiny.gguf"))


@pytest.fixture(scope="module")
def engine(tiny_path):
    with Engine(model=tiny_path, progress=False, **CFG) as e:
        yield e


def _bad(req_or_rid) -> bool:
    rid = req_or_rid if isinstance(req_or_rid, str) else req_or_rid.rid
    return rid.startswith("bad")


def _run_mixed(engine, sps):
    """Good and bad requests concurrently; returns {rid: final event}."""
    ps = prompts(6, seed=11)
    rids = [f"good{i}" for i in range(3)] + [f"bad{i}" for i in range(3)]

    async def go():
        return await asyncio.gather(*(engine.async_generate(input_ids=p, sampling_params=sp, rid=r)
                                      for p, sp, r in zip(ps, sps, rids)))

    return dict(zip(rids, asyncio.run(go()))), ps


def _check(engine, outs, reference, phase_words):
    for rid, out in outs.items():
        fr = out["meta_info"]["finish_reason"]
        if _bad(rid):
            assert fr["type"] == "abort" and phase_words in fr["message"], (rid, fr)
        else:
            assert out["output_ids"] == reference[rid], (rid, fr)
    engine.check_integrity()
    assert engine.health() == (True, "ok")
    # and it keeps serving
    assert engine.generate(input_ids=[5, 6, 7], sampling_params={**GREEDY, "max_new_tokens": 2})[
        "meta_info"]["finish_reason"]["type"] == "length"


PLAIN = [GREEDY] * 6
REGEX = [{"regex": r"[a-c]{2,5}-[0-9]{2}(x|y)", "temperature": 0, "max_new_tokens": 30}] * 6


@pytest.mark.timeout(300)
@pytest.mark.parametrize("phase,target,attr,sps,words", [
    ("admission", "scheduler", "add", PLAIN, "engine error in admission"),
    ("constraint compile", "constraints.cache", "submit", REGEX, "engine error in constraint compile"),
    ("postprocess", "constraints", "on_sampled", REGEX, "engine error in postprocess"),
    ("jump-forward", "constraints", "plan_jump", REGEX, "engine error in"),
    ("output", "output", "check_finish", PLAIN, "engine error in postprocess"),
])
def test_fault_in_one_request_fails_only_that_request(engine, monkeypatch, phase, target, attr, sps, words):
    reference, _ = _run_mixed(engine, sps)
    reference = {r: o["output_ids"] for r, o in reference.items()}
    obj = engine
    for part in target.split("."):
        obj = getattr(obj, part)
    orig = getattr(obj, attr)

    def faulty(*args, **kw):
        reqs = [a for a in args if hasattr(a, "rid")]
        if reqs and _bad(reqs[0]):
            raise RuntimeError(f"injected fault in {phase}")
        return orig(*args, **kw)

    def faulty_compile(kind, spec, *a, **kw):  # ConstraintCache.submit sees no request: fail by spec
        if spec == "bad":
            raise RuntimeError("injected fault in compile")
        return orig(kind, spec, *a, **kw)

    if attr == "submit":
        faulty = faulty_compile  # noqa: F811
        sps = sps[:3] + [{**sps[0], "regex": "bad"}] * 3
        reference.update({f"bad{i}": None for i in range(3)})
    monkeypatch.setattr(obj, attr, faulty)
    outs, _ = _run_mixed(engine, sps)
    _check(engine, outs, reference, words)


@pytest.mark.timeout(300)
def test_fault_in_constraint_upload_fails_that_request(engine, monkeypatch):
    good = {"regex": r"[ab]{3}c", "temperature": 0, "max_new_tokens": 10}
    ref = engine.generate(input_ids=[4, 5, 6], sampling_params=good)
    orig = engine.constraints.upload

    def faulty(place):
        if place.fsm.num_states == bad_states:
            raise RuntimeError("injected upload fault")
        return orig(place)

    from sgl_jax.constrained import compile_regex
    bad_rx = r"[xy]{4}z"
    bad_states = compile_regex(bad_rx, engine.constraints.vocabulary()).num_states
    monkeypatch.setattr(engine.constraints, "upload", faulty)
    outs = engine.generate(input_ids=[[4, 5, 6], [4, 5, 6]],
                           sampling_params=[good, {**good, "regex": bad_rx}])
    assert outs[0]["output_ids"] == ref["output_ids"]
    fr = outs[1]["meta_info"]["finish_reason"]
    assert fr["type"] == "abort" and "injected upload fault" in fr["message"]
    engine.check_integrity()


@pytest.mark.timeout(300)
def test_failed_step_fails_its_requests_and_the_engine_goes_on(engine, monkeypatch):
    ps = prompts(3, seed=12)
    ref = [o["output_ids"] for o in engine.generate(input_ids=ps, sampling_params=GREEDY)]
    orig, calls = engine.runner.run, []

    def once(plan, rows):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected step fault")
        return orig(plan, rows)

    monkeypatch.setattr(engine.runner, "run", once)
    outs = engine.generate(input_ids=ps, sampling_params=GREEDY)
    failed = [o for o in outs if o["meta_info"]["finish_reason"]["type"] == "abort"]
    assert failed and all("engine error in step" in o["meta_info"]["finish_reason"]["message"] for o in failed)
    engine.check_integrity()
    again = engine.generate(input_ids=ps, sampling_params=GREEDY)
    assert [o["output_ids"] for o in again] == ref
    assert engine.health() == (True, "ok")


@pytest.mark.timeout(300)
def test_a_failed_step_leaves_no_uncomputed_shared_prefix_in_the_cache(engine, monkeypatch):
    """A burst on a new prefix shares it within the step that computes it (committed to the cache ahead of the
    step). That step fails: every request on the prefix fails, the prefix leaves the cache (nothing is served
    from pages never written), the invariants hold, and the same burst then gives the outputs it gave before."""
    prefix = prompts(1, seed=13, lo=30, hi=31)[0]
    ps = [prefix + [7 + i, 9] for i in range(3)]
    engine.flush_cache()
    shared = engine.scheduler.shared_in_step
    ref = [o["output_ids"] for o in engine.generate(input_ids=ps, sampling_params=GREEDY)]
    assert engine.scheduler.shared_in_step == shared + 2  # the two after the first shared it in its step
    engine.flush_cache()
    orig, calls = engine.runner.run, []

    def once(plan, rows):
        calls.append(plan)
        if len(calls) == 1:
            assert plan.early, "the first step was to compute a shared prefix"
            raise RuntimeError("injected step fault")
        return orig(plan, rows)

    monkeypatch.setattr(engine.runner, "run", once)
    outs = engine.generate(input_ids=ps, sampling_params=GREEDY)
    assert all(o["meta_info"]["finish_reason"]["type"] == "abort" for o in outs)
    engine.check_integrity()
    assert engine.scheduler.cache.peek_prefix_len(prefix) == 0
    again = engine.generate(input_ids=ps, sampling_params=GREEDY)
    assert [o["output_ids"] for o in again] == ref
    assert engine.health() == (True, "ok")


@pytest.mark.timeout(300)
def test_steps_failing_in_a_row_kill_the_engine_visibly(tiny_path):
    with Engine(model=tiny_path, progress=False, **CFG) as e:
        e.runner.run = lambda plan, rows: (_ for _ in ()).throw(RuntimeError("device lost"))
        outs = e.generate(input_ids=prompts(3, seed=13), sampling_params=GREEDY)
        assert all(o["meta_info"]["finish_reason"]["type"] == "abort" for o in outs)
        for _ in range(2):  # the second and third failures in a row
            assert e.generate(input_ids=[5, 6], sampling_params=GREEDY)["meta_info"]["finish_reason"][
                "type"] == "abort"
        e.loop._thread.join(timeout=30)
        ok, why = e.health()
        assert not ok and "dead" in why and "device lost" in why
        with pytest.raises(EngineDeadError, match="device lost"):
            e.generate(input_ids=[5, 6], sampling_params=GREEDY)
        with pytest.raises(EngineDeadError):
            e.flush_cache()


@pytest.mark.timeout(300)
def test_exception_escaping_the_loop_fails_waiting_requests_and_new_ones(tiny_path):
    with Engine(model=tiny_path, progress=False, **CFG) as e:
        gate = threading.Event()
        orig = e.loop._step

        def broken():
            gate.wait(10)
            raise SystemError("loop bug")

        e.loop._step = broken
        res = {}
        t = threading.Thread(target=lambda: res.setdefault("out", e.generate(input_ids=[5, 6, 7],
                                                                             sampling_params=GREEDY)))
        t.start()
        gate.set()
        t.join(timeout=60)
        assert not t.is_alive(), "a request waiting on a dead loop must get its final event"
        fr = res["out"]["meta_info"]["finish_reason"]
        assert fr["type"] == "abort" and "loop bug" in fr["message"]
        assert not e.health()[0]
        with pytest.raises(EngineDeadError):
            e.generate(input_ids=[5, 6, 7], sampling_params=GREEDY)
        e.loop._step = orig


@pytest.mark.timeout(300)
def test_submit_during_shutdown_never_hangs(tiny_path):
    e = Engine(model=tiny_path, progress=False, **CFG)
    results, errors = [], []

    def client(i):
        try:
            results.append(e.generate(input_ids=[5 + i, 6, 7], sampling_params={**GREEDY, "max_new_tokens": 50}))
        except RuntimeError as err:  # refused: the engine is shut down
            errors.append(err)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads[:4]:
        t.start()
    e.shutdown()
    for t in threads[4:]:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a request submitted around shutdown was lost"
    assert len(results) + len(errors) == 8
    for r in results:
        assert r["meta_info"]["finish_reason"] is not None
    with pytest.raises(RuntimeError, match="shut down"):
        e.flush_cache()  # no 600 s wait after shutdown
    assert e.health() == (False, "the engine is shut down")


@pytest.mark.timeout(300)
def test_rids_abort_and_batch_validation(engine, monkeypatch):
    assert engine.abort("no-such-rid") is False

    async def go():
        long = {**GREEDY, "max_new_tokens": 60}
        gen = engine.generate_stream(input_ids=[5, 6, 7], sampling_params=long, rid="dup")
        first = await gen.__anext__()
        assert first["meta_info"]["finish_reason"] is None
        with pytest.raises(InvalidRequestError, match="already in use"):
            await engine.async_generate(input_ids=[8, 9], sampling_params=long, rid="dup")
        assert engine.abort("dup") is True
        last = first
        async for ev in gen:
            last = ev
        assert last["meta_info"]["finish_reason"]["type"] == "abort"
        return last

    asyncio.run(go())
    assert engine.abort("dup") is False  # retired exactly once
    outs = engine.generate(input_ids=[5, 6], sampling_params={**GREEDY, "max_new_tokens": 2, "n": 2}, rid="pair")
    assert [o["meta_info"]["id"] for o in outs] == ["pair-0", "pair-1"]  # one rid per sequence
    submitted = []
    orig = engine.loop.submit
    monkeypatch.setattr(engine.loop, "submit", lambda reqs: (submitted.append(reqs), orig(reqs)))
    with pytest.raises(InvalidRequestError, match="temperature"):
        asyncio.run(engine.async_generate(input_ids=[[5, 6], [7, 8], [9, 10]],
                                          sampling_params=[GREEDY, {"temperature": -1}, GREEDY]))
    assert submitted == [], "one bad item of a batch must keep the others from being submitted"
    engine.check_integrity()


@pytest.mark.timeout(120)
def test_engine_implements_the_protocol(engine):
    assert isinstance(engine, EngineProtocol)


@pytest.mark.timeout(300)
def test_real_engine_keeps_the_engine_protocol(engine):
    from protocol_checks import check_engine_protocol

    check_engine_protocol(engine, [5, 6, 7])


class _Tok:
    stop_token_ids = frozenset({2})

    def __init__(self, bos):
        self.bos = bos

    def encode(self, text, add_special_tokens=True):
        return ([1] if self.bos else []) + [3 + (ord(c) % 50) for c in text]


@pytest.mark.timeout(60)
def test_empty_text_needs_a_bos_token(engine):
    from sgl_jax.engine.prepare import RequestPreparer

    kw = dict(vocab_size=64, max_context_len=512, max_top_logprobs=2)
    with pytest.raises(InvalidRequestError, match="empty and this model's tokenizer adds no BOS token"):
        RequestPreparer(_Tok(bos=False), **kw).prepare(text="")
    assert RequestPreparer(_Tok(bos=True), **kw).prepare(text="").input_ids == (1,)
    # the real engine follows its tokenizer's rule
    if engine.tokenizer.encode(""):
        assert engine.generate(prompt="", sampling_params={"max_new_tokens": 1})["meta_info"]["prompt_tokens"] == 1
    else:
        with pytest.raises(InvalidRequestError, match="adds no BOS"):
            engine.generate(prompt="", sampling_params={"max_new_tokens": 1})


@pytest.mark.timeout(300)
def test_prefix_hold_does_not_wait_for_the_step_in_flight(engine, monkeypatch):
    """A fork's prefix hold (and its release) is taken while a step computes, not at the next step boundary: a
    program that forks several states in turn would otherwise add each fork's branches a step later."""
    ps = prompts(2, seed=13)
    engine.generate(input_ids=ps[0], sampling_params={**GREEDY, "max_new_tokens": 1})  # ps[0] cached
    orig, entered, go = engine.runner.run, threading.Event(), threading.Event()

    def blocked(plan, rows):
        entered.set()
        assert go.wait(60), "the test never let the step finish"
        return orig(plan, rows)

    monkeypatch.setattr(engine.runner, "run", blocked)
    out: list = []
    t = threading.Thread(target=lambda: out.append(engine.generate(input_ids=ps[1], sampling_params=GREEDY)))
    t.start()
    try:
        assert entered.wait(60)
        got: list = []
        holder = threading.Thread(target=lambda: got.append(engine.hold_prefix(ps[0])))
        holder.start()
        holder.join(10)
        assert got and got[0] is not None and got[0].num_tokens > 0, "the hold waited for the step to end"
        assert not go.is_set() and engine.num_prefix_holds == 1
        releaser = threading.Thread(target=engine.release_prefix, args=(got[0],))
        releaser.start()
        releaser.join(10)
        assert not releaser.is_alive() and engine.num_prefix_holds == 0
    finally:
        go.set()
        t.join(60)
    monkeypatch.setattr(engine.runner, "run", orig)
    assert out and out[0]["meta_info"]["finish_reason"]["type"] == "length"
    engine.check_integrity()
    with pytest.raises(ValueError, match="not held"):
        engine.release_prefix(got[0])


@pytest.mark.timeout(300)
def test_fork_siblings_start_in_one_step_or_at_the_deadline(engine):
    """Requests sent with a hold made for n siblings wait until n have arrived (a fork's branch threads submit a
    few milliseconds apart) and then prefill in one step; a sibling that never comes holds the others only until
    the hold's gather time has passed. Outputs equal the same prompts run without the hold."""
    import time

    prefix = list(range(20, 44))  # 6 pages of 4
    suffixes = [[100 + i] * 10 for i in range(3)]
    ref = [o["output_ids"] for o in engine.generate(input_ids=[prefix + s for s in suffixes], sampling_params=GREEDY)]
    engine.generate(input_ids=prefix, sampling_params={**GREEDY, "max_new_tokens": 1})
    steps: list = []
    # the requests whose prompt a step computes (as a prefill chunk or as decode rows)
    listener = lambda info: steps.append(sorted(c.req.rid for c in info.plan.chunks  # noqa: E731
                                                if c.start < len(c.req.prompt_ids)))
    engine.add_step_listener(listener)
    try:
        h = engine.hold_prefix(prefix)
        assert h is not None and h.num_tokens == len(prefix)
        engine.gather_siblings(h, 3, gather_s=60)
        outs: dict = {}

        def branch(i):
            outs[i] = engine.generate(input_ids=prefix + suffixes[i], sampling_params=GREEDY, prefix_hold=h,
                                      rid=f"sib{i}")

        ts = [threading.Thread(target=branch, args=(i,)) for i in range(2)]
        for t in ts:
            t.start()
        time.sleep(0.5)
        assert steps == [] and not outs, "siblings were admitted before the third arrived"
        ts.append(threading.Thread(target=branch, args=(2,)))
        ts[-1].start()
        for t in ts:
            t.join(60)
        assert [outs[i]["output_ids"] for i in range(3)] == ref
        first = next(s for s in steps if s)
        assert first == ["sib0", "sib1", "sib2"], steps  # the three branches' prompts start in one step
        engine.release_prefix(h)

        steps.clear()
        h = engine.hold_prefix(prefix)
        engine.gather_siblings(h, 3, gather_s=0.3)
        t0 = time.monotonic()
        out = engine.generate(input_ids=prefix + suffixes[0], sampling_params=GREEDY, prefix_hold=h)
        assert out["output_ids"] == ref[0] and time.monotonic() - t0 >= 0.25  # alone: it waited for the deadline
        engine.release_prefix(h)
    finally:
        engine.loop.stats.listeners.remove(listener)
    engine.check_integrity()
