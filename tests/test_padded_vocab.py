"""Model vocabulary vs tokenizer vocabulary, and logit_bias limits, on a tiny padded-vocabulary model.

The model's embedding has 384 rows, its tokenizer 300 tokens (as Qwen2/Qwen3 pad to a multiple of 128), and
the padding rows are scaled so that, unmasked, they would take nearly all the probability mass: any leak of a
padding id into sampling or top logprobs shows. Every expectation is computed independently with numpy from
the raw logits of a plain forward pass (tests/helpers.PagedRunner).
"""

import numpy as np
import pytest

from helpers import PagedRunner
from sgl_jax.config import ConfigError, EngineConfig, build
from sgl_jax.engine import Engine
from sgl_jax.errors import InvalidRequestError
from sgl_jax.models.loader import ModelLoadError, load_model, load_weights
from sgl_jax.models.testing import TINY_TOKENIZER_VOCAB, write_tiny_gguf, write_tiny_padded_gguf
from test_engine import SMALL

V_TOK = TINY_TOKENIZER_VOCAB  # 300
EOS = 299
CFG = dict(SMALL, decode_row_fill="fit", constraint_rows=1024, constraint_classes=320, constraint_slots=4,
           warmup=False)  # only the shapes the tests reach compile (warmup has tests of its own)


@pytest.fixture(scope="module")
def padded_path(tmp_path_factory):
    return write_tiny_padded_gguf("llama", str(tmp_path_factory.mktemp("padded") / "padded.gguf"))


@pytest.fixture(scope="module")
def engine(padded_path):
    with Engine(model=padded_path, progress=False, **CFG) as e:
        yield e


@pytest.fixture(scope="module")
def reference(padded_path):
    cfg, params = load_weights(padded_path, progress=False)
    return cfg, params


def ref_decode(reference, prompt, n, bias=(), suppress=(), suppress_steps=0):
    """Greedy decode in numpy over the tokenizer's ids: raw logits[:300] + bias, stop ids -inf for the first
    `suppress_steps` tokens. Returns (tokens, per-step log-softmax rows [n, 300], prompt log-softmax rows)."""
    cfg, params = reference
    assert len(prompt) <= 32 and len(prompt) + n <= 64, "the padding below is for prompts of 32, sequences of 64"
    # one compiled shape for every prompt and one for every decode step (padding is masked: the same logits)
    runner = PagedRunner(cfg, params, num_pages=64, page_size=4, block_q=8, nan_fill=False, page_width=16,
                         prefill_blocks=4)
    (logits,) = runner.step([(0, list(prompt), 0, 0)], num_logits=32)
    prompt_lp = [_log_softmax(row[:V_TOK].astype(np.float64)) for row in logits[:-1]]
    toks, lps, row, pos = [], [], logits[-1], len(prompt)
    for i in range(n):
        x = row[:V_TOK].astype(np.float64)
        for t, b in bias:
            x[t] += b
        if i < suppress_steps:
            x[list(suppress)] = -np.inf
        lp = _log_softmax(x)
        toks.append(int(np.argmax(lp)))
        lps.append(lp)
        (logits,) = runner.step([(0, [toks[-1]], pos, None)])
        row, pos = logits[-1], pos + 1
    return toks, np.array(lps), prompt_lp


def _log_softmax(x):
    m = np.max(x)
    return x - (m + np.log(np.sum(np.exp(x - m))))


def _prompts(k, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 297, int(rng.integers(3, 30))).tolist() for _ in range(k)]


# ------------------------------------------------------------------------------------------ loading
@pytest.mark.timeout(120)
def test_loading_agrees_on_the_tokenizer_vocabulary(padded_path, reference, tmp_path):
    m = load_model(padded_path, progress=False)
    assert m.config.vocab_size == 384 and m.vocab_size == m.tokenizer.vocab_size == V_TOK
    cfg, params = reference
    # the precondition that makes the other tests meaningful: unmasked, a padding id wins every time
    runner = PagedRunner(cfg, params, num_pages=64, page_size=4, block_q=8, nan_fill=False)
    for i, p in enumerate(_prompts(4, seed=0)):
        (logits,) = runner.step([(i, p, 0, None)])
        assert int(np.argmax(logits[-1])) >= V_TOK
    # a tokenizer larger than the model's embedding is a load error naming both sizes
    small = write_tiny_gguf("llama", str(tmp_path / "small.gguf"), vocab_size=256)
    with pytest.raises(ModelLoadError, match=r"300 tokens.*256 rows"):
        load_model(small, progress=False)


