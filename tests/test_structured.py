"""Structured generation through the engine: on-device masks, FSM state advanced in the step, jump-forward."""

import json
import re

import jsonschema
import pytest

from sgl_jax.engine import Engine
from sgl_jax.errors import InvalidRequestError
from sgl_jax.models.testing import write_tiny_gguf
from test_engine import SMALL

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["x", "yz"]}, "maxItems": 2},
    },
    "required": ["name", "age", "ok", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    path = write_tiny_gguf("llama", str(tmp_path_factory.mktemp("tiny") / "tiny.gguf"))
    cfg = dict(SMALL, constraint_rows=1024, constraint_classes=320, constraint_slots=4)
    with Engine(model=path, progress=False, **cfg) as jf:
        # jump-forward is the scheduler's: the second engine's steps are the first's, loaded from the executable
        # store in the suite's cache once the first has compiled them (24 s of compiling, not 2 x 24 s at once)
        assert jf.wait_compiled(timeout=300)
        with Engine(model=path, progress=False, disable_jump_forward=True, **cfg) as nojf:
            yield jf, nojf


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_regex_outputs_match(engines, temperature):
    jf, nojf = engines
    # bounded languages, so even a random tiny model must reach an accepting end within max_new_tokens
    pats = [r"(cat|dog)s? [0-9]{2,3}", r"[a-c]{1,5}@[a-c]{1,3}\.(com|org)", r"\d{4}-\d{2}-\d{2}", r"(ab|c){0,4}d"]
    for eng in (jf, nojf):
        outs = eng.generate(input_ids=[[5, 6, 7]] * len(pats),
                            sampling_params=[{"regex": p, "temperature": temperature, "max_new_tokens": 40,
                                              "sampling_seed": 3} for p in pats])
        for p, o in zip(pats, outs):
            assert o["meta_info"]["finish_reason"]["type"] == "stop", o
            assert re.fullmatch(p, o["text"]), (p, o["text"])
        eng.check_integrity()
        eng.constraint_table.check_integrity()


def test_json_schema_valid_with_and_without_jump_forward(engines):
    jf, nojf = engines
    for eng in (jf, nojf):
        outs = eng.generate(input_ids=[[9, 10, 11]] * 4,
                            sampling_params={"json_schema": json.dumps(SCHEMA), "temperature": 1.0,
                                             "max_new_tokens": 80, "n": 1})
        for o in outs if isinstance(outs, list) else [outs]:
            doc = json.loads(o["text"])
            jsonschema.validate(doc, SCHEMA)
            assert 18 <= doc["age"] <= 99
    # the forced runs ('{"name":"', '","age":', ...) are appended without sampling when jump-forward is on
    a = jf.generate(input_ids=[9, 10, 11], sampling_params={"json_schema": SCHEMA, "temperature": 0,
                                                            "max_new_tokens": 80}, stream=True)
    events = list(a)
    sizes = [len(e["output_ids"]) for e in events]
    assert any(b - a > 1 for a, b in zip(sizes, sizes[1:])) or sizes[0] > 1, sizes  # multi-token jumps happened
    b = nojf.generate(input_ids=[9, 10, 11], sampling_params={"json_schema": SCHEMA, "temperature": 0,
                                                              "max_new_tokens": 80}, stream=True)
    sizes_b = [len(e["output_ids"]) for e in b]
    assert sizes_b == list(range(1, len(sizes_b) + 1))  # one token per step without jump-forward
    assert len(events) < len(sizes_b)


def test_jump_forward_keeps_the_last_token_unless_a_longer_one_could_span_the_boundary(engines):
    """The tiny tokenizer has the merge 'he' but no token longer than 'q' starting with 'q'."""
    jf, _ = engines

    def sizes(pattern):
        evs = list(jf.generate(input_ids=[5, 6], sampling_params={"regex": pattern, "temperature": 0,
                                                                   "max_new_tokens": 20}, stream=True))
        assert re.fullmatch(pattern, evs[-1]["text"]), evs[-1]["text"]
        return [len(e["output_ids"]) for e in evs]

    # 'x' or 'z' is sampled, then the forced 'qqqqq' is appended whole: 1 + 5 tokens in the first step
    assert sizes(r"(x|z)qqqqq(1|2)")[0] == 6
    # the sampled 'x' re-tokenizes to itself, so it keeps its logprob (and its KV); forced tokens have none
    o = jf.generate(input_ids=[5, 6], sampling_params={"regex": r"(x|z)qqqqq(1|2)", "temperature": 0,
                                                        "max_new_tokens": 20}, return_logprob=True)
    lps = [e[0] for e in o["meta_info"]["output_token_logprobs"]]
    assert lps[0] is not None and lps[1:6] == [None] * 5 and lps[6] is not None, lps
    # forced 'qqh': 'h' may merge with the following 'e' into 'he', so it is held back for the model
    assert sizes(r"(x|z)qqh(e|a)")[0] == 3
    # a forced start is appended before the first step (it joins the prompt's prefill): 'abc' + the sample
    assert sizes(r"abc(x|y)")[0] == 4


def test_constrained_and_free_in_one_batch(engines):
    jf, _ = engines
    free = jf.generate(input_ids=[20, 21, 22], sampling_params={"temperature": 0, "max_new_tokens": 10,
                                                               "ignore_eos": True})
    outs = jf.generate(input_ids=[[20, 21, 22], [20, 21, 22], [30, 31]],
                       sampling_params=[{"temperature": 0, "max_new_tokens": 10, "ignore_eos": True},
                                        {"regex": "(yes|no)", "temperature": 0, "max_new_tokens": 8},
                                        {"choices": ["red", "green", "blue"], "temperature": 0, "max_new_tokens": 8}])
    assert outs[0]["output_ids"] == free["output_ids"]
    assert outs[1]["text"] in ("yes", "no") and outs[2]["text"] in ("red", "green", "blue")


def test_invalid_constraints_rejected_by_name(engines):
    jf, _ = engines
    with pytest.raises(InvalidRequestError, match="regex"):
        jf.generate(input_ids=[5], sampling_params={"regex": "(?=x)a", "max_new_tokens": 4})
    with pytest.raises(InvalidRequestError, match="patternProperties"):
        jf.generate(input_ids=[5], sampling_params={"json_schema": {"type": "object", "patternProperties": {}},
                                                    "max_new_tokens": 4})
    with pytest.raises(InvalidRequestError, match="at most one"):
        jf.generate(input_ids=[5], sampling_params={"regex": "a", "choices": ["a"], "max_new_tokens": 4})


def test_constraint_slots_reused_without_recompile(engines):
    jf, _ = engines
    before = jf.runner.num_compiles
    for i in range(10):  # more distinct constraints than slots: placements are evicted and reused
        o = jf.generate(input_ids=[5, 6], sampling_params={"regex": f"x{{{i + 1}}}y", "temperature": 0, "max_new_tokens": 16})
        assert o["text"] == "x" * (i + 1) + "y"
    assert jf.runner.num_compiles == before
    jf.constraint_table.check_integrity()


def test_ebnf_grammar_backend(engines):
    """Recursive grammars go through llguidance's host masks and the same on-device apply path."""
    jf, nojf = engines
    grammar = 'root ::= list\nlist ::= "[" (item ("," item)*)? "]"\nitem ::= [0-9] | list'
    for eng in (jf, nojf):
        outs = eng.generate(input_ids=[[5, 6]] * 3, sampling_params={"ebnf": grammar, "temperature": 1.0,
                                                                  "max_new_tokens": 60, "sampling_seed": 5})
        for o in outs:
            if o["meta_info"]["finish_reason"]["type"] == "stop":
                json.loads(o["text"])  # a finished output is a nested list of digits
            assert re.fullmatch(r"[\[\],0-9]*", o["text"]), o["text"]
    fixed = jf.generate(input_ids=[5, 6], sampling_params={"ebnf": 'root ::= "hello world"', "temperature": 0,
                                                          "max_new_tokens": 20})
    assert fixed["text"] == "hello world"
    with pytest.raises(InvalidRequestError, match="ebnf"):
        jf.generate(input_ids=[5], sampling_params={"ebnf": "root ::= undefined_rule", "max_new_tokens": 4})


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_random_schemas_and_regexes_through_the_engine(engines, temperature):
    """Random schemas (test_constrained's generator) and regexes, decoded by the model with device masks."""
    import random

    from test_constrained import _validate, random_regex, random_schema

    jf, _ = engines
    rng = random.Random(17 + int(temperature))
    schemas = [{"type": "object", "properties": {"v": random_schema(rng, 2)}, "required": ["v"]}
               for _ in range(8)]
    outs = jf.generate(input_ids=[[5, 6]] * len(schemas),
                       sampling_params=[{"json_schema": s, "temperature": temperature, "max_new_tokens": 120,
                                         "sampling_seed": i} for i, s in enumerate(schemas)])
    for s, o in zip(schemas, outs):
        if o["meta_info"]["finish_reason"]["type"] == "stop":
            _validate(s, o["text"])
    assert sum(o["meta_info"]["finish_reason"]["type"] == "stop" for o in outs) >= len(outs) // 2
    pats = [random_regex(rng, 3) for _ in range(8)]
    outs = jf.generate(input_ids=[[7, 8]] * len(pats),
                       sampling_params=[{"regex": p, "temperature": temperature, "max_new_tokens": 60,
                                         "sampling_seed": i} for i, p in enumerate(pats)])
    for p, o in zip(pats, outs):
        if o["meta_info"]["finish_reason"]["type"] == "stop":
            assert re.fullmatch(p, o["text"], re.ASCII), (p, o["text"])
    jf.check_integrity()
    jf.constraint_table.check_integrity()


def _same(a, b, ids=True):
    key = lambda o: ((o["output_ids"] if ids else None), o["text"], o["meta_info"]["finish_reason"])  # noqa: E731
    return key(a) == key(b)


@pytest.mark.timeout(600)
def test_stops_and_penalties_inside_forced_runs_match_without_jump_forward(engines):
    """Every appended token, sampled or forced, takes the same finish and penalty path: outputs are
    identical with jump-forward on and off. The forced texts below contain no pair the tiny tokenizer
    merges, so both modes segment them into the same tokens and even the ids must agree."""
    jf, nojf = engines
    rx = r"(ab|cd)-XYZ-QVK-[0-9]{2,4}"
    z_id = jf.tokenizer.encode("Z", add_special_tokens=False)[0]
    cases = [
        {"stop": ["QVK"]},
        {"stop": ["QVK"], "no_stop_trim": True},
        {"stop_regex": [r"Q[A-Z]+"]},
        {"stop_token_ids": [z_id]},
        {"max_new_tokens": 13},  # exactly the shortest complete output: the budget rule and forced runs meet
        {"stop": ["XY"], "min_new_tokens": 12},  # "XY" completes before min_new_tokens: no stop there
    ]
    for extra in cases:
        sp = {"regex": rx, "temperature": 0, "max_new_tokens": 40, **extra}
        a = jf.generate(input_ids=[5, 6, 7], sampling_params=sp)
        b = nojf.generate(input_ids=[5, 6, 7], sampling_params=sp)
        assert _same(a, b), (extra, a, b)
        assert a["meta_info"]["finish_reason"]["type"] in ("stop", "length"), a
        assert a["meta_info"]["finish_reason"].get("matched") != 0
    out = jf.generate(input_ids=[5, 6, 7], sampling_params={"regex": rx, "temperature": 0, "max_new_tokens": 40,
                                                           "stop": ["QVK"]})
    assert out["text"].endswith("-XYZ-") and out["meta_info"]["finish_reason"]["matched"] == "QVK"
    # a forced run the tokenizer merges differently: the text and the finish reason still agree
    sp = {"regex": r"(cat|dog) is the capital of France\.[a-z]{2,6}", "temperature": 0, "max_new_tokens": 40,
          "stop": ["capital"]}
    a, b = jf.generate(input_ids=[5, 6, 7], sampling_params=sp), nojf.generate(input_ids=[5, 6, 7], sampling_params=sp)
    assert _same(a, b, ids=False) and a["text"].endswith(" is the "), (a, b)
    # penalties count forced tokens: free text after a forced run sees the same counts either way
    for pen in ({"frequency_penalty": 1.5}, {"presence_penalty": 1.2}, {"repetition_penalty": 1.8}):
        sp = {"regex": r"[a-e]{1,3}(abcde){3}[a-e]{6,10}", "temperature": 0, "max_new_tokens": 40, **pen}
        a = jf.generate(input_ids=[9, 10, 11], sampling_params=sp)
        b = nojf.generate(input_ids=[9, 10, 11], sampling_params=sp)
        assert _same(a, b), (pen, a["text"], b["text"])
        assert re.fullmatch(sp["regex"], a["text"]), a
    jf.check_integrity()
    nojf.check_integrity()


@pytest.mark.timeout(900)
def test_outputs_complete_within_tight_max_new_tokens(engines):
    """max_new_tokens at or just above the shortest complete output: at temperature 1 the (random) tiny model
    would wander off, but the budget rule keeps every output a full match, with and without jump-forward."""
    from sgl_jax.constrained import compile_json_schema, compile_regex

    jf, nojf = engines
    email = r"[a-z]+@[a-z]+\.(com|org)"
    need = compile_regex(email, jf.constraints.vocabulary()).min_tokens
    need_json = compile_json_schema(SCHEMA, jf.constraints.vocabulary()).min_tokens
    for eng in (jf, nojf):
        sps = [{"regex": email, "temperature": 1.0, "max_new_tokens": need + extra, "sampling_seed": seed}
               for extra in range(5) for seed in range(3)]
        outs = eng.generate(input_ids=[[5, 6, 7]] * len(sps), sampling_params=sps)
        for sp, o in zip(sps, outs):
            assert re.fullmatch(email, o["text"]), (sp, o["text"])
            assert len(o["output_ids"]) <= sp["max_new_tokens"]
        sps = [{"json_schema": json.dumps(SCHEMA), "temperature": 1.0, "max_new_tokens": need_json + extra,
                "sampling_seed": seed} for extra in (0, 1, 3, 8) for seed in range(2)]
        outs = eng.generate(input_ids=[[9, 10, 11]] * len(sps), sampling_params=sps)
        for sp, o in zip(sps, outs):
            jsonschema.validate(json.loads(o["text"]), SCHEMA)
            assert len(o["output_ids"]) <= sp["max_new_tokens"]
        eng.check_integrity()
        eng.constraint_table.check_integrity()


@pytest.mark.timeout(300)
def test_max_new_tokens_too_small_for_the_constraint_rejected_up_front(engines):
    from sgl_jax.constrained import compile_regex

    jf, _ = engines
    email = r"[a-z]+@[a-z]+\.(com|org)"
    need = compile_regex(email, jf.constraints.vocabulary()).min_tokens
    with pytest.raises(InvalidRequestError,
                       match=rf"max_new_tokens \({need - 1}\) is too small for the regex .* takes {need} tokens"):
        jf.generate(input_ids=[5], sampling_params={"regex": email, "max_new_tokens": need - 1})
    with pytest.raises(InvalidRequestError,
                       match=r"max_new_tokens \(2\) is too small for the choices constraint: .* takes \d+ tokens"):
        jf.validate(input_ids=[5], sampling_params={"choices": ["abcdefghij", "klmnopqrstu"], "max_new_tokens": 2})
    # the FSM compiled by the check is the one the engine loop uses (the cache is shared)
    hits = jf.constraints.cache.hits
    o = jf.generate(input_ids=[5], sampling_params={"regex": email, "max_new_tokens": need, "temperature": 0})
    assert re.fullmatch(email, o["text"]) and jf.constraints.cache.hits >= hits + 2
    # max_new_tokens 0 (prefill only) generates nothing and is not a budget error
    o = jf.generate(input_ids=[5], sampling_params={"regex": email, "max_new_tokens": 0})
    assert o["output_ids"] == []
