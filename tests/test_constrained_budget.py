"""Constrained outputs within max_new_tokens: the on-device budget rule against a numpy reference, and the
engine end to end (every output a complete match; budgets too small for any match rejected up front)."""

import json
import re

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest

from sgl_jax.constrained import DIST_UNREACHABLE, compile_json_schema, compile_regex
from sgl_jax.constrained.table import ConstraintTable
from sgl_jax.errors import InvalidRequestError
from sgl_jax.runner import NO_BUDGET, ConstraintBuffers, ModelRunner, _constrain, _put_cls, _put_rows
from test_constrained import JSON_TOKENS, synthetic_vocab

EMAIL = r"[a-z]+@[a-z]+\.(com|org)"
SMALL_SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                                 "ok": {"type": "boolean"}},
                "required": ["name", "ok"], "additionalProperties": False}


def _device_table(fsms, rows=384, classes=128, slots=3):
    """The runner's constraint buffers holding `fsms`, placed and uploaded the way the engine does it."""
    V = fsms[0].vocab_size
    runner = ModelRunner.__new__(ModelRunner)  # only the constraint-table part of the runner
    runner.cbuf = ConstraintBuffers(jnp.zeros((rows, -(-V // 32)), jnp.int32), jnp.full((rows, classes), -1, jnp.int32),
                                    jnp.zeros((slots, V), jnp.int32), jnp.full((rows,), DIST_UNREACHABLE, jnp.int32))
    runner._put_rows, runner._put_cls = jax.jit(_put_rows), jax.jit(_put_cls)
    table = ConstraintTable(rows, classes, slots)
    places = []
    for i, f in enumerate(fsms):
        p = table.acquire(i, f)
        runner.upload_constraint(p)
        places.append(p)
    return runner.cbuf, places


def _reference(fsm, state, budget):
    """numpy: the tokens allowed in `state` with `budget` new tokens left (this one included)."""
    nxt = fsm.next_state[state, fsm.token_class]
    ok = nxt >= 0
    ok[ok] = fsm.dist[nxt[ok]] <= budget - 1
    return ok


@pytest.mark.timeout(300)
def test_device_budget_rule_matches_numpy_reference():
    vocab, eos = synthetic_vocab(JSON_TOKENS)
    fsms = [compile_regex(EMAIL, vocab, eos), compile_regex(r"(?:ab|c){2,6}d(?:xx)?", vocab, eos),
            compile_json_schema(SMALL_SCHEMA, vocab, eos)]
    cb, places = _device_table(fsms)
    V, W = len(vocab), cb.mask.shape[1]
    f = jax.jit(lambda lg, cb, st, hm, ho, sl, bu: jnp.isfinite(_constrain(lg, cb, st, hm, ho, sl, bu)))
    rng = np.random.default_rng(0)
    L = 16
    host_row = rng.integers(-2 ** 31, 2 ** 31 - 1, W, dtype=np.int64).astype(np.int32)
    host_bits = np.unpackbits(host_row.view(np.uint8), bitorder="little")[:V].astype(bool)
    bound = 0
    for trial in range(30):
        state = np.full(L, -1, np.int32)
        slot = np.full(L, -1, np.int32)
        budget = np.full(L, NO_BUDGET, np.int32)
        host_on = np.zeros(L, bool)
        want = np.ones((L, V), bool)
        for i in range(L):
            kind = rng.integers(0, 6)
            if kind == 0:  # unconstrained (a budget on it means nothing)
                budget[i] = rng.integers(1, 5)
                continue
            if kind == 1:  # host mask row (grammar backend): the budget rule does not apply to it
                host_on[i], budget[i] = True, 1
                want[i] = host_bits
                continue
            k = int(rng.integers(0, len(fsms)))
            fsm, p = fsms[k], places[k]
            live = np.nonzero(fsm.dist < DIST_UNREACHABLE)[0]
            s = int(rng.choice(live))
            b = NO_BUDGET if kind == 2 else int(fsm.dist[s] + rng.integers(0, 3))  # binding or not
            b = max(b, 1)  # a sampling row always has at least the one token being sampled
            state[i], slot[i], budget[i] = p.base + s, p.slot, b
            want[i] = _reference(fsm, s, b)
            assert want[i].any(), "a row within its budget always keeps an allowed token"
            full = _reference(fsm, s, NO_BUDGET)
            bound += int((full & ~want[i]).any())
        logits = jnp.asarray(rng.standard_normal((L, V)), jnp.float32)
        hm = np.zeros((L, W), np.int32)
        hm[host_on] = host_row
        got = np.asarray(f(logits, cb, state, hm, host_on, slot, budget))
        np.testing.assert_array_equal(got, want, err_msg=f"trial {trial}")
        # without the budget arguments (or with no binding row) the result is the plain mask
        plain = np.asarray(jax.jit(lambda lg, cb, st, hm, ho: jnp.isfinite(_constrain(lg, cb, st, hm, ho)))(
            logits, cb, state, hm, host_on))
        loose = np.asarray(f(logits, cb, state, hm, host_on, slot, np.full(L, NO_BUDGET, np.int32)))
        np.testing.assert_array_equal(plain, loose)
        assert np.all(plain >= got)
    assert bound > 20  # the rule actually removed tokens in many rows


# ------------------------------------------------------------------------------------- engine end to end


@pytest.fixture(scope="module")
def smollm_engine(smollm2_gguf):
    from sgl_jax.engine import Engine

    # one decode bucket and one prefill bucket, compiled on first use: few shapes on 2 CPU cores
    with Engine(model=smollm2_gguf, progress=False, warmup=False, dtype="float32", page_size=16,
                max_context_len=256, max_running_requests=16, decode_buckets=[16], prefill_block=32,
                prefill_block_buckets=[4], max_mixed_blocks=0, page_width_buckets=[16], max_prefill_tokens=128,
                run_block_buckets=[], kv_memory_gb=0.05, constraint_rows=1024, constraint_classes=512,
                constraint_slots=4, compile_cache_dir="") as e:
        yield e


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_smollm2_outputs_complete_within_max_new_tokens(smollm_engine):
    """The issue's case: SmolLM2 at temperature 1 with 6..10 new tokens used to stop mid-address
    ('pythonyaml@tagname.'); now every output is a complete match, finished by EOS or at the budget."""
    eng = smollm_engine
    prompt = "Write a random email address:"
    sps = [{"regex": EMAIL, "temperature": 1.0, "max_new_tokens": n, "sampling_seed": seed}
           for n in range(6, 11) for seed in range(3)]
    outs = eng.generate(prompt=[prompt] * len(sps), sampling_params=sps)
    for sp, o in zip(sps, outs):
        assert re.fullmatch(EMAIL, o["text"]), (sp, o["text"])
        assert len(o["output_ids"]) <= sp["max_new_tokens"]
    # a small schema with a budget a few tokens above its minimum
    need = compile_json_schema(SMALL_SCHEMA, eng.constraints.vocabulary()).min_tokens
    sps = [{"json_schema": json.dumps(SMALL_SCHEMA), "temperature": 1.0, "max_new_tokens": need + extra,
            "sampling_seed": seed} for extra in (0, 2, 5) for seed in range(3)]
    outs = eng.generate(prompt=["A user record as JSON:"] * len(sps), sampling_params=sps)
    for sp, o in zip(sps, outs):
        jsonschema.validate(json.loads(o["text"]), SMALL_SCHEMA)
        assert len(o["output_ids"]) <= sp["max_new_tokens"]
    with pytest.raises(InvalidRequestError, match=rf"max_new_tokens \({need - 1}\).*json_schema.* {need} tokens"):
        eng.generate(prompt="x", sampling_params={"json_schema": SMALL_SCHEMA, "max_new_tokens": need - 1})
    eng.check_integrity()
    eng.constraint_table.check_integrity()