# --------------------------------------------------------------------------------- padding masked
@pytest.mark.timeout(900)
def test_greedy_never_samples_padding_and_matches_reference(engine, reference):
    ps = _prompts(3, seed=1)
    outs = engine.generate(input_ids=ps, sampling_params={"temperature": 0, "max_new_tokens": 8, "ignore_eos": True})
    for p, o in zip(ps, outs):
        want, _, _ = ref_decode(reference, p, 8)
        assert o["output_ids"] == want
        assert max(o["output_ids"]) < V_TOK
    engine.check_integrity()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("extra", [{}, {"top_k": 5}, {"top_p": 0.9}, {"min_p": 0.05}])
def test_temperature_one_never_samples_padding(engine, extra):
    ps = _prompts(4, seed=2)
    outs = engine.generate(input_ids=ps, sampling_params=[
        {"temperature": 1.0, "max_new_tokens": 16, "ignore_eos": True, "sampling_seed": 11 + i, **extra}
        for i in range(len(ps))])
    for o in outs:
        assert len(o["output_ids"]) == 16 and max(o["output_ids"]) < V_TOK, o["output_ids"]
        o["text"].encode()  # the detokenizer took every id


@pytest.mark.timeout(600)
def test_top_logprobs_exclude_padding_and_normalise_over_the_tokenizer(engine, reference):
    p = _prompts(1, seed=3)[0]
    out = engine.generate(input_ids=p, sampling_params={"temperature": 0, "max_new_tokens": 3, "ignore_eos": True},
                          return_logprob=True, logprob_start_len=0, top_logprobs_num=5)
    m = out["meta_info"]
    toks, lps, prompt_lp = ref_decode(reference, p, 3)
    assert out["output_ids"] == toks
    for j, entry in enumerate(m["output_top_logprobs"]):
        assert [t[1] for t in entry] == list(np.argsort(-lps[j], kind="stable")[:5])
        np.testing.assert_allclose([t[0] for t in entry], np.sort(lps[j])[::-1][:5], atol=1e-4)
        assert m["output_token_logprobs"][j][0] == pytest.approx(lps[j][toks[j]], abs=1e-4)
    for i, entry in enumerate(m["input_top_logprobs"][1:]):
        ids = [t[1] for t in entry]
        assert max(ids) < V_TOK and ids == list(np.argsort(-prompt_lp[i], kind="stable")[:5])
        assert m["input_token_logprobs"][i + 1][0] == pytest.approx(prompt_lp[i][p[i + 1]], abs=1e-4)


@pytest.mark.timeout(600)
def test_request_ids_checked_against_the_tokenizer_vocabulary(engine):
    for bad in (V_TOK, 383):
        with pytest.raises(InvalidRequestError, match=rf"'input_ids'\[1\] is {bad}.*\[0, 300\)"):
            engine.generate(input_ids=[5, bad, 6], sampling_params={"max_new_tokens": 1})
        with pytest.raises(InvalidRequestError, match=r"logit_bias.*\[0, 300\)"):
            engine.validate(input_ids=[5], sampling_params={"logit_bias": {str(bad): 10.0}})
        with pytest.raises(InvalidRequestError, match=r"stop_token_ids\[0\].*\[0, 300\)"):
            engine.validate(input_ids=[5], sampling_params={"stop_token_ids": [bad]})
    engine.validate(input_ids=[5, V_TOK - 1], sampling_params={"logit_bias": {str(V_TOK - 1): 1.0},
                                                                "stop_token_ids": [V_TOK - 1], "max_new_tokens": 1})


@pytest.mark.timeout(600)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_regex_constraint_on_padded_vocabulary(engine, temperature):
    import re

    assert engine.runner.cbuf.cls.shape[1] == 384 and engine.runner.cbuf.mask.shape[1] == 12
    pats = [r"(cat|dog)s? [0-9]{2,3}", r"\d{4}-\d{2}-\d{2}"]
    outs = engine.generate(input_ids=[[5, 6, 7]] * len(pats),
                           sampling_params=[{"regex": p, "temperature": temperature, "max_new_tokens": 40,
                                             "sampling_seed": 3} for p in pats])
    for p, o in zip(pats, outs):
        assert o["meta_info"]["finish_reason"]["type"] == "stop", o
        assert re.fullmatch(p, o["text"]) and max(o["output_ids"]) < V_TOK, (p, o)
    engine.check_integrity()
    engine.constraint_table.check_integrity()


