"""The workload suite in bench/programs: each workload's data and program shape on a scripted backend, the
optimal-hit-rate computation against a hand-worked example and a naive twin, the BM25 retriever against a
ranking worked out by hand, and one end-to-end smoke run of the runner on the tiny random-weight model.

The scripted backend answers every call at once (a function of the prompt and parameters) and records the
calls and the fork prefills, so the checks are about structure: how many calls, which sampling parameters,
how the prompts extend each other, fork widths, the variables a program leaves. Nothing here asserts speed or
the quality of the tiny model's answers.
"""

from __future__ import annotations

import collections
import io
import itertools
import json
import math
import os
import random
import re
import subprocess
import sys
import threading
import time
import types

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sgl_jax.program as sgl  # noqa: E402
from bench.programs import WORKLOADS, common, module, parse_workloads, runner  # noqa: E402
from bench.programs.bm25 import BM25  # noqa: E402
from bench.programs.recording import Recorder, optimal_hit_rate, optimal_hit_rate_naive, optimal_hits  # noqa: E402
from sgl_jax.program.backends.base import Backend, Completion  # noqa: E402
from sgl_jax.program.choices import ChoicesDecision  # noqa: E402

DATA = common.DEFAULT_DATA
needs_data = pytest.mark.skipif(not os.path.isdir(DATA), reason=f"workload data not found at {DATA}")
JSON_ANSWERS = {"name": '"Paris",', "country": '"France",', "latitude": "48.85,", "population": "2102650,",
                "landmarks": '["Louvre", "Eiffel Tower", "Notre Dame"]'}


class Fake(Backend):
    """Answers each gen with `respond(prompt_text, params)` (default "out<i>"); select takes the last choice.
    Records (kind, prompt text, params or choices) per call and the text of every fork prefill."""

    def __init__(self, respond=None):
        self.respond, self.calls, self.prefills = respond, [], []
        self.lock = threading.Lock()

    def generate(self, prompt, params):
        with self.lock:
            self.calls.append(("gen", prompt.text, params))
            i = len(self.calls) - 1
        text = self.respond(prompt.text, params) if self.respond else None
        return Completion(f"out{i}" if text is None else text, {})

    def select(self, prompt, choices, temperature, method):
        with self.lock:
            self.calls.append(("select", prompt.text, list(choices)))
        return ChoicesDecision(choices[-1], {}), None

    def prefill(self, prompt, hold=False):
        with self.lock:
            self.prefills.append((prompt.text, hold))
        return None, None

    def gens(self):
        return [(text, p) for kind, text, p in self.calls if kind == "gen"]


def stops(params) -> tuple:
    return (params.stop,) if isinstance(params.stop, str) else tuple(params.stop)


def run_one(name: str, respond=None, n: int = 2, index: int = 0):
    """Load n items of the workload (CPU sizes), run item `index` alone on a Fake; (state, args, fake)."""
    mod, kw = module(name)
    items = mod.load(DATA, n, 0, False, **kw)
    assert len(items) == n
    fake = Fake(respond)
    st = mod.build(sgl, False).run(backend=fake, temperature=0, **common.program_args(items[index]))
    assert st.error() is None, st.error()
    return st, items[index], fake


# ------------------------------------------------------------------------------------------- (a) workloads
@pytest.mark.timeout(60)
def test_floor_prices_prompt_tokens_and_steps_at_batch_one_and_by_their_rows():
    floor = {"prefill_tok_s": 1000.0, "decode_step_s": 0.004, "row_step_s": 0.001}
    # 700 prompt tokens, 200 cached; 30 decode steps carrying 75 rows
    one, rows = runner.floor_seconds(floor, (100, 50, 10, 20), (800, 250, 40, 95))
    assert one == pytest.approx(0.5 + 30 * 0.004) and rows == pytest.approx(one + 45 * 0.001)
    assert runner.floor_seconds({**floor, "row_step_s": 0.0}, (0, 0, 0, 0), (10, 0, 5, 9))[1] == pytest.approx(
        0.01 + 5 * 0.004)


