"""SamplingParams.from_dict: the wire dict of SGLang's /generate, validated (host code, no jax)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from sgl_jax.errors import InvalidRequestError, UnsupportedFeatureError
from sgl_jax.sampling_params import KNOWN_KEYS, SamplingParams


def test_defaults():
    sp = SamplingParams.from_dict(None)
    assert sp == SamplingParams()
    assert (sp.max_new_tokens, sp.temperature, sp.top_p, sp.top_k, sp.n, sp.stop) == (128, 1.0, 1.0, -1, 1, ())


def test_what_the_sglang_frontend_sends():
    # SglSamplingParams.to_srt_kwargs() plus the two globals, as the frontend posts them
    d = {"skip_special_tokens": True, "spaces_between_special_tokens": True, "max_new_tokens": 16,
         "min_new_tokens": 0, "n": 1, "stop": [], "stop_token_ids": [], "stop_regex": [], "temperature": 0,
         "top_p": 1.0, "top_k": -1, "min_p": 0.0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
         "ignore_eos": False, "regex": None, "json_schema": None}
    sp = SamplingParams.from_dict(d)
    assert sp.temperature == 0.0 and isinstance(sp.temperature, float) and sp.is_greedy
    assert sp.stop == () and sp.regex is None


def test_normalization():
    sp = SamplingParams.from_dict({"stop": "\n", "stop_token_ids": [2, 3], "logit_bias": {"5": -100, 7: 2.5},
                                   "json_schema": {"type": "object"}}, vocab_size=10)
    assert sp.stop == ("\n",) and sp.stop_token_ids == (2, 3)
    assert sp.logit_bias == ((5, -100.0), (7, 2.5))
    assert json.loads(sp.json_schema) == {"type": "object"}
    assert sp.is_constrained
    assert SamplingParams.from_dict({"choices": ["a", "b"]}).choices == ("a", "b")
    assert hash(sp)  # frozen and hashable
    assert SamplingParams.from_dict(sp.to_dict(), vocab_size=10) == sp
    assert json.loads(json.dumps(sp.to_dict()))  # JSON-able


def test_null_means_default_and_max_new_tokens_null_means_the_context():
    assert SamplingParams.from_dict({"temperature": None, "stop": None}) == SamplingParams()
    sp = SamplingParams.from_dict({"max_new_tokens": None}, max_context=100, prompt_len=30)
    assert sp.max_new_tokens == 70
    assert SamplingParams.from_dict({"max_new_tokens": None}).max_new_tokens == 128


@pytest.mark.parametrize("d,needle", [
    ({"temperature": "hot"}, "sampling_params.temperature must be a number, got 'hot'"),
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"top_p": math.inf}, "top_p"),
    ({"top_p": 0.0}, "top_p must be in (0, 1]"),
    ({"top_p": 1.01}, "top_p"),
    ({"min_p": -0.1}, "min_p must be in [0, 1]"),
    ({"top_k": 0}, "top_k"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 2.0}, "top_k must be an integer"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"frequency_penalty": 3}, "frequency_penalty"),
    ({"presence_penalty": -2.5}, "presence_penalty"),
    ({"max_new_tokens": -1}, "max_new_tokens must be >= 0"),
    ({"max_new_tokens": True}, "max_new_tokens"),
    ({"min_new_tokens": 5, "max_new_tokens": 4}, "min_new_tokens"),
    ({"n": 0}, "sampling_params.n"),
    ({"stop": 3}, "stop"),
    ({"stop": ["ok", ""]}, "stop[1]"),
    ({"stop_regex": "("}, "stop_regex[0]"),
    ({"stop_token_ids": [1, 10]}, "stop_token_ids[1] must be a token id in [0, 10)"),
    ({"stop_token_ids": 3}, "stop_token_ids"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"11": 1}}, "logit_bias"),
    ({"logit_bias": {"1": "big"}}, "logit_bias"),
    ({"logit_bias": [1, 2]}, "logit_bias"),
    ({"ignore_eos": "no"}, "ignore_eos must be true or false"),
    ({"regex": 5}, "regex"),
    ({"regex": ""}, "regex"),
    ({"json_schema": "{not json"}, "json_schema"),
    ({"json_schema": 5}, "json_schema"),
    ({"choices": []}, "choices"),
    ({"regex": "a", "json_schema": "{}"}, "at most one of"),
    ({"sampling_seed": "s"}, "sampling_seed"),
    ({"temprature": 1.0}, "unknown sampling parameter 'sampling_params.temprature'"),
])
def test_errors_name_the_key(d, needle):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams.from_dict(d, vocab_size=10)
    assert needle in str(e.value)


def test_context_limit_names_both_numbers():
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams.from_dict({"max_new_tokens": 100}, max_context=120, prompt_len=30)
    msg = str(e.value)
    assert "max_new_tokens" in msg and "100" in msg and "30" in msg and "120" in msg and e.value.field == "max_new_tokens"
    with pytest.raises(InvalidRequestError, match="prompt has 130 tokens"):
        SamplingParams.from_dict({"max_new_tokens": 0}, max_context=120, prompt_len=130)
    assert SamplingParams.from_dict({"max_new_tokens": 90}, max_context=120, prompt_len=30).max_new_tokens == 90


def test_renamed_fields_for_other_dialects():
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams.from_dict({"max_new_tokens": "x"}, where="", names={"max_new_tokens": "max_tokens"})
    assert str(e.value).startswith("max_tokens must be an integer")


def test_not_a_dict():
    with pytest.raises(InvalidRequestError, match="sampling_params must be a JSON object"):
        SamplingParams.from_dict([1, 2])


def test_error_types():
    assert issubclass(UnsupportedFeatureError, InvalidRequestError) and issubclass(InvalidRequestError, ValueError)
    assert {"max_new_tokens", "json_schema", "logit_bias", "sampling_seed", "stop_regex"} <= KNOWN_KEYS


def test_host_code_imports_without_jax():
    """The request path up to the engine (params, errors, metrics, the HTTP layer) needs no jax."""
    code = ("import sys; sys.modules['jax'] = None; sys.modules['jaxlib'] = None\n"
            "import sgl_jax.sampling_params, sgl_jax.errors, sgl_jax.metrics, sgl_jax.serve.protocol\n"
            "import sgl_jax.serve.server, sgl_jax.serve.__main__\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.timeout(30)
def test_logit_bias_and_stop_token_id_limits_are_validated_not_cut():
    from sgl_jax.sampling_params import check_token_ids

    lb = {str(t): float(t % 7) for t in range(100, 164)}
    sp = SamplingParams.from_dict({"logit_bias": lb}, vocab_size=1000, max_logit_bias=64)
    assert sp.logit_bias == tuple((int(k), v) for k, v in lb.items())  # all 64 kept, sorted by id
    with pytest.raises(InvalidRequestError, match=r"sampling_params.logit_bias has 65 entries; at most 64 .*"
                                                  r"max_logit_bias") as e:
        SamplingParams.from_dict({"logit_bias": {**lb, "99": 1.0}}, vocab_size=1000, max_logit_bias=64)
    assert e.value.field == "logit_bias"
    with pytest.raises(InvalidRequestError, match="logit_bias has 2 entries; at most 1"):
        SamplingParams.from_dict({"logit_bias": [[1, 1.0], [2, 2.0]]}, max_logit_bias=1)
    assert SamplingParams.from_dict({"stop_token_ids": [1, 2]}, max_stop_token_ids=2).stop_token_ids == (1, 2)
    with pytest.raises(InvalidRequestError, match=r"stop_token_ids has 3 entries; at most 2"):
        SamplingParams.from_dict({"stop_token_ids": [1, 2, 3]}, max_stop_token_ids=2)
    # without limits (the protocol layer), nothing is counted
    assert len(SamplingParams.from_dict({"logit_bias": {**lb, "99": 1.0}}).logit_bias) == 65
    assert check_token_ids([0, 5, 299], 300) == [0, 5, 299]
    with pytest.raises(InvalidRequestError, match=r"'input_ids'\[2\] is 300, not a token id: the vocabulary is "
                                                  r"\[0, 300\)"):
        check_token_ids([0, 5, 300], 300)
    with pytest.raises(InvalidRequestError, match="list of integers"):
        check_token_ids([0, True], 300)
