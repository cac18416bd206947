"""The real server end to end: `python -m sgl_jax.serve --config configs/smollm2-135m.yaml` in a
subprocess, driven over HTTP with requests, the `openai` client and the SGLang frontend.

Slow: the server loads SmolLM2-135M and compiles its step shapes first (minutes on a cold compile
cache). Assertions are about the protocol and self-consistency (greedy decoding repeats itself,
streaming ends where the non-streaming call does, the greedy token is the top-1 logprob), plus a
few answers a 135M instruct model gets right.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time

import pytest
import requests

from sgl_jax.constrained.testing import USER_SCHEMA

pytestmark = pytest.mark.slow
# `server` is one real server for the whole session (conftest.py, tests/e2e_server.py); this module's
# last test stops it with SIGTERM, and it runs after test_program_e2e.py, which shares it.


def post(server, path, body, status=200, **kw):
    r = requests.post(server.url + path, json=body, timeout=300, **kw)
    assert r.status_code == status, r.text
    return r.json()


def greedy(server, text, n=8, **extra):
    return post(server, "/generate", {"text": text, "sampling_params": {"temperature": 0, "max_new_tokens": n},
                                      **extra})


def sse_lines(resp) -> list:
    out = []
    for line in resp.iter_lines(decode_unicode=True):
        if line:
            assert line.startswith("data: "), line
            out.append(line[6:])
    return out


# ---------------------------------------------------------------------------------------------------

def test_info_routes(server):
    info = requests.get(server.url + "/get_model_info", timeout=30).json()
    assert info["model_path"] and info["is_generation"] is True
    si = requests.get(server.url + "/server_info", timeout=30).json()
    assert si["max_context_len"] > 0 and si["server"]["port"] == server.port
    assert requests.get(server.url + "/get_server_info", timeout=30).status_code == 200
    assert requests.get(server.url + "/v1/models", timeout=30).json()["data"][0]["id"]
    r = requests.get(server.url + "/health_generate", timeout=120)
    assert r.status_code == 200, r.text


def test_greedy_is_deterministic_and_the_prefix_is_cached(server):
    # longer than two KV pages: the radix cache shares whole pages
    prompt = ("France is a country in Western Europe. It borders Belgium, Luxembourg, Germany, Switzerland, "
              "Italy and Spain. Its largest city is also its capital. The capital of France is")
    a = greedy(server, prompt)
    b = greedy(server, prompt)
    assert a["text"] == b["text"] and a["output_ids"] == b["output_ids"]
    assert 0 < a["meta_info"]["completion_tokens"] <= 8
    assert a["meta_info"]["finish_reason"]["type"] in ("length", "stop")
    assert a["meta_info"]["prompt_tokens"] > 32
    assert b["meta_info"]["cached_tokens"] >= 16
    assert "Paris" in a["text"]


def test_stream_ends_where_the_plain_call_does(server):
    prompt = "List three colors:"
    plain = greedy(server, prompt, n=12)
    with requests.post(server.url + "/generate", stream=True, timeout=300, json={
            "text": prompt, "stream": True, "sampling_params": {"temperature": 0, "max_new_tokens": 12}}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = sse_lines(r)
    assert lines[-1] == "[DONE]"
    events = [json.loads(x) for x in lines[:-1]]
    texts = [e["text"] for e in events]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    assert events[-1]["text"] == plain["text"]
    assert events[-1]["meta_info"]["finish_reason"] is not None
    assert all(e["meta_info"]["finish_reason"] is None for e in events[:-1])


def test_batch_n_and_prefill_only(server):
    outs = post(server, "/generate", {"text": ["Hello", "One, two,"],
                                      "sampling_params": {"max_new_tokens": 4, "n": 2, "temperature": 0.8}})
    assert len(outs) == 4 and all(o["meta_info"]["completion_tokens"] <= 4 for o in outs)
    count = post(server, "/tokenize", {"text": "Hello there"})["count"]
    out = post(server, "/generate", {"text": "Hello there", "sampling_params": {"max_new_tokens": 0}})
    assert out["output_ids"] == [] and out["meta_info"]["prompt_tokens"] == count
    ids = post(server, "/tokenize", {"text": "Hello there"})["tokens"]
    assert post(server, "/detokenize", {"tokens": ids})["text"].endswith("Hello there")


def test_logprobs(server):
    out = greedy(server, "The sky is", n=5, return_logprob=True, logprob_start_len=0, top_logprobs_num=3,
                 return_text_in_logprobs=True)
    m = out["meta_info"]
    inp, outp = m["input_token_logprobs"], m["output_token_logprobs"]
    assert len(inp) == m["prompt_tokens"] and inp[0][0] is None
    assert all(e[0] <= 0 and isinstance(e[2], str) for e in inp[1:])
    assert [e[1] for e in outp] == out["output_ids"]
    for tok, top in zip(out["output_ids"], m["output_top_logprobs"]):
        assert len(top) == 3 and top[0][1] == tok  # greedy picks the top-1
        assert top[0][0] >= top[1][0] >= top[2][0]


def test_openai_client(server):
    import openai

    c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", timeout=300)
    r = c.completions.create(model="x", prompt="The capital of France is", max_tokens=6, temperature=0, logprobs=2)
    assert r.choices[0].text and r.usage.completion_tokens <= 6
    assert len(r.choices[0].logprobs.tokens) == r.usage.completion_tokens
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    r = c.chat.completions.create(model="x", messages=msgs, max_tokens=10, temperature=0)
    assert "Paris" in r.choices[0].message.content
    chunks = list(c.chat.completions.create(model="x", messages=msgs, max_tokens=10, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == r.choices[0].message.content
    r = c.chat.completions.create(model="x", messages=msgs, max_tokens=4, n=2, temperature=1.0, seed=5)
    assert len(r.choices) == 2


def test_structured_output(server):
    out = post(server, "/generate", {"text": "Is the sky blue? Answer:", "sampling_params": {
        "temperature": 0, "max_new_tokens": 8, "regex": "(yes|no)"}})
    assert out["text"] in ("yes", "no")
    import openai

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", timeout=300)
    r = c.chat.completions.create(
        model="x", messages=[{"role": "user", "content": "Name the capital of France as JSON."}], max_tokens=32,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
    obj = json.loads(r.choices[0].message.content)
    import jsonschema

    jsonschema.validate(obj, schema)


def test_ten_field_nested_schema(server):
    """The 10-field nested schema through /generate (two concurrent requests) and the OpenAI route."""
    import jsonschema
    import openai

    check = jsonschema.Draft202012Validator(USER_SCHEMA, format_checker=jsonschema.FormatChecker())
    prompts = [f"Create a JSON user record for {n}, who lives in {c}." for n, c in
               [("Maria Lopez", "Austin"), ("Kenji Watanabe", "Seattle")]]
    outs = post(server, "/generate", {"text": prompts, "sampling_params": {
        "temperature": 0, "max_new_tokens": 320, "json_schema": json.dumps(USER_SCHEMA)}})
    for o in outs:
        assert o["meta_info"]["finish_reason"]["type"] == "stop", o
        check.validate(json.loads(o["text"]))
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", timeout=300)
    r = c.chat.completions.create(
        model="x", messages=[{"role": "user", "content": prompts[0]}], max_tokens=800, temperature=0.7, seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "user", "schema": USER_SCHEMA}})
    assert r.choices[0].finish_reason == "stop"
    check.validate(json.loads(r.choices[0].message.content))


def test_sglang_frontend(server):
    import sglang as sgl

    sgl.set_default_backend(sgl.RuntimeEndpoint(server.url))
    try:
        @sgl.function
        def qa(s, q):
            s += "Q: " + q + "\nA:"
            s += sgl.gen("a", max_tokens=12, temperature=0, stop="\n")
            s += "\nIs that right? " + sgl.select("ok", choices=["yes", "no"])

        st = qa.run(q="What is the capital of France?")
        assert st["a"] and "\n" not in st["a"]
        assert st["ok"] in ("yes", "no")

        @sgl.function
        def capital(s):
            s += "The capital of France is" + sgl.select("c", choices=[" Paris", " London", " banana"])

        assert capital.run()["c"] == " Paris"

        @sgl.function
        def forked(s):
            s += "Two fruits:"
            forks = s.fork(2)
            for f in forks:
                f += sgl.gen("x", max_tokens=4, temperature=0)
            forks.join()
            s += forks[0]["x"] + "|" + forks[1]["x"]

        st = forked.run()
        assert st.text().startswith("Two fruits:")

        @sgl.function
        def short(s, p):
            s += p
            s += sgl.gen("x", max_tokens=6, temperature=0)

        states = short.run_batch([{"p": "1, 2, 3,"}, {"p": "a, b, c,"}], progress_bar=False)
        assert all(st["x"] for st in states)
        st = short.run(p="1, 2, 3,", stream=True)
        assert "".join(st.text_iter("x")) == states[0]["x"]

        @sgl.function
        def number(s):
            s += "A dog has this many legs: "
            s += sgl.gen("n", max_tokens=4, regex=r"[0-9]+", temperature=0)

        assert re.fullmatch(r"[0-9]+", number.run()["n"])
    finally:
        sgl.set_default_backend(None)


def test_prompt_logprobs_at_a_cached_page_boundary_and_upstream_select(server):
    """The issue's reproduction: an 18-token prompt cached by a max_new_tokens=0 request, then prompt logprobs
    from position 16 (the default preset's page boundary) must give 2 entries, equal to the uncached ones;
    upstream's select (which reads those entries) must not crash on prompts ending in "Answer: "."""
    import sglang as sgl

    ids = requests.post(server.url + "/tokenize", json={"text": "one two three four five six seven eight nine ten "
                        "eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen"}, timeout=30).json()["tokens"]
    ids = ids[:18]
    assert len(ids) == 18
    req = {"input_ids": ids, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True}
    cold = requests.post(server.url + "/generate", json={**req, "logprob_start_len": 16}, timeout=60).json()
    requests.post(server.url + "/generate", json={"input_ids": ids, "sampling_params": {"max_new_tokens": 0}},
                  timeout=60)
    for start in (15, 16, 17):
        warm = requests.post(server.url + "/generate", json={**req, "logprob_start_len": start}, timeout=60).json()
        entries = warm["meta_info"]["input_token_logprobs"]
        assert [e[1] for e in entries] == ids[start:], (start, entries)
    warm = requests.post(server.url + "/generate", json={**req, "logprob_start_len": 16}, timeout=60).json()
    for a, b in zip(cold["meta_info"]["input_token_logprobs"], warm["meta_info"]["input_token_logprobs"]):
        assert a[1] == b[1] and a[0] == pytest.approx(b[0], abs=1e-4)

    sgl.set_default_backend(sgl.RuntimeEndpoint(server.url))
    try:
        @sgl.function
        def classify(s, review):
            s += "Review: " + review + "\nIs this review positive or negative? Answer: "
            s += sgl.select("label", choices=["positive", "negative"])

        reviews = ["Great food, friendly staff.", "Cold soup and a rude waiter.", "I would come back any time.",
                   "Never again.", "The best pizza in town!", "Overpriced and bland.", "Lovely view, slow service.",
                   "Fresh, fast and cheap."]
        first = [classify.run(review=r)["label"] for r in reviews]
        again = [classify.run(review=r)["label"] for r in reviews]  # every prompt now cached
        assert first == again and set(first) <= {"positive", "negative"}
    finally:
        sgl.set_default_backend(None)


def test_bad_inputs_are_400_and_the_server_keeps_serving(server):
    for path, body, needle in [
        ("/generate", {"text": "hi", "sampling_params": {"temperature": "hot"}}, "temperature"),
        ("/generate", {"input_ids": [10 ** 9]}, "input_ids"),
        ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 10 ** 6}}, "max_new_tokens"),
        ("/generate", {"text": ""}, "BOS"),
        ("/generate", {"text": "hi", "sampling_params": {"regex": "[0-9]( [0-9]){20}", "max_new_tokens": 3}},
         "max_new_tokens (3) is too small"),
        ("/generate", {"text": "hi", "sampling_params": {"logit_bias": {str(i): 1.0 for i in range(65)}}},
         "logit_bias"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": "x"}, "max_tokens"),
    ]:
        r = requests.post(server.url + path, json=body, timeout=30)
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
    r = requests.post(server.url + "/generate", data=b"{oops", timeout=30)
    assert r.status_code == 400
    assert requests.get(server.url + "/health", timeout=30).status_code == 200