@needs_data
@pytest.mark.timeout(60)
def test_every_workload_loads_and_builds_on_both_frontends():
    import sglang as upstream

    for name in WORKLOADS:
        mod, kw = module(name)
        items = mod.load(DATA, 3, 0, False, **kw)
        assert len(items) == 3 and all(isinstance(a, dict) for a in items), name
        ours, theirs = mod.build(sgl, False), mod.build(upstream, False)
        assert isinstance(ours, sgl.SglFunction) and type(theirs).__module__.startswith("sglang"), name
        assert set(common.program_args(items[0])) == set(ours.arg_names), name  # "_" keys are the gold only
        assert mod.SIZES["cpu"]["n"] is None or mod.SIZES["full"]["n"] is None or \
            mod.SIZES["cpu"]["n"] <= mod.SIZES["full"]["n"], name
    assert parse_workloads("chat,mmlu,mmlu") == ["chat_short", "chat_long", "mmlu"]
    assert parse_workloads("all") == list(WORKLOADS)


@needs_data
@pytest.mark.timeout(60)
def test_mmlu_one_token_after_the_subject_prefix():
    st, args, fake = run_one("mmlu", lambda text, p: " A")
    (text, p), = fake.gens()
    assert p.max_new_tokens == 1 and text.endswith("Answer:")
    assert text.startswith("The following are multiple choice questions (with answers) about ")
    assert 1 <= text.count("\nAnswer: ") <= 5 and len(args["prefix"]) <= 3000  # k shots within the budget
    mmlu, _ = module("mmlu")
    assert mmlu.score(st, args) == float(mmlu.gold(args) == "A")


@needs_data
@pytest.mark.timeout(60)
def test_hellaswag_selects_among_four_endings_after_twenty_shots():
    st, args, fake = run_one("hellaswag")
    (kind, text, choices), = fake.calls
    assert kind == "select" and len(choices) == 4 and all(c.startswith(" ") for c in choices)
    assert text == args["prefix"] + args["context"] and args["prefix"].count("\n\n") == 20
    hs, _ = module("hellaswag")
    assert st["answer"] == choices[-1] and hs.score(st, args) == float(args["_gold"] == 3)


@needs_data
@pytest.mark.timeout(60)
def test_react_forks_once_per_step_and_replays_the_trace():
    react, _ = module("react")
    items = react.load(DATA, 2, 0, False)
    args = items[0]
    k = len(args["steps"])
    fake = Fake(lambda text, p: f" I know it.\nAction {k}: Finish[{args['_gold']}]\n"
                if text.endswith(f"Thought {k}:") else " thinking\nAction: Search[x]\n")
    st = react.build(sgl, False).run(backend=fake, temperature=0, **common.program_args(args))
    gens = fake.gens()
    assert len(gens) == k and not fake.prefills  # fork(1): no shared-prefix prefill
    for i, (text, p) in enumerate(sorted(gens, key=lambda g: len(g[0])), 1):
        assert text.endswith(f"Thought {i}:") and "Observation" in stops(p) and p.max_new_tokens == 48
        assert text.startswith(args["prefix"] + args["question"])
        if i > 1:  # the trace's own step i-1 (not the model's) precedes step i
            assert f"Action {i - 1}: {args['steps'][i - 2]['action'].strip()}" in text
    assert all(isinstance(st[f"step_{i}"], list) for i in range(1, k + 1))  # gathered by join
    assert react.predicted(st, args) == args["_gold"] and react.score(st, args) == 1.0
    assert args["prefix"].count("Question:") == react.SIZES["cpu"]["shots"] == 1  # the worked examples


@needs_data
@pytest.mark.timeout(60)
def test_generative_agents_dispatch_each_kind_with_its_limits():
    ga, _ = module("gen_agents")
    items = ga.load(DATA, 60, 0, False)
    assert ga.SIZES["cpu"]["threads"] == 1 and {a["kind"] for a in items} == set(ga.KINDS)
    fake = Fake()
    states = ga.build(sgl, False).run_batch([common.program_args(a) for a in items], backend=fake, temperature=0,
                                            num_threads=1)
    assert all(s.error() is None for s in states) and len(fake.gens()) == 60
    limits = {"poignancy_event": (2, ()), "generate_event_triple": (20, (")",)), "generate_pronunciatio": (6, ()),
              "action_location_sector": (10, ("}",)), "action_location_object": (5, ("}",))}
    for a, (text, p) in zip(items, fake.gens()):  # one thread: calls in log order
        assert (p.max_new_tokens, stops(p)) == limits[a["kind"]], a["kind"]
    headers = {ga.POIGNANCY: 0, ga.TRIPLE: 0, ga.EMOJI: 0, ga.SECTOR: 0, ga.OBJECT: 0}
    for text, _ in fake.gens():
        headers[next(h for h in headers if text.startswith(h))] += 1
    assert all(headers.values())


