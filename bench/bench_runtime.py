"""Runtime benchmarks of the sgl_jax Engine on CPU (SmolLM2-135M): prefix caching, batching, host overhead.

    python bench/bench_runtime.py shared-prefix [--json OUT]   # 64 requests, ~1,000-token few-shot prefix
    python bench/bench_runtime.py sixteen       [--json OUT]   # cpu-baselines.md's 16-request test (+ llama-server)
    python bench/bench_runtime.py multiturn     [--json OUT]   # 8 conversations x 4 turns, short and long
    python bench/bench_runtime.py decode [--config PRESET] [--kv-dtypes A,B] [--json OUT]  # 32/64 rows vs floors
    python bench/bench_runtime.py scheduler     [--json OUT]   # schedule() cost, 1,000 / 5,000 waiting
    python bench/bench_runtime.py all           [--json OUT]   # everything (~15 min on 2 busy cores)

Every engine in every subcommand uses the same EngineConfig (ENGINE below), so the step shapes it compiles
hit the persistent compilation cache after the first run. Runs with the radix cache on and off use two
engines, one after the other (the first is shut down before the second starts).

What is timed, per workload phase: wall time from `engine.generate(batch)` to the last reply (requests/s,
output tokens/s); cache hit rate = sum(meta_info.cached_tokens) / sum(meta_info.prompt_tokens). The
engine's own per-step lists are used as the brief defines them: `engine.step_times` (t1->t2 in
Engine._one_step: runner.run, i.e. host packing + the compiled step + device_get) and `engine.host_times`
(schedule() + on_step_done + postprocess). Probes installed on the engine instance (bench-side wrappers,
nothing in sgl_jax changes) split this further: schedule() alone, and the compiled call alone (blocked
until ready), so pack = step_time - compiled and postprocess = host_time - schedule. Each step is tagged
with its plan (decode rows, prefill chunks/tokens, compiled shape) so that "decode phase" medians use only
steps with exactly the batch's decode rows (32 or 64) and no prefill.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import threading
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import peers  # noqa: E402

# One config for every engine here (identical shapes -> persistent compile-cache hits across runs).
# 3 page widths x (2 decode buckets x {0, 1} blocks + 2 block buckets x {normal, full-logits}) = 24 shapes.
ENGINE = dict(
    model="smollm2-135m",
    max_context_len=1152,
    page_size=16,
    page_width_buckets=[16, 40, 72],  # 256 / 640 / 1152 tokens
    decode_buckets=[16, 64],
    prefill_block_buckets=[1, 8],
    prefill_block=64,
    max_prefill_tokens=512,
    max_mixed_blocks=1,  # must be a compiled block bucket: with [1, 8] and the default 2 a mixed step crashes
    max_running_requests=64,
    kv_memory_gb=2.0,  # 64 x 576 tokens (decode ctx ~512) needs ~1.7 GB of fp32 KV
    compile_cache_dir="auto",
)
GREEDY = {"temperature": 0.0, "ignore_eos": True}


def _log(*a):
    print(*a, flush=True)


class Contention:
    """How many cores *other* processes used during a timed section (from /proc/stat minus os.times())."""

    QUIET_WAIT_S = 0.0

    @staticmethod
    def _stat():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait

    def __enter__(self):
        if self.QUIET_WAIT_S > 0:
            try:
                sys.path.insert(0, HERE)
                import floors
                floors.wait_for_quiet(self.QUIET_WAIT_S, 0.15, log=_log)
            except (ImportError, AttributeError):
                pass
        self.t0, self.s0, self.p0 = time.perf_counter(), self._stat(), os.times()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t0
        (tot1, idle1), (tot0, idle0) = self._stat(), self.s0
        p1 = os.times()
        ncpu = os.cpu_count() or 1
        busy_cores = ncpu * (1 - (idle1 - idle0) / max(tot1 - tot0, 1))
        ours = ((p1.user - self.p0.user) + (p1.system - self.p0.system)) / max(wall, 1e-9)
        self.ours_cores, self.others_cores = ours, max(busy_cores - ours, 0.0)


def _med(xs):
    return statistics.median(xs) if xs else float("nan")


# ------------------------------------------------------------------------------------------ text
COUNTRIES = [
    ("France", "Paris", "Europe"), ("Japan", "Tokyo", "Asia"), ("Brazil", "Brasilia", "South America"),
    ("Canada", "Ottawa", "North America"), ("Kenya", "Nairobi", "Africa"), ("Australia", "Canberra", "Oceania"),
    ("Egypt", "Cairo", "Africa"), ("Germany", "Berlin", "Europe"), ("India", "New Delhi", "Asia"),
    ("Mexico", "Mexico City", "North America"), ("Peru", "Lima", "South America"), ("Norway", "Oslo", "Europe"),
    ("Vietnam", "Hanoi", "Asia"), ("Morocco", "Rabat", "Africa"), ("Chile", "Santiago", "South America"),
    ("Spain", "Madrid", "Europe"), ("Thailand", "Bangkok", "Asia"), ("Ghana", "Accra", "Africa"),
    ("Argentina", "Buenos Aires", "South America"), ("Italy", "Rome", "Europe"), ("Turkey", "Ankara", "Asia"),
    ("Poland", "Warsaw", "Europe"), ("Nigeria", "Abuja", "Africa"), ("Colombia", "Bogota", "South America"),
    ("Sweden", "Stockholm", "Europe"), ("Indonesia", "Jakarta", "Asia"), ("Ethiopia", "Addis Ababa", "Africa"),
    ("Portugal", "Lisbon", "Europe"), ("Pakistan", "Islamabad", "Asia"), ("Cuba", "Havana", "North America"),
]
ELEMENTS = [("hydrogen", "H", 1), ("helium", "He", 2), ("carbon", "C", 6), ("nitrogen", "N", 7),
            ("oxygen", "O", 8), ("sodium", "Na", 11), ("iron", "Fe", 26), ("copper", "Cu", 29),
            ("silver", "Ag", 47), ("gold", "Au", 79), ("mercury", "Hg", 80), ("lead", "Pb", 82)]
CITIES = ["Lyon", "Osaka", "Porto", "Denver", "Krakow", "Seville", "Leeds", "Turin", "Graz", "Utrecht",
          "Kyoto", "Bergen", "Malmo", "Dresden", "Quebec", "Perth", "Austin", "Nantes", "Bilbao", "Gdansk"]
NAMES = ["Alice", "Bruno", "Chen", "Dalia", "Emeka", "Farah", "Goran", "Hana", "Ivan", "Jun", "Kofi", "Lena"]
TOPICS = ["the history of paper money", "how bees communicate", "why the sky is blue", "composting at home",
          "the rules of chess openings", "training for a first marathon", "how vaccines are tested",
          "the economics of public transport", "writing clean Python code", "caring for indoor plants",
          "the life cycle of stars", "planning a budget for a small business"]
SENTENCES = [
    "I have been reading about {t} for a few weeks and I keep finding contradictory explanations.",
    "My friend {n} told me that {t} is much simpler than most books make it look.",
    "Last year I tried to explain {t} to my students in {c}, and it did not go very well.",
    "There are at least {k} different points of view on {t}, and each of them has some merit.",
    "What surprised me most was how little the basic ideas have changed in the last {k} decades.",
    "Could you keep the answer practical, with concrete numbers where they help?",
    "I would also like to know which common beliefs about it are simply wrong.",
    "In {c} people usually learn about it at school, but only very briefly.",
    "When {n} and I discussed it over dinner, we could not agree on the most important factor.",
    "Please assume I know the basics but have never studied the subject formally.",
    "A short list of the main steps would be more useful to me than a long essay.",
    "I also read that it takes about {k} hours of practice before the results become visible.",
]


def fewshot_prefix(tok, target_tokens: int, seed: int = 0) -> list[int]:
    """A realistic few-shot prompt (mixed Q/A examples) of at least target_tokens tokens, cut at an example."""
    rng = random.Random(seed)
    text = ("The following are questions with short, correct answers about geography, chemistry and "
            "arithmetic. Answer the last question in the same style.\n\n")
    examples = []
    for country, capital, cont in COUNTRIES:
        examples.append(f"Q: What is the capital of {country}, and on which continent is it?\n"
                        f"A: The capital of {country} is {capital}, in {cont}.\n\n")
    for name, sym, z in ELEMENTS:
        examples.append(f"Q: What is the chemical symbol of {name}, and what is its atomic number?\n"
                        f"A: The symbol of {name} is {sym} and its atomic number is {z}.\n\n")
    for _ in range(40):
        a, b, c = rng.randrange(12, 99), rng.randrange(12, 99), rng.randrange(2, 9)
        examples.append(f"Q: A shop sells {a} apples in the morning and {b} in the afternoon, in bags of {c}. "
                        f"How many full bags is that?\nA: {a} + {b} = {a + b} apples, which is "
                        f"{(a + b) // c} full bags of {c}.\n\n")
    rng.shuffle(examples)
    ids = tok.encode(text)
    for ex in examples:
        if len(ids) >= target_tokens:
            break
        ids += tok.encode(ex, add_special_tokens=False)
    assert len(ids) >= target_tokens, "not enough example text for the requested prefix length"
    return ids


QUESTION_TEMPLATES = {
    # ~30 tokens (shared-prefix workload)
    "long": "Q: {who}'s train leaves {c1} for {c2} at {s} km per hour. How far does it go in {t} hours?\nA:",
    # ~20 tokens (the 16-request workload's 18-22-token suffix)
    "short": "Q: {who} buys {a2} apples and {b2} pears. How many fruits?\nA:",
}


def train_questions(tok, n: int, seed: int, lo: int, hi: int, kind: str = "long") -> list[list[int]]:
    """n distinct short word problems, token ids without BOS, each lo..hi tokens long."""
    rng = random.Random(seed)
    out, seen, tries = [], set(), 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n + 1000:
            raise RuntimeError(f"could not make {n} distinct {kind!r} questions of {lo}-{hi} tokens")
        c1, c2 = rng.sample(CITIES, 2)
        h, t = rng.randrange(5, 12), rng.randrange(2, 6)
        q = QUESTION_TEMPLATES[kind].format(who=rng.choice(NAMES), c1=c1, c2=c2, h=h, h2=h + t, t=t,
                                            s=rng.randrange(40, 160), a=rng.randrange(10, 999),
                                            b=rng.randrange(10, 999), a2=rng.randrange(2, 99), b2=rng.randrange(2, 99))
        if q in seen:
            continue
        ids = tok.encode(q, add_special_tokens=False)
        if lo <= len(ids) <= hi:
            seen.add(q)
            out.append(ids)
    return out


def user_message(rng: random.Random, tok, lo: int, hi: int) -> str:
    """A chat user message of roughly lo..hi tokens (whole sentences; ends with a question)."""
    target = rng.randint(lo, hi)
    t, n, c = rng.choice(TOPICS), rng.choice(NAMES), rng.choice(CITIES)
    parts = [f"I have a question about {t}."]
    while True:
        s = rng.choice(SENTENCES).format(t=t, n=n, c=c, k=rng.randrange(3, 40))
        cand = " ".join(parts + [s])
        if len(tok.encode(cand, add_special_tokens=False)) > target - 12:
            break
        parts.append(s)
    parts.append(f"So, in your own words: what should a beginner understand first about {t}?")
    return " ".join(parts)


# ----------------------------------------------------------------------------------------- engine
class StepProbe:
    """Per-step records of one Engine through its public step listener (Engine.add_step_listener).

    steps[i] describes the i-th step and lines up with engine.step_times[i] / host_times[i] as long as all
    three lists are cleared together while the engine is idle (`reset`)."""

    def __init__(self, engine):
        self.engine = engine
        self.steps: list[dict] = []
        self.last_inputs: dict = {}  # (shape, decode rows) -> the StepInputs of its last step, for step_split()
        engine.add_step_listener(self._on_step)

    def _on_step(self, info):
        plan, shape = info.plan, info.plan.shape
        # keyed by the rows too: a shape's last step is often a short one (rows finishing one by one, padded to
        # the bucket), which replays as that step, not as a full batch
        self.last_inputs[shape, len(plan.decodes)] = info.inputs
        kv = [c.end for c in plan.chunks]
        self.steps.append(dict(
            nd=len(plan.decodes), npf=len(plan.prefills),
            pf_tokens=sum(len(c.token_ids) for c in plan.prefills),
            shape=(shape.num_decode, shape.num_blocks, shape.page_width),
            mean_kv=sum(kv) / len(kv), sched_s=info.schedule_seconds, dev_s=info.device_seconds))

    def reset(self):
        e = self.engine
        assert not e.scheduler.has_work
        e.step_times.clear()
        e.host_times.clear()
        self.steps.clear()

    def records(self) -> list[dict]:
        e = self.engine
        n = min(len(self.steps), len(e.step_times), len(e.host_times))
        out = []
        for s, st, ht in zip(self.steps[:n], e.step_times[:n], e.host_times[:n]):
            r = dict(s, step_s=st, host_s=ht, pack_s=st - s["dev_s"], post_s=ht - s["sched_s"])
            out.append(r)
        return out


def step_split(eng, probe, shape, rows: int, n: int = 8) -> dict:
    """Replay the last real inputs of `shape` with `rows` decode rows three ways (median of n after 1 warm-up
    call): the engine's compiled step; the model forward alone (no sampling/penalties/logprobs); the forward with
    attention replaced by the identity (bench_model.py's `--attention none` patch). The KV pool is written at the
    same slots again: call only when idle, and flush the cache afterwards."""
    import jax

    from sgl_jax.models import llama
    from sgl_jax.models.attention import AttnMetadata, AttentionFn

    r = eng.runner
    inp = probe.last_inputs[shape, rows]
    compiled = r._compile(shape)  # already compiled: the cached executable

    def full():
        r.kv, r.pstate, out = compiled(r.params, r.kv, r.pstate, r.cbuf, inp)
        jax.block_until_ready(out)

    def forward_fn(model):
        def fwd(params, kv, inp):
            meta = AttnMetadata(inp.positions, inp.slot_mapping, inp.dec_page_table, inp.dec_kv_lens,
                                inp.pre_page_table, inp.pre_kv_lens, block_q=r.prefill_block)
            return model.apply({"params": params}, inp.input_ids, meta, kv, inp.logits_indices)
        f = jax.jit(fwd, donate_argnums=(1,))
        f = f.lower(r.params, r.kv, inp).compile()

        def run():
            logits, r.kv = f(r.params, r.kv, inp)
            logits.block_until_ready()
        return run

    variants = {"full_step": full, "forward": forward_fn(r.model)}
    orig = llama.get_attention_backend
    llama.get_attention_backend = lambda *_a, **_k: AttentionFn("none", lambda q, *x, **kw: q)
    try:
        variants["forward_no_attention"] = forward_fn(llama.CausalLM(r.model.cfg, r.model.dtype))
    finally:
        llama.get_attention_backend = orig
    ts: dict = {k: [] for k in variants}
    for fn in variants.values():
        fn()  # warm-up
    for _ in range(n):  # interleaved, so that other jobs' bursts hit every variant alike
        for k, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t0)
    res = {}
    for k, v in ts.items():
        res[f"{k}_ms"] = 1e3 * _med(v)
        res[f"{k}_min_ms"] = 1e3 * min(v)
    res["attention_ms"] = res["forward_ms"] - res["forward_no_attention_ms"]
    res["sampling_etc_ms"] = res["full_step_ms"] - res["forward_ms"]
    res["attention_min_ms"] = res["forward_min_ms"] - res["forward_no_attention_min_ms"]
    res["sampling_etc_min_ms"] = res["full_step_min_ms"] - res["forward_min_ms"]
    return res


def make_engine(**overrides):
    from sgl_jax.engine import Engine

    t0 = time.perf_counter()
    eng = Engine(progress=False, **{**ENGINE, **overrides})
    _log(f"  engine up in {time.perf_counter() - t0:.1f} s (load {eng.load_seconds:.1f} s, "
         f"warm-up/compile {eng.compile_seconds:.1f} s for {eng.warmup_compiles} shapes; "
         f"{eng.runner.num_pages} KV pages; radix {'off' if eng.config.cache.disable_radix_cache else 'on'})")
    return eng, StepProbe(eng)


def step_summary(recs: list[dict]) -> dict:
    if not recs:
        return {}
    return dict(
        steps=len(recs),
        decode_only_steps=sum(1 for r in recs if r["npf"] == 0),
        prefill_tokens=sum(r["pf_tokens"] for r in recs),
        step_s_sum=sum(r["step_s"] for r in recs), host_s_sum=sum(r["host_s"] for r in recs),
        dev_s_sum=sum(r["dev_s"] for r in recs), pack_s_sum=sum(r["pack_s"] for r in recs),
        sched_s_sum=sum(r["sched_s"] for r in recs),
        median_step_ms=1e3 * _med([r["step_s"] for r in recs]),
        median_host_ms=1e3 * _med([r["host_s"] for r in recs]),
        max_prefill_chunks=max(r["npf"] for r in recs),
        prefill_only_tok_s=(sum(r["pf_tokens"] for r in recs if r["nd"] == 0)
                            / max(sum(r["dev_s"] for r in recs if r["nd"] == 0), 1e-9)),
        decode_only_median_ms=1e3 * _med([r["step_s"] for r in recs if r["npf"] == 0]),
        decode_rows_median=_med([r["nd"] for r in recs if r["npf"] == 0]),
        mean_prefill_chunks_in_prefill_steps=_med([r["npf"] for r in recs if r["npf"]]) if any(
            r["npf"] for r in recs) else 0,
    )


def run_phase(eng, probe, prompts: list[list[int]], sp, label: str, flush: bool = False) -> dict:
    """Send every prompt at once (one generate() batch) and wait for all replies."""
    if flush:
        assert eng.flush_cache(), "flush_cache refused"
    probe.reset()
    with Contention() as cont:
        t0 = time.perf_counter()
        outs = eng.generate(input_ids=prompts, sampling_params=sp)
        wall = time.perf_counter() - t0
    bad = [o["meta_info"]["finish_reason"] for o in outs if o["meta_info"]["finish_reason"]["type"] == "abort"]
    if bad:
        raise RuntimeError(f"{label}: {len(bad)} requests aborted, e.g. {bad[0]}")
    prompt_t = sum(o["meta_info"]["prompt_tokens"] for o in outs)
    cached_t = sum(o["meta_info"]["cached_tokens"] for o in outs)
    comp_t = sum(o["meta_info"]["completion_tokens"] for o in outs)
    res = dict(label=label, n=len(prompts), wall_s=wall, req_s=len(prompts) / wall, out_tok_s=comp_t / wall,
               prompt_tokens=prompt_t, cached_tokens=cached_t, completion_tokens=comp_t,
               hit_rate=cached_t / max(prompt_t, 1),
               mean_e2e_s=statistics.mean(o["meta_info"]["e2e_latency"] for o in outs),
               ours_cores=cont.ours_cores, others_cores=cont.others_cores, cpu_s=cont.ours_cores * wall,
               **step_summary(probe.records()))
    res["records"] = [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()} for r in probe.records()]
    _log(f"    {label:<28} {res['wall_s']:7.2f} s  {res['req_s']:6.2f} req/s  {res['out_tok_s']:7.1f} out tok/s  "
         f"hit {res['hit_rate']:5.1%}  steps {res['steps']} (prefill tok {res['prefill_tokens']}, "
         f"median step {res['median_step_ms']:.0f} ms; others used {res['others_cores']:.2f} cores)")
    return res


def _table(headers: list[str], rows: list[list]) -> str:
    cells = [[h for h in headers]] + [[(f"{v:.2f}" if isinstance(v, float) else str(v)) for v in r] for r in rows]
    w = [max(len(c[i]) for c in cells) for i in range(len(headers))]
    line = lambda c: "| " + " | ".join(x.rjust(w[i]) if i else x.ljust(w[i]) for i, x in enumerate(c)) + " |"  # noqa
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (x + 2) for x in w) + "|"] + [line(c) for c in cells[1:]])


# ----------------------------------------------------------------------------- 1. shared prefix
def bench_shared_prefix(args) -> dict:
    n, qlen_lo, qlen_hi = args.num_requests, 28, 34
    sp = dict(GREEDY, max_new_tokens=16)
    res: dict = {"workload": f"{n} requests, ~{args.prefix_tokens}-token few-shot prefix, {qlen_lo}-{qlen_hi}-token "
                             "questions, 16 greedy output tokens (ignore_eos), all at once"}
    for mode in ("on", "off"):
        _log(f"[shared-prefix] radix {mode}")
        eng, probe = make_engine(disable_radix_cache=(mode == "off"))
        tok = eng.tokenizer
        prefix = fewshot_prefix(tok, args.prefix_tokens)
        cold_q = train_questions(tok, n, seed=1, lo=qlen_lo, hi=qlen_hi)
        warm_q = train_questions(tok, n, seed=2, lo=qlen_lo, hi=qlen_hi)
        assert not set(map(tuple, cold_q)) & set(map(tuple, warm_q))
        res["prefix_tokens"] = len(prefix)
        res["mean_question_tokens"] = statistics.mean(map(len, cold_q + warm_q))
        phases = {"cold": run_phase(eng, probe, [prefix + q for q in cold_q], sp, f"radix {mode} cold", flush=True)}
        if mode == "on" or not args.skip_off_warm:
            phases["warm"] = run_phase(eng, probe, [prefix + q for q in warm_q], sp, f"radix {mode} warm")
        res[mode] = phases
        eng.shutdown()
        del eng, probe
    on, off = res["on"], res["off"]
    off_warm = off.get("warm", off["cold"])
    res["speedup_cold"] = on["cold"]["req_s"] / off["cold"]["req_s"]
    res["speedup_warm"] = on["warm"]["req_s"] / off_warm["req_s"]
    res["cpu_ratio_cold"] = off["cold"]["cpu_s"] / on["cold"]["cpu_s"]
    res["cpu_ratio_warm"] = off_warm["cpu_s"] / on["warm"]["cpu_s"]
    rows = []
    for mode in ("on", "off"):
        for ph, r in res[mode].items():
            rows.append([f"radix {mode}, {ph}", r["req_s"], r["out_tok_s"], f"{r['hit_rate']:.1%}", r["wall_s"],
                         r["prefill_tokens"], r["steps"], f"{r['median_step_ms']:.0f}", f"{r['cpu_s']:.1f}",
                         f"{r['others_cores']:.2f}"])
    res["table"] = _table(["phase", "req/s", "out tok/s", "hit rate", "wall s", "prefill tok", "steps",
                           "med step ms", "CPU-s", "others' cores"], rows)
    res["table"] += (f"\nspeedup radix on/off: cold {res['speedup_cold']:.2f}x (target >= 3x), warm "
                     f"{res['speedup_warm']:.2f}x (target >= 4x)"
                     + (" [off warm not run: off cold used]" if "warm" not in off else "")
                     + f"; CPU-seconds off/on (insensitive to other jobs): cold {res['cpu_ratio_cold']:.2f}x, "
                       f"warm {res['cpu_ratio_warm']:.2f}x")
    return res


# --------------------------------------------------------------------------- 2. the 16-request test
def bench_sixteen(args) -> dict:
    sp = dict(GREEDY, max_new_tokens=64)
    res: dict = {"workload": "16 requests, ~400-token shared prefix + 18-22-token distinct suffix, 64 greedy output "
                             "tokens (ignore_eos), all at once; cold (flushed) then warm (new suffixes)"}
    modes = ("on", "off") if args.with_off else ("on",)
    for mode in modes:
        _log(f"[sixteen] radix {mode}")
        eng, probe = make_engine(disable_radix_cache=(mode == "off"))
        tok = eng.tokenizer
        prefix = fewshot_prefix(tok, 400, seed=3)
        qs = train_questions(tok, 32 * args.repeats, seed=4, lo=18, hi=22, kind="short")
        res["prefix_tokens"] = len(prefix)
        runs = []
        for i in range(args.repeats):
            cold = run_phase(eng, probe, [prefix + q for q in qs[32 * i:32 * i + 16]], sp, f"radix {mode} cold #{i}",
                             flush=True)
            warm = run_phase(eng, probe, [prefix + q for q in qs[32 * i + 16:32 * i + 32]], sp,
                             f"radix {mode} warm #{i}")
            runs.append({"cold": cold, "warm": warm})
        res[mode] = {"runs": runs,
                     "cold_req_s_median": _med([r["cold"]["req_s"] for r in runs]),
                     "warm_req_s_median": _med([r["warm"]["req_s"] for r in runs]),
                     "cold_out_tok_s_median": _med([r["cold"]["out_tok_s"] for r in runs]),
                     "warm_out_tok_s_median": _med([r["warm"]["out_tok_s"] for r in runs]),
                     "cold_cpu_s_median": _med([r["cold"]["cpu_s"] for r in runs]),
                     "warm_cpu_s_median": _med([r["warm"]["cpu_s"] for r in runs]),
                     "others_cores_median": _med([r[p]["others_cores"] for r in runs for p in ("cold", "warm")]),
                     "warm_hit_rate": runs[-1]["warm"]["hit_rate"], "cold_hit_rate": runs[-1]["cold"]["hit_rate"]}
        eng.shutdown()
        del eng, probe
    rows = []
    for mode in modes:
        r = res[mode]
        rows.append([f"sgl_jax, radix {mode} (median of {args.repeats})", f"{r['cold_req_s_median']:.2f}",
                     f"{r['warm_req_s_median']:.2f}", f"{r['warm_out_tok_s_median']:.0f}",
                     f"{r['cold_hit_rate']:.0%} / {r['warm_hit_rate']:.0%}",
                     f"{r['cold_cpu_s_median']:.1f} / {r['warm_cpu_s_median']:.1f}", f"{r['others_cores_median']:.2f}"])
    binary = peers.find_llama_server(args.llama_server)
    res["peer"] = peers.SKIPPED
    if binary:
        _log("[sixteen] llama-server -cb -np 16 (the peer)")
        import requests

        from sgl_jax.models.hub import resolve_model

        try:  # the peer failing leaves our figures standing; the table says why it has none
            r = peer_sixteen(binary, resolve_model(ENGINE["model"]), prefix, qs, args.repeats)
            res["peer"] = r
            rows.append([f"llama-server -cb -np 16, same GGUF (median of {args.repeats})",
                         f"{r['cold_req_s_median']:.2f}", f"{r['warm_req_s_median']:.2f}",
                         f"{r['warm_out_tok_s_median']:.0f}", f"{r['cold_hit_rate']:.0%} / {r['warm_hit_rate']:.0%}",
                         "-", "-"])
        except (RuntimeError, TimeoutError, requests.RequestException) as e:
            res["peer"] = "peer failed: " + " ".join(str(e).split())[-300:]
    res["table"] = _table(["system", "cold req/s", "warm req/s", "warm out tok/s", "hit rate cold / warm",
                           "CPU-s cold / warm", "others' cores"], rows)
    if isinstance(res["peer"], str):
        res["table"] += "\n" + res["peer"]
    return res


def peer_sixteen(binary: str, gguf: str, prefix: list[int], qs: list[list[int]], repeats: int) -> dict:
    """llama.cpp's `llama-server -cb -np 16` on the same GGUF and the same token ids as our engine's phases: per
    repeat a fresh server (its slots' prompt caches empty: the cold phase), the 16 cold prompts at once, then the
    16 warm ones; req/s, output tokens/s and its hit rate (its `timings`: cache_n of cache_n + prompt_n)."""
    import concurrent.futures

    import requests

    def burst(url: str, prompts: list[list[int]]) -> dict:
        def one(ids):
            body = {"prompt": ids, "n_predict": 64, "temperature": 0, "ignore_eos": True, "cache_prompt": True}
            r = requests.post(url + "/completion", json=body, timeout=900)
            r.raise_for_status()
            return r.json()["timings"]

        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as ex:
            t0 = time.perf_counter()
            tms = list(ex.map(one, prompts))
            wall = time.perf_counter() - t0
        cached, fresh = sum(t.get("cache_n", 0) for t in tms), sum(t["prompt_n"] for t in tms)
        return dict(req_s=len(prompts) / wall, out_tok_s=sum(t["predicted_n"] for t in tms) / wall,
                    hit_rate=cached / max(cached + fresh, 1))

    runs = []
    for i in range(repeats):
        with peers.LlamaServer(binary, gguf, ["-cb", "-np", 16, "-t", 2, "-c", 16 * 512]) as srv:
            cold = burst(srv.url, [prefix + q for q in qs[32 * i:32 * i + 16]])
            warm = burst(srv.url, [prefix + q for q in qs[32 * i + 16:32 * i + 32]])
        _log(f"    llama-server #{i}: cold {cold['req_s']:.2f} req/s (hit {cold['hit_rate']:.0%}), warm "
             f"{warm['req_s']:.2f} req/s (hit {warm['hit_rate']:.0%})")
        runs.append({"cold": cold, "warm": warm})
    return {"runs": runs, "cold_req_s_median": _med([r["cold"]["req_s"] for r in runs]),
            "warm_req_s_median": _med([r["warm"]["req_s"] for r in runs]),
            "warm_out_tok_s_median": _med([r["warm"]["out_tok_s"] for r in runs]),
            "cold_hit_rate": runs[-1]["cold"]["hit_rate"], "warm_hit_rate": runs[-1]["warm"]["hit_rate"]}


# ------------------------------------------------------------------------------- 3. multi-turn chat
def _conversations(tok, n_conv: int, turns: int, q_lo: int, q_hi: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    return [[user_message(rng, tok, q_lo, q_hi) for _ in range(turns)] for _ in range(n_conv)]


def run_multiturn(eng, probe, convs: list[list[str]], a_lo: int, a_hi: int, seed: int, label: str) -> dict:
    """Each conversation in its own thread (as SGLang's run_batch does): turn k+1 is sent when turn k's
    answer is back; the prompt is the chat template over the whole history."""
    tok = eng.tokenizer
    assert eng.flush_cache()
    probe.reset()
    rng = random.Random(seed)
    max_new = [[rng.randint(a_lo, a_hi) for _ in conv] for conv in convs]
    per_turn: list[list[dict]] = [[] for _ in convs]
    errors: list[BaseException] = []

    def one(ci: int):
        try:
            msgs: list[dict] = []
            for ti, user in enumerate(convs[ci]):
                msgs.append({"role": "user", "content": user})
                text = tok.apply_chat_template(msgs, add_generation_prompt=True)
                ids = tok.encode(text, add_special_tokens=False)
                out = eng.generate(input_ids=ids, sampling_params=dict(GREEDY, max_new_tokens=max_new[ci][ti]))
                m = out["meta_info"]
                if m["finish_reason"]["type"] == "abort":
                    raise RuntimeError(f"{label}: conversation {ci} turn {ti} aborted: {m['finish_reason']}")
                per_turn[ci].append(dict(turn=ti, prompt=m["prompt_tokens"], cached=m["cached_tokens"],
                                         completion=m["completion_tokens"], e2e=m["e2e_latency"],
                                         reusable=(per_turn[ci][-1]["prompt"] + per_turn[ci][-1]["completion"]
                                                   if per_turn[ci] else 0)))
                msgs.append({"role": "assistant", "content": out["text"]})
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    with Contention() as cont:
        t0 = time.perf_counter()
        ths = [threading.Thread(target=one, args=(i,)) for i in range(len(convs))]
        for t in ths:
            t.start()
        for t in ths:
            t.join()
        wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    flat = [x for c in per_turn for x in c]
    prompt_t, cached_t = sum(x["prompt"] for x in flat), sum(x["cached"] for x in flat)
    comp_t = sum(x["completion"] for x in flat)
    later = [x for x in flat if x["turn"] > 0]
    res = dict(label=label, requests=len(flat), wall_s=wall, req_s=len(flat) / wall, out_tok_s=comp_t / wall,
               prompt_tokens=prompt_t, cached_tokens=cached_t, completion_tokens=comp_t,
               hit_rate=cached_t / max(prompt_t, 1),
               hit_rate_turns_2plus=sum(x["cached"] for x in later) / max(sum(x["prompt"] for x in later), 1),
               reusable_share_turns_2plus=sum(x["reusable"] for x in later) / max(sum(x["prompt"] for x in later), 1),
               max_prompt_tokens=max(x["prompt"] for x in flat), mean_e2e_s=statistics.mean(x["e2e"] for x in flat),
               ours_cores=cont.ours_cores, others_cores=cont.others_cores, cpu_s=cont.ours_cores * wall,
               **step_summary(probe.records()))
    res["records"] = [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()} for r in probe.records()]
    _log(f"    {label:<28} {wall:7.2f} s  {res['req_s']:6.2f} req/s  {res['out_tok_s']:7.1f} out tok/s  "
         f"hit {res['hit_rate']:5.1%} (turns 2-4: {res['hit_rate_turns_2plus']:.1%} of "
         f"{res['reusable_share_turns_2plus']:.1%} reusable)  max prompt {res['max_prompt_tokens']}; "
         f"others used {res['others_cores']:.2f} cores")
    return res


def bench_multiturn(args) -> dict:
    # SGLang's benchmark/multi_turn_chat: 4 turns, questions 256-512 tokens, answers 4-8 (short) or
    # 256-512 (long). Scaled by 1/4 in length to fit max_context_len 1152 and the CPU time budget.
    shapes = {"short": (64, 128, 4, 8), "long": (64, 112, 48, 96)}
    n_conv, turns = args.conversations, 4
    res: dict = {"workload": f"{n_conv} conversations x {turns} turns, chat template, greedy, ignore_eos; "
                             "question/answer token ranges: " +
                             ", ".join(f"{k}: q {v[0]}-{v[1]}, a {v[2]}-{v[3]}" for k, v in shapes.items())}
    for mode in ("on", "off"):
        _log(f"[multiturn] radix {mode}")
        eng, probe = make_engine(disable_radix_cache=(mode == "off"))
        res[mode] = {}
        for name, (q_lo, q_hi, a_lo, a_hi) in shapes.items():
            convs = _conversations(eng.tokenizer, n_conv, turns, q_lo, q_hi, seed=10)
            res[mode][name] = run_multiturn(eng, probe, convs, a_lo, a_hi, seed=11, label=f"{name}, radix {mode}")
        eng.shutdown()
        del eng, probe
    rows = []
    for name in shapes:
        for mode in ("on", "off"):
            r = res[mode][name]
            rows.append([f"{name}, radix {mode}", r["req_s"], r["out_tok_s"], f"{r['hit_rate']:.1%}",
                         f"{r['hit_rate_turns_2plus']:.1%}", r["wall_s"], r["prefill_tokens"], r["steps"],
                         r["max_prompt_tokens"], f"{r['cpu_s']:.1f}", f"{r['others_cores']:.2f}"])
        res[f"speedup_{name}"] = res["on"][name]["req_s"] / res["off"][name]["req_s"]
        res[f"cpu_ratio_{name}"] = res["off"][name]["cpu_s"] / res["on"][name]["cpu_s"]
    res["table"] = _table(["shape, cache", "req/s", "out tok/s", "hit rate", "hit turns 2-4", "wall s",
                           "prefill tok", "steps", "max prompt", "CPU-s", "others' cores"], rows)
    res["table"] += "\n" + ", ".join(f"speedup {k}: {res[f'speedup_{k}']:.2f}x (CPU-s off/on "
                                      f"{res[f'cpu_ratio_{k}']:.2f}x)" for k in shapes)
    return res


# ------------------------------------------------------------------------ 4+5. decode at batch 32 and 64
DECODE_MODEL_KEYS = ("dtype", "quantization", "kv_dtype", "attention_math")  # what `--config` sets; ENGINE the rest


def _preset_model(path: str) -> dict:
    """The model settings (weights, KV pool, attention math) of a YAML preset, e.g. configs/smollm2-135m-int8.yaml;
    the shapes and the scheduler stay ENGINE's, so every engine of this bench compiles the same grid."""
    from sgl_jax.config import load_config

    engine = load_config(path).engine
    return {k: getattr(engine, k) for k in DECODE_MODEL_KEYS}


def _decode_case(eng, probe, fl, B: int, ctx: int, plen: int, new: int) -> tuple[dict, list, list, list]:
    """One batch size at one context: `B` distinct random prompts of `plen` tokens, `new` greedy tokens each; the
    steps with exactly B decode rows and no prefill against their floors; the last such step replayed (step_split).
    Returns the figures and the table rows (main, step split, host)."""
    from sgl_jax.shapes import StepShape

    mc = eng.model_config
    rng = random.Random(ctx * 1000 + B)
    prompts = [[rng.randrange(100, mc.vocab_size) for _ in range(plen)] for _ in range(B)]
    r = run_phase(eng, probe, prompts, dict(GREEDY, max_new_tokens=new), f"decode B={B} prompt {plen}", flush=True)
    dec = [x for x in probe.records() if x["nd"] == B and x["npf"] == 0]
    if not dec:
        raise RuntimeError(f"no pure batch-{B} decode step observed")
    mean_ctx = statistics.mean(x["mean_kv"] for x in dec)
    med = lambda k: _med([x[k] for x in dec])  # noqa: E731
    step, dev, host, sched, post, pack = (med(k) for k in ("step_s", "dev_s", "host_s", "sched_s", "post_s", "pack_s"))
    mem_s = (fl["weight_bytes"] + B * mean_ctx * fl["kv_bytes_per_token"]) / fl["copy_bw"]
    attn_flops = 4 * mean_ctx * mc.num_heads * mc.head_dim * mc.num_layers  # per token
    weights_s = B * mc.flops_per_token() / fl["gemm_weights"]
    cmp_s = weights_s + B * attn_flops / fl["gemm"]
    floor = max(mem_s, cmp_s)
    times = sorted(x["step_s"] for x in dec)
    d = dict(batch=B, ctx_target=ctx, prompt=plen, max_new=new, n_steps=len(dec), mean_ctx=mean_ctx,
             shapes=sorted({tuple(x["shape"]) for x in dec}),
             step_ms=1e3 * step, dev_ms=1e3 * dev, pack_ms=1e3 * pack, host_ms=1e3 * host,
             sched_ms=1e3 * sched, post_ms=1e3 * post, tok_s=B / step, tok_s_dev=B / dev,
             floor_mem_ms=1e3 * mem_s, floor_cmp_ms=1e3 * cmp_s, floor_weights_ms=1e3 * weights_s,
             floor_ms=1e3 * floor, efficiency=floor / step, efficiency_weights_only=max(mem_s, weights_s) / step,
             host_pct_of_step=100 * host / step, host_pct_of_dev=100 * host / dev,
             all_host_pct=100 * (pack + host) / dev, step_min_ms=1e3 * times[0],
             step_ms_p10_p90=[1e3 * times[len(dec) // 10], 1e3 * times[(9 * len(dec)) // 10]], phase=r)
    shape = tuple(dec[-1]["shape"])
    d["split"] = sp = step_split(eng, probe, StepShape(*shape), B)
    eng.flush_cache()
    _log(f"    step split at {shape}, {B} rows: full step {sp['full_step_ms']:.0f} ms = forward {sp['forward_ms']:.0f} "
         f"(attention {sp['attention_ms']:.0f}, rest {sp['forward_no_attention_ms']:.0f}) + sampling/logprobs "
         f"{sp['sampling_etc_ms']:.0f}")
    mm = lambda k: f"{sp[k + '_ms']:.0f} ({sp[k + '_min_ms']:.0f})"  # noqa: E731
    label = f"B={B} ctx~{mean_ctx:.0f}"
    main = [f"{label} ({len(dec)} steps, width {d['shapes'][0][2]})", f"{d['tok_s']:.0f}", f"{d['step_ms']:.1f}",
            f"{d['step_ms_p10_p90'][0]:.1f} / {d['step_min_ms']:.1f}", f"{d['floor_mem_ms']:.1f}",
            f"{d['floor_weights_ms']:.1f} + {d['floor_cmp_ms'] - d['floor_weights_ms']:.1f}",
            f"{d['efficiency']:.0%}", f"{floor / times[0]:.0%}", f"{d['efficiency_weights_only']:.0%}",
            f"{r['others_cores']:.2f}"]
    split = [f"{label} {shape}", mm("full_step"), mm("forward"), mm("attention"), mm("forward_no_attention"),
             mm("sampling_etc")]
    hrow = [label, f"{d['sched_ms']:.2f}", f"{d['post_ms']:.2f}", f"{d['host_ms']:.2f}", f"{d['step_ms']:.0f}",
            f"{d['host_pct_of_step']:.1f}%", f"{d['pack_ms']:.2f}", f"{d['all_host_pct']:.1f}%"]
    return d, main, split, hrow


def bench_decode(args) -> dict:
    """Served decode steps (the Engine, its scheduler and sampler) at each batch size and context beside their floor,
    measured in the same process: memory = (weights + the rows' keys and values) / copy bandwidth; compute = the
    weights' matmuls at the faster of numpy's float32 GEMM and (int8 weights) the int8 kernel's rate, plus the
    attention's own FLOPs (4 ctx H D L a row) at the float32 GEMM rate -- the floor issue 13's target (>= 60 % at
    batch 32 and 64, ctx ~512) was set against. The same floor without the attention's FLOPs is printed beside it."""
    sys.path.insert(0, HERE)
    import floors as floors_mod

    model = _preset_model(args.config)
    res: dict = {"config": args.config, "model": model}
    _log("[decode] floors (bench/floors.py, this process)")
    fl = floors_mod.measure_all(quick=True, log=_log)
    res["floors"] = fl
    import jax

    # one engine a KV pool dtype (--kv-dtypes; default the preset's), one after another in one process (each is shut
    # down before the next starts: three engines' compiled steps at once passed the host's memory-map limit)
    kv_dtypes = args.kv_dtypes or [model["kv_dtype"]]
    kv_bytes = {}
    rows, split_rows, hrows = [], [], []
    for kd in kv_dtypes:
        eng, probe = make_engine(decode_buckets=[16, 32, 64], **{**model, "kv_dtype": kd})
        f = dict(fl)
        f["weight_bytes"] = sum(x.nbytes for x in jax.tree_util.tree_leaves(eng.runner.params))
        int8 = any(x.dtype == "int8" for x in jax.tree_util.tree_leaves(eng.runner.params))
        f["gemm_weights"] = max(f["gemm"], floors_mod.int8_gemm_rate()) if int8 else f["gemm"]
        f["kv_bytes_per_token"] = kv_bytes[kd] = eng.model_config.kv_bytes_per_token(
            jax.tree_util.tree_leaves(eng.runner.kv)[0].dtype.itemsize)
        fl.update({k: v for k, v in f.items() if k not in fl})
        for B in args.batches:
            for ctx, (plen, new) in {128: (96, 64), 512: (448, 128)}.items():
                d, main, split, hrow = _decode_case(eng, probe, f, B, ctx, plen, new)
                if len(kv_dtypes) > 1:
                    d["kv_dtype"] = kd
                    for row in (main, split, hrow):
                        row[0] = f"{kd or model['dtype']} {row[0]}"
                res[f"b{B}_ctx{ctx}" + (f"_{kd}" if len(kv_dtypes) > 1 else "")] = d
                rows.append(main)
                split_rows.append(split)
                hrows.append(hrow)
        eng.shutdown()
    kv_note = " / ".join(f"{kv_bytes[kd] / 1e3:.1f} KB ({kd or model['dtype']})" for kd in kv_dtypes)
    res["table"] = (
        f"{os.path.basename(args.config)} ({', '.join(f'{k} {v}' for k, v in model.items() if v)}); floors: copy "
        f"{fl['copy_bw'] / 1e9:.1f} GB/s (read+write), GEMM f32 best {fl['gemm'] / 1e9:.0f} GFLOP/s, the weights' "
        f"matmuls at {fl['gemm_weights'] / 1e9:.0f} GOP/s; weights "
        f"{fl['weight_bytes'] / 1e6:.0f} MB, KV {kv_note} a token\n" +
        _table(["decode", "tok/s", "ms/step (median)", "p10 / min ms", "mem floor ms", "cmp floor ms (weights + attn)",
                "floor/median", "floor/min", "floor w/o attn FLOPs / median", "others' cores"], rows))
    res["table"] += ("\n\nstep split (replayed inputs of the last step with that many decode rows, interleaved; "
                     "median (min) of 8):\n" + _table(
        ["shape (decode, blocks, width)", "full step ms", "forward ms", "attention ms", "forward w/o attn ms",
         "sampling+logprobs ms"], split_rows))
    res["host_table"] = _table(["decode", "schedule ms", "postprocess ms", "host ms (engine.host_times)",
                                "step ms", "host % of step", "pack ms (in step_times)",
                                "(host+pack) % of compiled"], hrows)
    return res


# -------------------------------------------------------------------------------- 6. scheduler
def _sched_once(policy: str, n: int, steps: int, seed: int) -> dict:
    from sgl_jax.cache import PageAllocator, RadixCache
    from sgl_jax.scheduler import ReqState, Request, Scheduler, SchedulerConfig

    ps, n_prefixes, prefix_len, max_new = 16, 20, 512, 64
    rng = random.Random(seed)
    prefixes = [[rng.randrange(32000) for _ in range(prefix_len)] for _ in range(n_prefixes)]
    alloc = PageAllocator(n * (prefix_len + 60 + max_new) // ps + 4096)
    cache = RadixCache(alloc, ps)
    for p in prefixes:  # the system prompts are cached, as on a warm server
        k = len(p) // ps
        cache.insert(p[:k * ps], alloc.alloc(k))
    cfg = SchedulerConfig(page_size=ps, max_running=64, max_prefill_tokens=512, prefill_block=64,
                          max_prefill_blocks=8, max_mixed_blocks=1, max_context=4096, policy=policy)
    s = Scheduler(cache, cfg)
    st = {"order_s": 0.0, "order_calls": 0, "order_calls_full": 0}
    orig_order = s._order

    def timed_order():
        if len(s.running) >= cfg.max_running or not s.free_slots:
            st["order_calls_full"] += 1  # nothing can be admitted, yet the whole queue is ordered
        t0 = time.perf_counter()
        try:
            return orig_order()
        finally:
            st["order_s"] += time.perf_counter() - t0
            st["order_calls"] += 1
    s._order = timed_order
    for i in range(n):
        suffix = [rng.randrange(32000) for _ in range(rng.randrange(20, 61))]
        s.add(Request(rid=str(i), prompt_ids=prefixes[rng.randrange(n_prefixes)] + suffix, max_new_tokens=max_new))
    times = []
    gc.collect()
    with Contention() as cont:
        # driven like the engine, with a fake model (every sampled token is 7)
        for step in range(steps):
            t0 = time.perf_counter()
            plan = s.schedule()
            dt = time.perf_counter() - t0
            if plan is None:
                break
            if not times:
                st.update(order_s=0.0, order_calls=0, order_calls_full=0)  # per-step figures exclude step 1
            times.append(dt)
            s.on_step_done(plan)
            for c in plan.chunks:
                r = c.req
                if r.state is ReqState.RUNNING and c.samples:
                    r.output_ids.append(7)
                    if len(r.output_ids) >= r.max_new_tokens:
                        s.finish(r)
    k = max(len(times) - 1, 1)
    return dict(first_ms=1e3 * times[0], median_ms=1e3 * _med(times[1:]), max_ms=1e3 * max(times), steps=len(times),
                order_calls_per_step=st["order_calls"] / k, order_ms_per_step=1e3 * st["order_s"] / k,
                order_calls_with_no_free_slot_per_step=st["order_calls_full"] / k, running_at_end=len(s.running),
                others_cores=cont.others_cores)


def bench_scheduler(args) -> dict:
    res: dict = {"workload": "N waiting requests, each one of 20 shared 512-token prefixes (already cached) + a "
                             "distinct 20-60-token suffix, max_new_tokens 64; engine-like limits (64 running, "
                             f"512-token prefill budget, blocks of 64, page 16); {args.sched_steps} steps driven "
                             f"with a fake model; medians of {args.sched_repeats} repeats"}
    rows = []
    for policy in ("lpm", "dfs-weight", "fcfs"):
        for n in args.queue_sizes:
            reps = [_sched_once(policy, n, args.sched_steps, seed=n + i) for i in range(args.sched_repeats)]
            d = {k: _med([r[k] for r in reps]) for k in reps[0]}
            d["repeats"] = reps
            res[f"{policy}_{n}"] = d
            rows.append([policy, n, f"{d['first_ms']:.1f}", f"{d['median_ms']:.1f}",
                         f"{d['order_calls_per_step']:.2f}", f"{d['order_calls_with_no_free_slot_per_step']:.2f}",
                         f"{d['order_ms_per_step']:.1f}", f"{d['others_cores']:.2f}"])
            _log(f"    {policy:<10} waiting {n:5d}: first schedule() {d['first_ms']:8.1f} ms, median per step "
                 f"{d['median_ms']:8.1f} ms (_order {d['order_ms_per_step']:.1f} ms/step)")
    res["table"] = _table(["policy", "waiting", "first schedule() ms", "median schedule() ms/step",
                           "_order() calls/step", "of which with no free slot", "_order() ms/step",
                           "others' cores"], rows)
    return res


# ------------------------------------------------------------------------------------------ main
def _cpu_info() -> str:
    try:
        info = {}
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                info.setdefault(k.strip(), v.strip())
        flags = info.get("flags", "").split()
        return (f"{info.get('model name')} family {info.get('cpu family')} model {info.get('model')}, "
                f"{os.cpu_count()} CPUs, avx512f={'avx512f' in flags}, avx512_bf16={'avx512_bf16' in flags}")
    except OSError:
        return "unknown"


SUBCOMMANDS = {"shared-prefix": bench_shared_prefix, "sixteen": bench_sixteen, "multiturn": bench_multiturn,
               "decode": bench_decode, "scheduler": bench_scheduler}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("what", choices=list(SUBCOMMANDS) + ["sched", "all"])
    ap.add_argument("--json", help="write every figure to this file")
    ap.add_argument("--llama-server", help="sixteen: the peer's binary (default: bench/peers.py finds one; none: "
                                           "the peer is skipped)")
    ap.add_argument("--num-requests", type=int, default=64, help="shared-prefix: requests per phase")
    ap.add_argument("--prefix-tokens", type=int, default=1000, help="shared-prefix: few-shot prefix length")
    ap.add_argument("--skip-off-warm", action="store_true",
                    help="shared-prefix: run radix-off only cold (off does no reuse, so warm = cold work)")
    ap.add_argument("--repeats", type=int, default=3, help="sixteen: cold+warm pairs per engine (medians)")
    ap.add_argument("--with-off", action="store_true", help="sixteen: also run with the radix cache off")
    ap.add_argument("--conversations", type=int, default=8, help="multiturn: conversations")
    ap.add_argument("--queue-sizes", default="1000,5000", type=lambda s: [int(x) for x in s.split(",")],
                    help="scheduler: waiting-queue sizes")
    ap.add_argument("--sched-steps", type=int, default=100, help="scheduler: steps driven per configuration")
    ap.add_argument("--sched-repeats", type=int, default=3, help="scheduler: repeats per configuration (medians)")
    ap.add_argument("--batches", default="32,64", type=lambda s: [int(x) for x in s.split(",")],
                    help="decode: batch sizes (each at ctx ~128 and ~512)")
    ap.add_argument("--config", default=os.path.join(os.path.dirname(HERE), "configs", "smollm2-135m.yaml"),
                    help="decode: the preset whose model settings (dtype, quantization, KV dtype, attention math) "
                         "the engine takes, e.g. configs/smollm2-135m-int8.yaml")
    ap.add_argument("--kv-dtypes", type=lambda s: [x.strip() for x in s.split(",")], default=None,
                    help="decode: KV pool dtypes to run one after another in this process, beside the same floors "
                         "(e.g. float16,float8_e4m3fn; default: the preset's)")
    ap.add_argument("--quiet-wait", type=float, default=0.0,
                    help="before each timed phase wait up to this many seconds for other jobs to go quiet "
                         "(bench/floors.py wait_for_quiet); 0 = don't wait")
    args = ap.parse_args(argv)
    Contention.QUIET_WAIT_S = args.quiet_wait
    import jax

    import sgl_jax

    t_start = time.perf_counter()
    out = {"what": args.what, "engine_config": ENGINE, "cpus": os.cpu_count(), "jax": jax.__version__,
           "sgl_jax_path": os.path.dirname(sgl_jax.__file__), "argv": sys.argv[1:],
           "loadavg_start": os.getloadavg(), "cpu": _cpu_info()}
    todo = list(SUBCOMMANDS) if args.what == "all" else ["scheduler" if args.what == "sched" else args.what]
    for name in todo:
        t0 = time.perf_counter()
        out[name] = SUBCOMMANDS[name](args)
        out[name]["bench_wall_s"] = time.perf_counter() - t0
        _log(f"\n== {name} ({out[name]['bench_wall_s']:.0f} s) ==")
        if "workload" in out[name]:
            _log(out[name]["workload"])
        _log(out[name]["table"])
        if "host_table" in out[name]:
            _log("\nhost overhead (medians over the pure decode steps):")
            _log(out[name]["host_table"])
        _log("")
    out["wall_s"] = time.perf_counter() - t_start
    out["loadavg_end"] = os.getloadavg()
    _log(f"cpu: {out['cpu']}")
    _log(f"total {out['wall_s']:.0f} s; load average at start {out['loadavg_start'][0]:.2f}, end "
         f"{out['loadavg_end'][0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