@pytest.mark.timeout(600)
def test_ebnf_grammar_on_padded_vocabulary(engine):
    pytest.importorskip("llguidance")
    o = engine.generate(input_ids=[5, 6, 7], sampling_params={"ebnf": 'root ::= ("ab" | "cd") "!"', "temperature": 1.0,
                                                             "max_new_tokens": 10, "sampling_seed": 1})
    assert o["text"] in ("ab!", "cd!") and max(o["output_ids"]) < V_TOK, o


# ------------------------------------------------------------------------------------- logit_bias
def _bias(rng, n, lo=3, hi=297):
    ids = sorted(rng.choice(np.arange(lo, hi), n, replace=False).tolist())
    return [(t, float(v)) for t, v in zip(ids, rng.uniform(-5, 5, n))]


@pytest.mark.timeout(600)
def test_64_logit_bias_entries_all_applied(engine, reference):
    rng = np.random.default_rng(4)
    bias = _bias(rng, 64)
    bias[-1] = (bias[-1][0], 30.0)  # the last entry (by id) decides the first token: a cut list would not
    p = _prompts(1, seed=5)[0]
    out = engine.generate(input_ids=p, sampling_params={"temperature": 0, "max_new_tokens": 4, "ignore_eos": True,
                                                        "logit_bias": {str(t): b for t, b in bias}},
                          return_logprob=True, top_logprobs_num=5)
    toks, lps, _ = ref_decode(reference, p, 4, bias=bias)
    assert out["output_ids"] == toks and toks[0] == bias[-1][0]
    m = out["meta_info"]
    for j in range(4):  # the normaliser sees every one of the 64 biases
        assert m["output_token_logprobs"][j][0] == pytest.approx(lps[j][toks[j]], abs=1e-4)
        np.testing.assert_allclose([t[0] for t in m["output_top_logprobs"][j]], np.sort(lps[j])[::-1][:5], atol=1e-4)
    # sensitivity: the first 16 entries alone give another answer
    cut, _, _ = ref_decode(reference, p, 1, bias=bias[:16])
    assert cut[0] != toks[0]


@pytest.mark.timeout(600)
def test_65_logit_bias_entries_rejected(engine):
    lb = {str(t): 1.0 for t in range(10, 75)}
    with pytest.raises(InvalidRequestError, match=r"logit_bias has 65 entries; at most 64"):
        engine.generate(input_ids=[5, 6], sampling_params={"logit_bias": lb})
    with pytest.raises(InvalidRequestError, match=r"stop_token_ids has 17 entries; at most 16"):
        engine.validate(input_ids=[5, 6], sampling_params={"stop_token_ids": list(range(10, 27))})


@pytest.mark.timeout(600)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_new_tokens_suppresses_stops_with_a_full_user_bias(engine, reference, temperature):
    rng = np.random.default_rng(6)
    user_stop = 123
    bias = dict(_bias(rng, 62, lo=3, hi=120))
    bias[EOS], bias[user_stop] = 40.0, 35.0  # both stop ids strongly favoured: 64 entries in all
    assert len(bias) == 64
    p = _prompts(1, seed=7)[0]
    sp = {"temperature": temperature, "max_new_tokens": 10, "min_new_tokens": 5, "ignore_eos": False,
          "stop_token_ids": [user_stop], "sampling_seed": 5, "logit_bias": {str(t): b for t, b in bias.items()}}
    out = engine.generate(input_ids=p, sampling_params=sp)
    ids = out["output_ids"]
    assert EOS not in ids[:5] and user_stop not in ids[:5], ids
    if temperature == 0:
        want, _, _ = ref_decode(reference, p, 6, bias=list(bias.items()), suppress=(EOS, user_stop),
                                suppress_steps=5)
        assert want[5] == EOS  # once allowed, the favoured EOS wins
        assert ids == want and out["meta_info"]["finish_reason"] == {"type": "stop", "matched": EOS}


# ------------------------------------------------------------------------------------------ config
@pytest.mark.timeout(30)
def test_config_limits_range_checked():
    assert EngineConfig().sampling.max_logit_bias == 64 and EngineConfig().sampling.max_stop_token_ids == 16
    with pytest.raises(ConfigError, match="engine.sampling.max_logit_bias"):
        build(EngineConfig, {"max_logit_bias": 0}, "engine")
    with pytest.raises(ConfigError, match="engine.sampling.max_stop_token_ids"):
        build(EngineConfig, {"max_stop_token_ids": -1}, "engine")
    assert build(EngineConfig, {"max_logit_bias": 1, "max_stop_token_ids": 0}, "engine").sampling.max_logit_bias == 1