@needs_data
@pytest.mark.timeout(60)
def test_tree_of_thought_forks_two_ways_four_levels_deep_and_votes():
    ids = itertools.count()
    st, args, fake = run_one("tot", lambda text, p: f" ({next(ids)}) The answer is 18." if "single number" in text
                             else f" step {next(ids)}")
    gens = fake.gens()
    assert len(gens) == 30 and len(fake.prefills) == 15 and all(hold for _, hold in fake.prefills)
    widths = collections.Counter(text for text, _ in gens)
    assert set(widths.values()) == {2}  # siblings send the same prompt: every fork is 2 wide
    tot, _ = module("tot")
    levels = collections.Counter(sum(q in text for q in (tot.EXECUTE, tot.REFLECT, tot.ANSWER)) for text, _ in gens)
    assert levels == {0: 2, 1: 4, 2: 8, 3: 16}  # plan, execute, reflect, answer
    assert all(abs(p.temperature - 0.001) < 1e-9 for _, p in gens)
    assert len(st["answers"]) == 16 and all(a.endswith("The answer is 18.") for a in st["answers"])
    assert st["answer"] == "18"
    assert tot.score(st, args) == float(args["_gold"] == "18")
    assert tot.majority(["3", "x 4", "4", None, "5"]) == "4" and tot.majority(["none"]) is None


@needs_data
@pytest.mark.timeout(60)
def test_tips_expand_each_tip_in_a_branch_and_append_the_paragraphs():
    st, args, fake = run_one("tips", lambda text, p: " tip" if "." in stops(p) else " para")
    gens = fake.gens()
    tips = [(t, p) for t, p in gens if "." in stops(p)]
    paras = [(t, p) for t, p in gens if stops(p) == ("\n\n",)]
    assert len(tips) == 5 and len(paras) == 5 and len(gens) == 10 and not fake.prefills
    assert all(p.max_new_tokens == 24 for _, p in tips) and all(p.max_new_tokens == 48 for _, p in paras)
    for i in range(1, 6):
        para_prompt = next(t for t, _ in paras if t.endswith(f"Paragraph {i}:"))
        assert st[f"tip_{i}"] in para_prompt and f"\n{i}." in para_prompt  # the branch starts after tip i
    assert st.text().endswith("".join(f"\nParagraph {i}: para" for i in range(1, 6)))


@needs_data
@pytest.mark.timeout(60)
def test_llm_judge_branches_on_six_dimensions_then_merges():
    st, args, fake = run_one("judge", lambda text, p: " 7" if p.max_new_tokens == 2 else " fine END")
    gens = fake.gens()
    assert len(gens) == 7 and len(fake.prefills) == 1 and fake.prefills[0][1]  # one held prefix for fork(6)
    branch, final = gens[:6], gens[6]
    assert all(t.startswith(fake.prefills[0][0]) and stops(p) == ("END",) for t, p in branch)
    judge, _ = module("judge")
    assert {re.search(r"Judge the article on (\w+) only", t).group(1) for t, _ in branch} == \
        {d for d, _ in judge.DIMENSIONS}
    assert st["judgement"] == [" fine END"] * 6 and final[1].max_new_tokens == 2
    assert final[0].count("fine END") == 6 and st["score"] == " 7"


@needs_data
@pytest.mark.timeout(60)
def test_json_decode_fills_the_skeleton_with_five_constrained_gens():
    jd, _ = module("json")
    key_of = {f'"{key}": ': var for var, key in jd.KEYS.items()}
    st, args, fake = run_one("json", lambda text, p: JSON_ANSWERS[next(v for k, v in key_of.items()
                                                                        if text.endswith(k))])
    gens = fake.gens()
    assert [p.regex for _, p in gens] == list(jd.REGEX.values())
    assert [p.max_new_tokens for _, p in gens] == list(jd.MAX_TOKENS.values())
    assert json.loads(st["json"]) == {"name": "Paris", "country": "France", "latitude": 48.85,
                                      "population": 2102650, "top 3 landmarks": ["Louvre", "Eiffel Tower",
                                                                                 "Notre Dame"]}
    assert jd.score(st, args) == 1.0
    assert not jd.valid('{"name": "x"}') and not jd.valid("{") and jd.valid(st["json"].replace("48.85", "48"))


