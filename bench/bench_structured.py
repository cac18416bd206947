"""Structured generation benchmark: constraint compile time, on-device mask cost, jump-forward throughput.

Parts (select with --parts, default all):
  compile  compile time on the SmolLM2 vocabulary (49,152 tokens) of JSON schemas (5 and 10 fields), IPv4 /
           email / date regexes and 40 choices: sgl_jax.constrained vs outlines-core (Index over the regex; JSON
           via outlines_core.json_schema.build_regex_from_schema) vs llguidance (LLMatcher from its own
           JSON-schema / regex grammar; it compiles lazily, so "compile + first mask" and the mean per-token mask
           while replaying a valid text are reported too). Median of --repeats per input.
  mask     per-step cost of the on-device mask: the engine decodes batch 1 and batch 32 with every row
           constrained by a regex with a long free run ([a-z ]{600}: no jump-forward) vs unconstrained
           (ignore_eos), same number of decode steps; median step time each, difference in %.
  json     JSON decoding throughput, 16 chat-templated requests with a 10-field schema (many fixed keys), greedy,
           jump-forward on vs off (two engines, one after the other), plus unconstrained generation of the same
           number of tokens per request. Every output is validated with jsonschema.

The engine runs on 2 shared CPU cores are noisy: every engine table also reports hardware-independent counts
(steps, compiled rows = decode rows + run blocks x run_block + prefill blocks x prefill_block) and process CPU-seconds, which other load on
the machine disturbs much less than wall time. Recorded runs (figures in bench/notes.md, "Structured generation"):

  .venv/bin/python bench/bench_structured.py --parts compile,mask --repeats 5 --json OUT.json
  .venv/bin/python bench/bench_structured.py --parts json --repeats 3 --engine decode_buckets=1,8,16,32 \
      [--engine prefill_block=16 --engine prefill_block_buckets=1,2,4,8 --engine max_mixed_blocks=4] --json OUT.json
  .venv/bin/python bench/bench_structured.py --report OUT.json   # re-print a json part (or merge --modes runs)
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time

from sgl_jax.constrained.testing import USER_SCHEMA

# --------------------------------------------------------------------------------------------- inputs
SCHEMA5 = {
    "type": "object",
    "properties": {
        "full_name": {"type": "string", "maxLength": 32},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "editor", "viewer", "guest"]},
        "is_active": {"type": "boolean"},
        "date_joined": {"type": "string", "format": "date"},
    },
    "required": ["full_name", "age", "role", "is_active", "date_joined"],
    "additionalProperties": False,
}

SCHEMA10 = USER_SCHEMA  # 10 fields, a nested object, an array, enums, a date format, ranges, a pattern

OCTET = "(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
REGEXES = {
    "ipv4": rf"({OCTET}\.){{3}}{OCTET}",
    "email": r"[a-zA-Z0-9._%+-]+@[a-zA-Z0-9.-]+\.[a-zA-Z]{2,}",
    "date": r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])",
}

CHOICES40 = [
    "Alabama", "Alaska", "Arizona", "Arkansas", "California", "Colorado", "Connecticut", "Delaware", "Florida",
    "Georgia", "Hawaii", "Idaho", "Illinois", "Indiana", "Iowa", "Kansas", "Kentucky", "Louisiana", "Maine",
    "Maryland", "Massachusetts", "Michigan", "Minnesota", "Mississippi", "Missouri", "Montana", "Nebraska",
    "Nevada", "New Hampshire", "New Jersey", "New Mexico", "New York", "North Carolina", "North Dakota", "Ohio",
    "Oklahoma", "Oregon", "Pennsylvania", "Rhode Island", "South Carolina",
]
assert len(CHOICES40) == 40

# one valid text per input, replayed token by token for the per-token matcher cost
SAMPLES = {
    "json5": '{"full_name":"Alice Smith","age":34,"role":"editor","is_active":true,"date_joined":"2021-03-15"}',
    "json10": ('{"user_id":4821,"full_name":"Alice Smith","age":34,"role":"editor","is_active":true,'
               '"date_joined":"2021-03-15","home_address":{"street":"12 Oak Lane","city":"Springfield",'
               '"postal_code":"49503"},"tags":["photo","travel"],"rating":4,"country":"USA"}'),
    "ipv4": "192.168.10.254",
    "email": "john.doe+news@mail.example.org",
    "date": "2024-02-28",
    "choices40": "North Carolina",
}

PEOPLE = [("Maria Lopez", "Austin"), ("Kenji Watanabe", "Seattle"), ("Amara Okafor", "Toronto"),
          ("Lukas Becker", "Munich"), ("Sofia Rossi", "Lyon"), ("Omar Haddad", "Chicago"),
          ("Emily Clarke", "Leeds"), ("Diego Hernandez", "Monterrey"), ("Priya Nair", "Boston"),
          ("Jonas Nilsson", "Hamburg"), ("Chloe Martin", "Paris"), ("Ethan Brooks", "Denver"),
          ("Fatima Zahra", "Montreal"), ("Noah Fischer", "Berlin"), ("Grace Kim", "Vancouver"),
          ("Liam Walsh", "Manchester"), ("Ava Turner", "Portland"), ("Mateo Cruz", "Guadalajara"),
          ("Hannah Weber", "Cologne"), ("Yusuf Demir", "Houston"), ("Isla Murray", "Glasgow"),
          ("Lucas Moreau", "Nice"), ("Mia Johnson", "Atlanta"), ("Ravi Patel", "Calgary"),
          ("Zoe Adams", "Bristol"), ("Felix Braun", "Dresden"), ("Layla Hassan", "Dallas"),
          ("Oscar Lindqvist", "Ottawa"), ("Nora Schmidt", "Stuttgart"), ("Caleb Wright", "Phoenix"),
          ("Elena Petrova", "Marseille"), ("Samuel Green", "Puebla")]
TOPICS = ["the sea", "a lost key", "autumn leaves", "a robot", "the moon", "a small town", "coffee", "rain",
          "a library", "a train ride", "mountains", "a garden"]

ENGINE_KW = dict(decode_buckets=[1, 8, 32], prefill_block_buckets=[1, 2, 4], page_width_buckets=[32],
                 max_context_len=512, max_running_requests=32, progress=False)


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def table(title, header, rows):
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")
    sys.stdout.flush()


# ------------------------------------------------------------------------------------ part 1: compile
def part_compile(repeats: int) -> dict:
    """Compile time of each schema and regex, ours beside outlines-core and llguidance; long because it is one
    measurement script start to end."""
    import llguidance as llg
    import outlines_core as oc
    from outlines_core.json_schema import build_regex_from_schema

    from sgl_jax.constrained import (TokenVocabulary, advance, choices_to_regex, compile_choices,
                                     compile_json_schema, compile_regex)
    from sgl_jax.models.hub import resolve_model
    from sgl_jax.models.tokenizer import Tokenizer

    tk = Tokenizer.from_gguf(resolve_model("smollm2-135m"))
    tb = tk.token_bytes_list()
    eos = sorted(tk.stop_token_ids)
    eos_main = 2  # <|im_end|>, the chat EOS (0 = <|endoftext|> is the other stop id)
    prep = {}
    t = time.perf_counter()
    tv = TokenVocabulary(tb, eos)
    prep["sgl_jax"] = time.perf_counter() - t
    t = time.perf_counter()
    m: dict = {}
    for i, b in enumerate(tb):
        if b and i not in eos:
            m.setdefault(b, []).append(i)
    ocv = oc.Vocabulary(eos_main, m)
    prep["outlines_core"] = time.perf_counter() - t
    t = time.perf_counter()
    llt = llg.LLTokenizer(tk.backend.to_str(), eos_token=eos_main)
    prep["llguidance"] = time.perf_counter() - t
    log(f"vocab prep (one-time): {prep}")

    compact = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
    inputs = [("json5", "json", SCHEMA5), ("json10", "json", SCHEMA10)]
    inputs += [(k, "regex", v) for k, v in REGEXES.items()]
    inputs += [("choices40", "choices", CHOICES40)]

    def ours(kind, spec):
        if kind == "json":
            return compile_json_schema(spec, tv)
        if kind == "regex":
            return compile_regex(spec, tv)
        return compile_choices(spec, tv)

    def oc_regex(kind, spec):
        if kind == "json":
            return build_regex_from_schema(json.dumps(spec), "")  # compact, like ours
        if kind == "regex":
            return spec
        return choices_to_regex(spec)

    def llg_grammar(kind, spec):
        if kind == "json":
            return llg.LLMatcher.grammar_from_json_schema(spec, overrides=compact)
        if kind == "regex":
            return llg.LLMatcher.grammar_from_regex(spec)
        return llg.LLMatcher.grammar_from_regex(choices_to_regex(spec))

    results = {"vocab_prep_s": prep, "inputs": {}}
    rows = []
    for name, kind, spec in inputs:
        r: dict = {}
        toks = tk.encode(SAMPLES[name], add_special_tokens=False)
        # ours
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            fsm = ours(kind, spec)
            ts.append(time.perf_counter() - t)
        s = fsm.initial_state
        t = time.perf_counter()
        for tok in toks:
            s = advance(fsm, s, tok)
        host_us = (time.perf_counter() - t) / len(toks) * 1e6
        ok = s >= 0 and bool(fsm.accepting[s])
        r["sgl_jax"] = dict(compile_s=ts, median_s=med(ts), states=fsm.num_states, classes=fsm.num_classes,
                            sample_accepted=ok, per_token_host_us=host_us)
        # outlines-core
        ts = []
        try:
            for _ in range(repeats):
                t = time.perf_counter()
                rx = oc_regex(kind, spec)
                idx = oc.Index(rx, ocv)
                ts.append(time.perf_counter() - t)
            st = idx.get_initial_state()
            t = time.perf_counter()
            for tok in toks:
                idx.get_allowed_tokens(st)
                st = idx.get_next_state(st, tok)
                if st is None:
                    break
            oc_us = (time.perf_counter() - t) / len(toks) * 1e6
            r["outlines_core"] = dict(compile_s=ts, median_s=med(ts), sample_accepted=bool(
                st is not None and idx.is_final_state(st)), per_token_mask_us=oc_us,
                transitions=sum(len(v) for v in idx.get_transitions().values()))
        except Exception as e:  # noqa: BLE001 - report, keep going
            r["outlines_core"] = dict(error=f"{type(e).__name__}: {e}")
        # llguidance
        ts, ts_first = [], []
        try:
            for _ in range(repeats):
                t = time.perf_counter()
                g = llg_grammar(kind, spec)
                mt = llg.LLMatcher(llt, g, log_level=0)
                t1 = time.perf_counter()
                mt.compute_bitmask()
                t2 = time.perf_counter()
                if mt.is_error():
                    raise RuntimeError(mt.get_error())
                ts.append(t1 - t)
                ts_first.append(t2 - t)
            mt = llg.LLMatcher(llt, g, log_level=0)
            mask_ts = []
            for tok in toks:
                t = time.perf_counter()
                mt.compute_bitmask()
                mask_ts.append(time.perf_counter() - t)
                mt.consume_token(tok)
            mt.compute_bitmask()
            r["llguidance"] = dict(compile_s=ts, median_s=med(ts), first_mask_s=ts_first,
                                   median_first_mask_s=med(ts_first), per_token_mask_us=med(mask_ts) * 1e6,
                                   mean_token_mask_us=statistics.mean(mask_ts) * 1e6,
                                   sample_accepted=mt.is_accepting() and not mt.is_error())
        except Exception as e:  # noqa: BLE001
            r["llguidance"] = dict(error=f"{type(e).__name__}: {e}")
        r["sample_tokens"] = len(toks)
        results["inputs"][name] = r
        o, c, lg = r["sgl_jax"], r["outlines_core"], r["llguidance"]

        def ms(d, k="median_s"):
            return f"{d[k] * 1e3:.1f}" if k in d else d.get("error", "?")[:40]
        rows.append([name, f"{o['states']}/{o['classes']}", ms(o), ms(c), ms(lg), ms(lg, "median_first_mask_s"),
                     f"{lg.get('per_token_mask_us', float('nan')):.0f}",
                     f"{c.get('per_token_mask_us', float('nan')):.0f}",
                     "/".join("y" if d.get("sample_accepted") else "n" for d in (o, c, lg))])
        log(f"compile {name}: done")
    table(f"Compile time on the SmolLM2 vocab (V={tv.vocab_size}), median of {repeats}, ms "
          f"(one-time vocab prep: ours {prep['sgl_jax'] * 1e3:.0f} ms, outlines-core "
          f"{prep['outlines_core'] * 1e3:.0f} ms, llguidance {prep['llguidance'] * 1e3:.0f} ms)",
          ["input", "ours states/classes", "ours", "outlines-core", "llguidance compile",
           "llg compile+1st mask", "llg mask/token us", "oc allowed/token us", "sample ok (ours/oc/llg)"],
          rows)
    return results


# --------------------------------------------------------------------------------- engine helpers
def make_engine(**kw):
    from sgl_jax.engine import Engine

    t = time.perf_counter()
    eng = Engine(**{"model": "smollm2-135m", **ENGINE_KW, **kw})  # --engine model=PATH replaces the model
    # per-step record through the public step listener: compiled shape, real decode rows / prefill tokens
    eng.step_log = []
    run_q = eng.runner.run_block

    def on_step(info):
        plan, shape = info.plan, info.plan.shape
        eng.step_log.append((shape.num_decode, shape.num_blocks, len(plan.decodes),
                             sum(len(c.token_ids) for c in plan.prefills), len(plan.prefills),
                             shape.num_runs * run_q))
    eng.add_step_listener(on_step)
    log(f"engine up in {time.perf_counter() - t:.1f}s (load {eng.load_seconds:.1f}s, compile "
        f"{eng.compile_seconds:.1f}s) {kw}")
    costs = eng.scheduler.grid.costs
    if costs:  # step seconds timed at warm-up (decode_row_fill=auto sizes jump-forward steps by them)
        log("decode step ms by (decode rows x page width [+ run blocks]): " + ", ".join(
            f"{b}x{w}{f'+{r}r' if r else ''}: {1e3 * v:.1f}" for (b, w, r), v in sorted(costs.items())))
    return eng


def chat_ids(tk, text):
    return tk.encode(tk.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True),
                     add_special_tokens=False)


def timed_generate(eng, ids, sps, info=None):
    n0, s0, l0 = eng.num_steps, len(eng.step_times), len(eng.step_log)
    t, c = time.perf_counter(), time.process_time()
    outs = eng.generate(input_ids=ids, sampling_params=sps)
    wall = time.perf_counter() - t
    steps = eng.step_times[s0:] if len(eng.step_times) >= s0 else []
    if info is not None:
        info["cpu_s"] = time.process_time() - c  # all threads of the process: less sensitive to other load
        bq = eng.config.shapes.prefill_block
        sl = eng.step_log[l0:]
        info.update(device_s=sum(steps), host_s=sum(eng.host_times[s0:]),
                    steps_prefill_only=sum(1 for s in sl if s[0] == 0),
                    steps_mixed=sum(1 for s in sl if s[0] and s[1]),
                    steps_decode_only=sum(1 for s in sl if not s[1]),
                    rows_compiled=sum(s[0] + s[1] * bq + s[5] for s in sl),
                    rows_real=sum(s[2] + s[3] for s in sl), extend_chunks=sum(s[4] for s in sl))
    return outs, wall, eng.num_steps - n0, steps


# ---------------------------------------------------------------------------------- part 2: mask
def part_mask(repeats: int, steps: int) -> dict:
    free_rx = "[a-z ]{600}"  # long free run: no forced bytes, EOS impossible within the steps
    eng = make_engine()
    tk = eng.tokenizer
    res: dict = {"regex": free_rx, "decode_tokens": steps, "batches": {}}
    rows = []
    try:
        for bs in (1, 32):
            ids = [chat_ids(tk, f"Write a short story about {TOPICS[i % len(TOPICS)]} (#{i}).") for i in range(bs)]
            cons = {"regex": free_rx, "temperature": 0.0, "max_new_tokens": steps}
            free = {"temperature": 0.0, "max_new_tokens": steps, "ignore_eos": True}
            eng.generate(input_ids=ids, sampling_params=cons)  # warm: compiles + uploads the FSM
            eng.generate(input_ids=ids, sampling_params=free)
            per = {"constrained": [], "free": []}
            walls = {"constrained": [], "free": []}
            cpus = {"constrained": [], "free": []}
            for i in range(repeats):
                order = (("constrained", cons), ("free", free))
                for name, sp in (order if i % 2 == 0 else order[::-1]):  # alternate: drift hits both
                    eng.flush_cache()
                    info: dict = {}
                    outs, wall, nsteps, st = timed_generate(eng, ids, sp, info)
                    cpus[name].append(info["cpu_s"])
                    for o in outs:
                        assert o["meta_info"]["completion_tokens"] == steps, o["meta_info"]
                        if name == "constrained":
                            assert re.fullmatch("[a-z ]*", o["text"]), o["text"]
                    # decode steps only: drop the prefill steps at the start (every row samples once there)
                    dec = st[-(steps - 1):]
                    per[name].append(med(dec))
                    walls[name].append(wall)
            c, f = med(per["constrained"]), med(per["free"])
            res["batches"][bs] = dict(constrained_step_s=per["constrained"], free_step_s=per["free"],
                                      median_constrained_s=c, median_free_s=f, overhead_pct=(c - f) / f * 100,
                                      wall_constrained_s=walls["constrained"], wall_free_s=walls["free"])
            cm, fm = min(per["constrained"]), min(per["free"])
            cc, cf = med(cpus["constrained"]), med(cpus["free"])
            res["batches"][bs].update(min_constrained_s=cm, min_free_s=fm, overhead_pct_min=(cm - fm) / fm * 100,
                                      cpu_constrained_s=cpus["constrained"], cpu_free_s=cpus["free"],
                                      overhead_pct_cpu=(cc - cf) / cf * 100)
            rows.append([bs, f"{f * 1e3:.1f}", f"{c * 1e3:.1f}", f"{(c - f) * 1e3:+.2f}", f"{(c - f) / f * 100:+.1f}%",
                         f"{(cm - fm) / fm * 100:+.1f}%", f"{(cc - cf) / cf * 100:+.1f}%",
                         " ".join(f"{x * 1e3:.1f}" for x in per["free"]),
                         " ".join(f"{x * 1e3:.1f}" for x in per["constrained"])])
            log(f"mask batch {bs}: done")
    finally:
        eng.shutdown()
    res["isolated"] = iso = isolated_mask_cost()
    for bs, r in iso.items():
        rows.append([f"{bs} (isolated _constrain, min of {300} calls)", "", "", f"+{r * 1e3:.3f}",
                     f"+{r / res['batches'][bs]['min_free_s'] * 100:.2f}% of the fastest free step", "", "", "", ""])
    table(f"On-device mask cost per decode step (regex {free_rx}, {steps} greedy tokens/row, all rows constrained; "
          f"median over runs of the per-run median decode step)",
          ["batch", "free ms", "constrained ms", "diff ms", "diff %", "diff % (min of runs)",
           "diff % (process CPU-s per run)", "free runs", "constrained runs"], rows)
    return res


def isolated_mask_cost(iters: int = 300) -> dict:
    """The mask alone: sgl_jax.runner._constrain jitted on [B, V] logits with the default-size table (median of
    `iters` interleaved calls, minus a jitted baseline (argmax of the unmasked logits))."""
    import inspect

    import jax
    import jax.numpy as jnp
    import numpy as np

    from sgl_jax.config import EngineConfig
    from sgl_jax.runner import ConstraintBuffers, _constrain

    c = EngineConfig().constraints
    V = 49152
    W = -(-V // 32)
    rng = np.random.default_rng(0)
    cb = ConstraintBuffers(jnp.asarray(rng.integers(-2**31, 2**31 - 1, (c.constraint_rows, W), dtype=np.int32)),
                           jnp.full((c.constraint_rows, c.constraint_classes), -1, jnp.int32),
                           jnp.zeros((c.constraint_slots, V), jnp.int32),
                           jnp.zeros((c.constraint_rows,), jnp.int32))
    nparams = len(inspect.signature(_constrain).parameters)
    out = {}
    for bs in (1, 32):
        logits = jnp.asarray(rng.standard_normal((bs, V), dtype=np.float32))
        state = jnp.asarray(rng.integers(0, 600, bs, dtype=np.int32))
        extra = () if nparams == 3 else (jnp.zeros((bs, W), jnp.int32), jnp.zeros((bs,), bool))
        f = jax.jit(lambda lg, cb, st, *e: jnp.argmax(_constrain(lg, cb, st, *e), axis=-1))
        g = jax.jit(lambda lg, cb, st, *e: jnp.argmax(lg, axis=-1))
        xs = {"mask": [], "base": []}
        for fn in (f, g):
            fn(logits, cb, state, *extra).block_until_ready()
        for _ in range(iters):  # interleaved, min of many calls: robust to other load on the shared cores
            for name, fn in (("mask", f), ("base", g)):
                t = time.perf_counter()
                fn(logits, cb, state, *extra).block_until_ready()
                xs[name].append(time.perf_counter() - t)
        ts = {k: (min(v), med(v)) for k, v in xs.items()}
        out[bs] = max(ts["mask"][0] - ts["base"][0], 0.0)
        log(f"isolated mask batch {bs}: (min, median) s {ts}")
    return out


# ---------------------------------------------------------------------------------- part 3: json
def _run_batch(eng, ids, sps, validator, repeats, label):
    """`repeats` timed runs of the whole batch (radix cache flushed before each); per-run figures."""
    runs = []
    outs = None
    for _ in range(repeats):
        eng.flush_cache()
        info: dict = {}
        outs, wall, nsteps, st = timed_generate(eng, ids, sps, info)
        bad = []
        if validator is not None:
            for o in outs:
                try:
                    validator.validate(json.loads(o["text"]))
                except Exception as e:  # noqa: BLE001 - counted and reported
                    bad.append((o["text"], o["meta_info"]["finish_reason"], repr(e)[:200]))
        toks = [o["meta_info"]["completion_tokens"] for o in outs]
        forced = [o["meta_info"]["forced_tokens"] for o in outs]
        runs.append(dict(wall_s=wall, steps=nsteps, completion_tokens=sum(toks), forced_tokens=sum(forced),
                         invalid=len(bad), invalid_examples=bad[:3], step_s_median=med(st), **info))
        log(f"  run {label}: {runs[-1]}")
    return runs, outs


def _run_seq(eng, ids, sps, validator, label):
    """The same requests one at a time (batch 1: the latency-bound regime)."""
    t, c = time.perf_counter(), time.process_time()
    n0, l0, agg = eng.num_steps, len(eng.step_log), {"invalid": 0, "completion_tokens": 0, "forced_tokens": 0}
    s0 = len(eng.step_times)
    eng.flush_cache()
    for i, sp in zip(ids, sps):
        o = eng.generate(input_ids=i, sampling_params=sp)
        agg["completion_tokens"] += o["meta_info"]["completion_tokens"]
        agg["forced_tokens"] += o["meta_info"]["forced_tokens"]
        if validator is not None:
            try:
                validator.validate(json.loads(o["text"]))
            except Exception:  # noqa: BLE001
                agg["invalid"] += 1
    wall = time.perf_counter() - t
    bq = eng.config.shapes.prefill_block
    sl = eng.step_log[l0:]
    by_shape: dict = {}  # "decode rows/prefill blocks/run rows" -> [steps, seconds]: where the time goes
    for x, dt in zip(sl, eng.step_times[s0:]):
        e = by_shape.setdefault(f"{x[0]}/{x[1]}/{x[5]}", [0, 0.0])
        e[0] += 1
        e[1] += dt
    r = dict(wall_s=wall, cpu_s=time.process_time() - c, steps=eng.num_steps - n0,
             rows_compiled=sum(x[0] + x[1] * bq + x[5] for x in sl), by_shape=by_shape, **agg)
    log(f"  seq {label}: {r}")
    return r


def _summ(runs, n_req):
    w = med([r["wall_s"] for r in runs])
    last = runs[-1]
    ctoks = last["completion_tokens"]
    return dict(runs=runs, median_wall_s=w, median_cpu_s=med([r["cpu_s"] for r in runs]),
                outputs_per_s=n_req / w, tokens_per_s=ctoks / w,
                completion_tokens=ctoks, forced_fraction=last["forced_tokens"] / max(ctoks, 1),
                steps=med([r["steps"] for r in runs]), rows_compiled=med([r["rows_compiled"] for r in runs]),
                invalid=sum(r["invalid"] for r in runs))


def part_json(repeats: int, n_req: int, max_new: int, extra: dict,
              modes=("jump_forward", "no_jump_forward"), n_seq: int = 4) -> dict:
    """Both engines are started one after the other and kept alive; the timed runs then alternate between them
    (JF, no-JF, unconstrained on the no-JF engine, repeated) so that drifting load from other processes on the
    shared CPU hits every mode alike."""
    import jsonschema

    schema = SCHEMA10
    res: dict = {"n_requests": n_req, "max_new_tokens": max_new, "engine_overrides": extra, "n_seq": n_seq,
                 "modes": {}, "texts": {}}
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    texts = [f"Create a JSON user record for {n}, who lives in {c}. Fields: user_id, full_name, age, role, "
             f"is_active, date_joined, home_address (street, city, postal_code), tags, rating, country."
             for n, c in PEOPLE[:n_req]]
    sp = {"json_schema": json.dumps(schema), "temperature": 0.0, "max_new_tokens": max_new}
    engines = {}
    try:
        for mode, jf_off in (("jump_forward", False), ("no_jump_forward", True)):
            if mode in modes:
                engines[mode] = make_engine(disable_jump_forward=jf_off, **extra)
        tk = next(iter(engines.values())).tokenizer
        ids = [chat_ids(tk, t) for t in texts]
        first, outs_of = {}, {}
        for mode, eng in engines.items():
            t = time.perf_counter()
            eng.generate(input_ids=ids[:1], sampling_params=sp)  # compiles the schema (cached afterwards)
            first[mode] = time.perf_counter() - t
            if mode == "no_jump_forward":  # its per-request token counts drive the unconstrained runs
                _, outs_of[mode] = _run_batch(eng, ids, sp, validator, 1, mode + " (untimed)")
        jobs = [(m, e, sp, validator) for m, e in engines.items()]
        if "no_jump_forward" in engines:
            # unconstrained generation of exactly the same number of tokens per request
            matched = [o["meta_info"]["completion_tokens"] for o in outs_of["no_jump_forward"]]
            sps_u = [{"temperature": 0.0, "max_new_tokens": n, "ignore_eos": True} for n in matched]
            jobs.append(("unconstrained", engines["no_jump_forward"], sps_u, None))
        runs = {j[0]: [] for j in jobs}
        outs = {}
        for i in range(repeats):
            for mode, eng, sps, val in (jobs if i % 2 == 0 else jobs[::-1]):
                r, outs[mode] = _run_batch(eng, ids, sps, val, 1, mode)
                runs[mode] += r
        for mode, eng, sps, val in jobs:
            m = res["modes"][mode] = _summ(runs[mode], n_req)
            m["first_request_s"] = first.get(mode)
            if val is not None:
                res["texts"][mode] = [o["text"] for o in outs[mode]]
            if n_seq:
                m["seq"] = _run_seq(eng, ids[:n_seq], sps[:n_seq] if isinstance(sps, list) else [sps] * n_seq,
                                    val, mode)
            log(f"json {mode}: {m['median_wall_s']:.1f}s, {m['completion_tokens']} tokens, {m['steps']} steps, "
                f"invalid {m['invalid']}")
    finally:
        for eng in engines.values():
            eng.shutdown()
    report_json(res)
    return res


def report_json(res: dict) -> None:
    modes = res["modes"]
    if "jump_forward" not in modes or "no_jump_forward" not in modes:
        return
    n_req = res["n_requests"]
    a, b = res["texts"]["jump_forward"], res["texts"]["no_jump_forward"]
    same = sum(x == y for x, y in zip(a, b))
    base = modes["no_jump_forward"]
    rows = []
    for mode in ("jump_forward", "no_jump_forward", "unconstrained"):
        m = modes.get(mode)
        if m is None:
            continue
        runs = " ".join(f"{r['wall_s']:.1f}" for r in m["runs"])
        rows.append([mode, f"{m['median_wall_s']:.1f}", runs, f"{m['outputs_per_s']:.2f}",
                     f"{m['tokens_per_s']:.1f}", f"{m['median_cpu_s']:.0f}", m["completion_tokens"], m["steps"],
                     m["rows_compiled"], f"{m['forced_fraction'] * 100:.0f}%",
                     f"{m['outputs_per_s'] / base['outputs_per_s']:.2f}x",
                     f"{base['median_cpu_s'] / m['median_cpu_s']:.2f}x",
                     f"{base['steps'] / m['steps']:.2f}x", m["invalid"]])
    res["speedup_jf_wall"] = modes["jump_forward"]["outputs_per_s"] / base["outputs_per_s"]
    res["speedup_jf_steps"] = base["steps"] / modes["jump_forward"]["steps"]
    res["speedup_jf_cpu"] = base["median_cpu_s"] / modes["jump_forward"]["median_cpu_s"]
    res["identical_outputs_jf_vs_nojf"] = same
    table(f"JSON decoding, {n_req} concurrent requests, 10-field schema, greedy, {len(base['runs'])} timed runs "
          f"(median wall), engine overrides {res['engine_overrides']}; {same}/{n_req} outputs identical "
          f"with/without jump-forward",
          ["mode", "wall s", "runs s", "outputs/s", "tokens/s", "CPU s", "completion tokens", "steps",
           "compiled rows", "forced tokens", "outputs/s vs no-JF", "CPU-s vs no-JF", "steps vs no-JF", "invalid"],
          rows)
    if all("seq" in m for m in modes.values()):
        rows = []
        bs = base["seq"]
        for mode in ("jump_forward", "no_jump_forward", "unconstrained"):
            q = modes[mode]["seq"]
            rows.append([mode, f"{q['wall_s']:.1f}", f"{q['cpu_s']:.0f}", f"{res['n_seq'] / q['wall_s']:.3f}",
                         q["completion_tokens"], q["steps"], q["rows_compiled"],
                         f"{q['forced_tokens'] / max(q['completion_tokens'], 1) * 100:.0f}%",
                         f"{bs['wall_s'] / q['wall_s']:.2f}x", f"{bs['steps'] / q['steps']:.2f}x", q["invalid"]])
        table(f"Same schema, first {res['n_seq']} requests one at a time (batch 1), one run",
              ["mode", "wall s", "CPU s", "outputs/s", "completion tokens", "steps", "compiled rows", "forced tokens",
               "speed vs no-JF", "steps vs no-JF", "invalid"], rows)
    print("\nexample output (jump-forward):", a[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="compile,mask,json")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mask-steps", type=int, default=48, help="decode tokens per row in the mask part")
    ap.add_argument("--n-requests", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=320)
    ap.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE",
                    help="EngineConfig override for the json part (e.g. prefill_block=16); repeatable")
    ap.add_argument("--modes", default="jump_forward,no_jump_forward", help="json part: which engines to run")
    ap.add_argument("--seq", type=int, default=4, help="json part: also run this many requests one at a time")
    ap.add_argument("--report", nargs="*", default=[], help="merge the json parts of these --json files (one per "
                    "mode, same settings) and print the table")
    ap.add_argument("--json", default=None, help="write all figures to this JSON file")
    a = ap.parse_args()
    from sgl_jax.config import leaf_fields, parse_value
    fields = leaf_fields()  # every engine key by its flat name (section keys included) -> (section, field, type)
    extra = {}
    for kv in a.engine:
        k, _, v = kv.partition("=")
        if k not in fields:
            ap.error(f"--engine {kv!r}: unknown engine key {k!r}; known: {', '.join(sorted(fields))}")
        extra[k] = parse_value(v, fields[k][2])
    out = {"argv": sys.argv}
    parts = a.parts.split(",") if not a.report else []
    if "compile" in parts:
        out["compile"] = part_compile(a.repeats)
    if "mask" in parts:
        out["mask"] = part_mask(a.repeats, a.mask_steps)
    if "json" in parts:
        out["json"] = part_json(a.repeats, a.n_requests, a.max_new_tokens, extra, tuple(a.modes.split(",")),
                                a.seq)
    if a.report:
        merged = None
        for path in a.report:
            with open(path) as f:
                r = json.load(f)["json"]
            if merged is None:
                merged = r
            else:
                merged["modes"].update(r["modes"])
                merged["texts"].update(r["texts"])
        report_json(merged)
        out["json"] = merged
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    main()