def test_disconnect_frees_the_request(server):
    body = json.dumps({"text": "Count to one thousand:", "stream": True,
                       "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}}).encode()
    s = socket.create_connection(("127.0.0.1", server.port), timeout=120)
    s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
              % len(body) + body)
    buf = b""
    while b"data: " not in buf:
        chunk = s.recv(4096)
        assert chunk
        buf += chunk
    s.close()
    deadline = time.time() + 60
    while time.time() < deadline:
        si = requests.get(server.url + "/server_info", timeout=30).json()
        if si["num_inflight_requests"] == 0 and si.get("num_running", 0) == 0:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"the request was not aborted: {si}")
    assert post(server, "/flush_cache", None)["success"] is True


def test_metrics(server):
    text = requests.get(server.url + "/metrics", timeout=30).text
    assert "sgl_jax_requests_total" in text and "sgl_jax_time_to_first_token_seconds_bucket" in text
    assert re.search(r"sgl_jax_generation_tokens_total [1-9]", text)
    # the default preset runs the host tier: its pages and decisions are reported (values depend on the run)
    assert re.search(r'sgl_jax_cache_pages\{tier="host"\} \d', text) and 'sgl_jax_cache_events{event="pages_demoted"}' in text
    assert re.search(r"sgl_jax_host_free_slots [1-9]", text)


def test_zz_sigterm_drains_then_exits(server):
    """Last in the module: stops the server."""
    result = {}

    def long_request():
        result["r"] = requests.post(server.url + "/generate", timeout=120, json={
            "text": "Tell me a long story.", "sampling_params": {"max_new_tokens": 1900, "ignore_eos": True}}).json()

    th = threading.Thread(target=long_request, daemon=True)
    th.start()
    deadline = time.time() + 60
    while requests.get(server.url + "/server_info", timeout=30).json()["num_inflight_requests"] == 0:
        assert time.time() < deadline
        time.sleep(0.1)
    server.proc.send_signal(signal.SIGTERM)
    th.join(120)
    assert result["r"]["meta_info"]["finish_reason"]["type"] == "abort"
    assert server.proc.wait(60) == 0, server.tail()