@needs_data
@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["chat_short", "chat_long"])
def test_multi_turn_chat_four_turns_of_exact_length(name):
    st, args, fake = run_one(name)
    gens = fake.gens()
    assert len(gens) == 4 and [p.max_new_tokens for _, p in gens] == args["answer_tokens"]
    assert all(p.ignore_eos for _, p in gens)
    lo, hi = module(name)[0].SIZES["cpu"]["long" if name == "chat_long" else "short"]
    assert all(lo <= m <= hi for m in args["answer_tokens"])
    for (prev, _), (cur, _) in zip(gens, gens[1:]):
        assert cur.startswith(prev)  # each turn extends the conversation so far
    for i, msg in enumerate(args["turns"]):
        assert msg.isalnum() and msg in gens[i][0]
    again = module(name)[0].load(DATA, 2, 0, False, long=name == "chat_long")
    assert again[0] == args  # seeded


@needs_data
@pytest.mark.timeout(60)
def test_rag_answers_from_three_retrieved_passages():
    rag, _ = module("rag")
    gold = rag.load(DATA, 2, 0, False)[0]["_gold"]
    st, args, fake = run_one("rag", lambda text, p: " " + gold if p.max_new_tokens == 16 else " reasons")
    gens = fake.gens()
    assert len(gens) == 2 and gens[1][0].startswith(gens[0][0]) and rag.gold(args) == gold
    assert args["context"].count("«") == 3 and "[3] «" in args["context"]
    assert gens[0][0].endswith("Reasoning: Let's think step by step in order to")
    assert args["prefix"].count("\nAnswer: ") == rag.SIZES["cpu"]["demos"] + 1  # the demos (and the format line)
    assert rag.score(st, args) == 1.0


@pytest.mark.timeout(60)
def test_the_suite_never_imports_jax():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys; sys.modules['jax'] = None; sys.modules['jaxlib'] = None\n"
            "import bench.programs.__main__, bench.programs.runner\n"
            "from bench.programs import WORKLOADS, module\n"
            "[module(w) for w in WORKLOADS]\n"
            "print('ok')")
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=root))
    assert r.stdout.strip() == "ok", r.stderr[-2000:]


# ------------------------------------------------------------------------------------------- (b) optimal hit rate
@pytest.mark.timeout(30)
def test_optimal_hit_rate_hand_worked():
    reqs = [([1, 2, 3], [4, 5]),     # nothing before it: 0 of 3
            ([1, 2, 3, 4, 9], [6, 6]),  # shares 1 2 3 4 with the first's prompt + output: 4 of 5
            ([1, 2, 7], []),        # 1 2: 2 of 3
            ([8], [1]),             # 0 of 1
            ([1, 2, 3, 4, 9, 6], [])]  # the second's prompt + output covers all 6
    assert optimal_hits(reqs) == (12, 18)
    assert optimal_hit_rate(reqs) == pytest.approx(2 / 3) == optimal_hit_rate_naive(reqs)
    assert optimal_hit_rate([]) == 0.0 and optimal_hit_rate([([], [1])]) == 0.0
    # arrival order matters: the same requests reversed reuse less
    assert optimal_hit_rate(reqs[::-1]) < optimal_hit_rate(reqs)
    # whole pages of 2, each prompt's last token computed: 4 -> 4, 2 -> 2, and the last 6 -> min(6, 5) -> 4
    assert optimal_hits(reqs, page_size=2) == (10, 18)
    assert optimal_hits(reqs, page_size=4) == (8, 18)  # 4, 0, 4


@pytest.mark.timeout(30)
def test_optimal_hit_rate_matches_the_naive_twin_on_random_sequences():
    rng = random.Random(0)
    for _ in range(200):
        reqs, seen = [], []
        for _ in range(rng.randrange(0, 12)):
            base = list(rng.choice(seen)) if seen and rng.random() < 0.7 else []
            prompt = base[:rng.randrange(0, len(base) + 1)] + [rng.randrange(4) for _ in range(rng.randrange(0, 6))]
            out = [rng.randrange(4) for _ in range(rng.randrange(0, 4))]
            reqs.append((prompt, out))
            seen.append(prompt + out)
        assert optimal_hit_rate(reqs) == optimal_hit_rate_naive(reqs), reqs


# ------------------------------------------------------------------------------------------- (c) BM25
@pytest.mark.timeout(30)
def test_ablation_settings_by_key_and_text_outputs_resolved():
    labels = lambda x: [a[0] for a in runner._settings(x)]  # noqa: E731
    assert labels(False) == ["baseline"] and labels("all") == [a[0] for a in runner.ABLATIONS]
    assert labels("fcfs,radix") == ["baseline", "radix off", "fcfs"]
    with pytest.raises(ValueError, match="unknown ablation"):
        runner._settings("radix,cache")
    rec = Recorder()
    rec.start()
    a, b = rec.arrive("hello"), rec.arrive([1, 2])
    rec.finish(a, " world")  # an API that returns text only: tokenized with the prompts
    rec.finish(b, [3])
    vocab = {"hello": [7, 8], " world": [9]}
    assert rec.resolve(lambda texts: [vocab[t] for t in texts]) == [([7, 8], [9]), ([1, 2], [3])]


def test_rounds_alternate_the_backends_and_set_them_side_by_side(monkeypatch, tmp_path):
    """`--backend engine,http --rounds 3`: engine, http, engine, http, ... each a run of its own (the peer once,
    after round 1), then each workload's programs/s and latency per round with their medians."""
    calls = []
    tput = iter([4.0, 5.0, 2.0, 6.0, 3.0, 7.0])

    def fake_run(backend, workloads, out=None, peer=False, **kw):
        calls.append((backend, peer, kw["n"]))
        v = next(tput)
        row = {"workload": "mmlu", "programs_per_s": v, "latency_s": 1 / v}
        return {"runs": [{"label": "baseline", "rows": [row]}]}

    monkeypatch.setattr(runner, "run", fake_run)
    path = tmp_path / "rounds.json"
    out = io.StringIO()
    runner.run_rounds(["engine", "http"], 3, ("mmlu",), json_path=str(path), out=out, peer=True, n=7)
    assert calls == [("engine", False, 7), ("http", True, 7), ("engine", False, 7), ("http", False, 7),
                     ("engine", False, 7), ("http", False, 7)]
    text = out.getvalue()
    assert "mmlu         engine    4.000 / 2.000 / 3.000 (3.000) | 0.250 / 0.500 / 0.333 (0.333)" in text
    assert "mmlu         http      5.000 / 6.000 / 7.000 (6.000) |" in text
    saved = json.loads(path.read_text())
    assert saved["backends"] == ["engine", "http"] and len(saved["runs"]) == 6 and saved["comparison"] in text


def paired_fakes(monkeypatch) -> list:
    """Fake engine and http targets for the paired runners (http 20 ms slower a program or batch; each program's
    engine steps 10 ms of it, counted in busy_seconds), mmlu's program wrapped to record which one ran it: the
    returned list gets ("flush" | "close", name), ("run", name) and ("batch", name, programs) in order. The
    runner's clock is a fake one that only the fake programs advance, so the figures are exact, not timed."""
    events, targets, now = [], {}, [0.0]
    monkeypatch.setattr(runner, "time", types.SimpleNamespace(perf_counter=lambda: now[0], strftime=time.strftime))

    class Target:
        def __init__(self, name):
            self.name, self.lang = name, sgl
            self.backend = Fake(lambda prompt, params: "A")
            self.delay, self.busy = {"engine": 0.0, "http": 0.02}[name], 0.0

        def busy_seconds(self):
            return self.busy

        def flush(self):
            events.append(("flush", self.name))

        def close(self):
            events.append(("close", self.name))

    def make(kind, config, overrides, url=None, engine=None):
        targets[kind] = Target(kind)
        return targets[kind]

    real_build = module("mmlu")[0].build

    def build(lang, full=False):
        prog = real_build(lang, full)
        real_run, real_batch = prog.run, prog.run_batch

        def which(backend):
            return next(t for t in targets.values() if t.backend is backend)

        def run(backend=None, **kw):
            t = which(backend)
            events.append(("run", t.name))
            now[0] += t.delay + 0.01
            t.busy += 0.01  # its engine's steps: 0.01 s of each program, the rest is the frontend's
            return real_run(backend=backend, **kw)

        def run_batch(batch, backend=None, **kw):
            t = which(backend)
            events.append(("batch", t.name, len(batch)))
            now[0] += t.delay
            return real_batch(batch, backend=backend, **kw)
        prog.run, prog.run_batch = run, run_batch
        return prog

    monkeypatch.setattr(runner, "make_target", make)
    monkeypatch.setattr(module("mmlu")[0], "build", build)
    return events


@needs_data
@pytest.mark.timeout(60)
def test_paired_latency_runs_each_program_on_every_backend_in_turn(monkeypatch, tmp_path):
    """`--paired-latency N`: both targets alive at once, both flushed at each workload's start, each program run on
    both with the order rotating program by program; the paired difference and the wins counted per program, and
    the time outside each backend's engine steps (wall - busy_seconds) beside it."""
    events = paired_fakes(monkeypatch)
    out, path = io.StringIO(), tmp_path / "paired.json"
    res = runner.paired_latency(["engine", "http"], ("mmlu",), 4, out=out, json_path=str(path))
    assert [e[1] for e in events if e[0] == "run"] == ["engine", "http", "http", "engine", "engine", "http", "http",
                                                       "engine"]
    assert sorted(e[1] for e in events if e[0] == "flush") == ["engine", "http"]
    assert sorted(e[1] for e in events if e[0] == "close") == ["engine", "http"]
    row = res["rows"][0]
    assert len(row["seconds"]["engine"]) == len(row["seconds"]["http"]) == 4
    assert row["engine_faster_than_http_in"] == 4 and row["http_minus_engine_mean_s"] == pytest.approx(0.02)
    assert "engine faster in 4 of 4" in out.getvalue() and json.loads(path.read_text())["programs"] == 4
    outside = row["outside_steps_seconds"]  # wall minus the steps: the http target's 0.02 s delay, not the steps
    assert outside["engine"] == pytest.approx([0.0] * 4) and outside["http"] == pytest.approx([0.02] * 4), outside
    assert row["outside_engine_less_than_http_in"] == 4 and "engine less in 4 of 4" in out.getvalue()


@needs_data
@pytest.mark.timeout(60)
def test_paired_throughput_runs_each_batch_on_every_backend_in_turn_from_a_flushed_cache(monkeypatch, tmp_path):
    """`--paired-throughput R`: both targets alive at once; each round the workload's whole batch on both, the order
    rotating round by round, each run from a flushed cache; the paired difference and the wins counted per round."""
    events = paired_fakes(monkeypatch)
    out, path = io.StringIO(), tmp_path / "paired.json"
    res = runner.paired_throughput(["engine", "http"], ("mmlu",), 3, n=5, out=out, json_path=str(path))
    runs = [e for e in events if e[0] != "close"][2:]  # after the flushes at the workload's start
    assert runs == [("flush", "engine"), ("batch", "engine", 5), ("flush", "http"), ("batch", "http", 5),
                    ("flush", "http"), ("batch", "http", 5), ("flush", "engine"), ("batch", "engine", 5),
                    ("flush", "engine"), ("batch", "engine", 5), ("flush", "http"), ("batch", "http", 5)]
    row = res["rows"][0]
    assert row["programs"] == 5 and row["runs"] == 3 and len(row["seconds"]["http"]) == 3
    assert row["engine_faster_than_http_in"] == 3 and row["http_minus_engine_mean_s"] == pytest.approx(0.02)
    assert "engine faster in 3 of 3" in out.getvalue() and json.loads(path.read_text())["rounds"] == 3
    assert "outside_steps_seconds" not in row  # throughput: no per-program step accounting


@pytest.mark.timeout(60)
def test_latency_prices_each_program_at_rates_probed_right_before_it(monkeypatch):
    """Each latency program's floor uses the rates probed just before it (the host drifts), the probes keep the
    cache (the programs after the first find what the earlier ones cached) and draw fresh prompts each time."""
    events, probes = [], [(1000.0, 0.004), (500.0, 0.008), (250.0, 0.016)]

    def probe(target, **kw):
        events.append(("probe", kw["flush"], kw["seed"], kw["tries"], kw["rows"]))
        tok_s, step = probes[len([e for e in events if e[0] == "probe"]) - 1]
        return {"prefill_tok_s": tok_s, "decode_step_s": step, "row_step_s": None}

    class Target:
        backend, counters_ = object(), [0, 0, 0, 0]

        def flush(self):
            events.append(("flush",))

        def step_counters(self):
            return tuple(self.counters_)

    class Prog:
        def run(self, backend=None, temperature=None, **kw):
            events.append(("run",))
            t.counters_ = [t.counters_[0] + 100, t.counters_[1], t.counters_[2] + 10, t.counters_[3] + 10]
            return types.SimpleNamespace(sync=lambda: None)

    t = Target()
    monkeypatch.setattr(runner, "measure_floor", probe)
    out = runner._latency(t, Prog(), [{}, {}, {}], {"prefill_tok_s": 1e9, "decode_step_s": 1e-9, "row_step_s": 0.0})
    assert [e[0] for e in events] == ["flush", "probe", "run", "probe", "run", "probe", "run"]
    assert [e[1:] for e in events if e[0] == "probe"] == [(False, 1234, 1, 1), (False, 1235, 1, 1), (False, 1236, 1, 1)]
    # 100 uncached prompt tokens and 10 decode steps each, priced at its own probe's rates
    floors = [100 / r + 10 * s for r, s in probes]
    assert out["floor_s"] == pytest.approx(sum(floors) / 3)
    assert out["latency_over_floor"] == pytest.approx(out["latency_s"] / out["floor_s"])
    assert out["floor_prefill_tok_s"] == pytest.approx(1750 / 3) and out["floor_step_s"] == pytest.approx(0.028 / 3)


@needs_data
@pytest.mark.timeout(60)
def test_latency_programs_beyond_the_throughput_batch_come_from_the_loader():
    mod, load_kw = module("tot")
    batch = [common.program_args(a) for a in mod.load(DATA, 2, 0, False, **load_kw)]
    assert runner.latency_batch(mod, load_kw, batch, 1, DATA) == batch[:1]
    assert runner.latency_batch(mod, load_kw, batch, 0, DATA) == []
    more = runner.latency_batch(mod, load_kw, batch, 5, DATA)
    assert len(more) == 5 and more[:2] == batch  # the loader's first five: the batch's two, then three more
    assert len({repr(sorted(a.items())) for a in more}) == 5


def test_bm25_ranks_a_tiny_corpus_as_worked_out_by_hand():
    docs = ["the cat sat on the mat", "the dog sat", "cat cat dog"]
    bm = BM25(docs)  # terms: [cat, sat, mat], [dog, sat], [cat, cat, dog]; avgdl 8/3
    idf = math.log(1 + (3 - 2 + 0.5) / (2 + 0.5))  # cat, dog and sat are each in 2 of 3 documents
    norm3 = 1.5 * (1 - 0.75 + 0.75 * 3 / (8 / 3))  # k1 * (1 - b + b * |d| / avgdl) for a 3-term document
    norm2 = 1.5 * (1 - 0.75 + 0.75 * 2 / (8 / 3))
    hits = bm.search("cat", k=3)
    assert [i for i, _ in hits] == [2, 0]  # tf 2 beats tf 1 at equal length; the dog document shares nothing
    assert hits[0][1] == pytest.approx(idf * 2 * 2.5 / (2 + norm3))
    assert hits[1][1] == pytest.approx(idf * 1 * 2.5 / (1 + norm3))
    hits = bm.search("Dog sat?", k=3)
    assert [i for i, _ in hits] == [1, 0, 2]  # both terms, shorter; then a tie broken by document order
    assert hits[0][1] == pytest.approx(2 * idf * 2.5 / (1 + norm2))
    assert hits[1][1] == pytest.approx(hits[2][1])
    assert bm.search("the on", k=3) == [] and bm.search("cat", k=1) == bm.search("cat")[:1]


@needs_data
@pytest.mark.timeout(60)
def test_rag_corpus_is_the_searched_wikipedia_passages():
    rag, _ = module("rag")
    react, _ = module("react")
    docs = rag.corpus(react.traces(DATA))
    titles = [d.split(" | ", 1)[0].lower() for d in docs]
    assert len(titles) == len(set(titles)) > 100
    assert not any(d.split(" | ", 1)[1].startswith("Could not find") for d in docs)


# ------------------------------------------------------------------------------------------- (d) smoke
TINY_ENGINE = dict(page_size=16, max_context_len=16384, max_running_requests=32, max_prefill_tokens=512,
                   prefill_block=64, decode_buckets=[1, 8, 32], prefill_block_buckets=[1, 8],
                   page_width_buckets=[1024], max_mixed_blocks=0, kv_memory_gb=0.1, compile_cache_dir="",
                   max_top_logprobs=5, warmup=False)  # shapes compile as the workloads reach them; one table width


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    """The tiny random llama (tests/test_engine.py's), with a 16k-position window: the workloads' prompts are
    thousands of its byte-level tokens."""
    from sgl_jax.models import testing

    testing.TINY_CONFIGS["llama-long"] = dict(testing.TINY_CONFIGS["llama"], max_position_embeddings=16384)
    try:
        return testing.write_tiny_gguf("llama-long", str(tmp_path_factory.mktemp("tiny") / "tiny_long.gguf"))
    finally:
        del testing.TINY_CONFIGS["llama-long"]


@needs_data
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_smoke_every_workload_end_to_end_on_the_tiny_engine(tiny_path, tmp_path):
    from sgl_jax.engine import Engine

    out, table = tmp_path / "out.json", io.StringIO()
    with Engine(model=tiny_path, progress=False, **TINY_ENGINE) as engine:
        runner.run("engine", list(WORKLOADS), DATA, n=1, latency_programs=1, engine=engine, json_path=str(out),
                   out=table)
        assert engine.num_prefix_holds == 0
        engine.check_integrity()
    res = json.loads(out.read_text())
    assert all(f"\n{w} " in table.getvalue() for w in WORKLOADS) and "optimal" in table.getvalue()
    assert res["peer"].startswith("peer") and len(res["runs"]) == 1
    floor = res["runs"][0]["floor"]
    assert floor["prefill_tok_s"] > 0 and floor["decode_step_s"] > 0 and "lat/floor" in table.getvalue()
    assert floor["row_step_s"] >= 0 and floor["rows_measured"] == 8 and "lat/rows" in table.getvalue()
    rows = res["runs"][0]["rows"]
    assert [r["workload"] for r in rows] == list(WORKLOADS)
    for r in rows:
        assert set(r) == set(runner.FIELDS), r["workload"]
        assert r["programs"] == 1 and r["errors"] == 0, r
        assert 0 <= r["hit_rate"] <= 1 and 0 <= r["optimal_hit_rate"] <= 1, r
        assert r["requests"] >= 1 and r["programs_per_s"] > 0 and r["latency_s"] > 0, r
        # the compute floor: uncached prompt tokens at the measured prefill rate + decode steps at the step cost
        assert r["floor_s"] > 0 and r["latency_over_floor"] == pytest.approx(r["latency_s"] / r["floor_s"]), r
        assert r["floor_rows_s"] >= r["floor_s"], r  # steps priced by their rows: never below the batch-1 price
        assert r["latency_over_floor_rows"] == pytest.approx(r["latency_s"] / r["floor_rows_s"]), r
        # the rates that priced it, measured again right before the workload's latency programs
        assert r["floor_prefill_tok_s"] > 0 and r["floor_step_s"] > 0 and r["latency_programs"] == 1, r
        # the recorder saw exactly the prompts the engine counted
        assert r["optimal_prompt_tokens"] == r["prompt_tokens"], r
        # scheduling can only lose hits against the infinite-cache bound (partial pages are reused by copies,
        # so the page-granular bound may be passed)
        assert r["hit_rate"] <= r["optimal_hit_rate"] + 1e-9 and r["optimal_page_hit_rate"] <= r["optimal_hit_rate"], r
    metric = {r["workload"]: r for r in rows}
    assert metric["json"]["json_valid"] == 1.0  # the FSM keeps every value well-formed, even on a random model
    assert all(metric[w]["accuracy"] is not None for w in ("mmlu", "hellaswag", "react", "tot", "rag"))
