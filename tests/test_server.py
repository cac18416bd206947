"""The serving layer against FakeEngine (tests/fake_engine.py), whose outputs are worked out by hand:
after token t comes t + 1 ("abc" -> "defgh..."), "z" is followed by EOS, the next token has
logprob log(1/2) and every other token log(1/2 / 257).

In-process tests use Starlette's TestClient; `live` serves the app with uvicorn in a thread (for the
`openai` client, the SGLang frontend and client disconnects); one test runs the server in a
subprocess to check SIGTERM's graceful drain.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import requests
import uvicorn
from fastapi.testclient import TestClient

from fake_engine import BOS, EOS, LP_NEXT, LP_OTHER, FakeEngine
from sgl_jax.config import ServerConfig
from sgl_jax.metrics import Metrics
from sgl_jax.serve.server import create_app

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------------------------------

@pytest.fixture
def engine():
    return FakeEngine(metrics=Metrics())


@pytest.fixture
def client(engine):
    with TestClient(create_app(engine, ServerConfig(), engine.metrics)) as c:
        yield c
    engine.check_integrity()
    assert engine.open_requests == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond, timeout=10.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def live():
    """The app served by uvicorn in a thread; `engine` is the very object the server uses."""
    metrics = Metrics()
    eng = FakeEngine(delay=0.003, metrics=metrics)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(eng, ServerConfig(port=port), metrics), host="127.0.0.1",
                                           port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    wait_until(lambda: server.started, what="uvicorn start")
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", port=port, engine=eng)
    server.should_exit = True
    th.join(10)


def sse_events(raw: str) -> list:
    """Parse an SSE body strictly: every event is one 'data: ...' line followed by a blank line."""
    assert raw.endswith("\n\n"), raw[-50:]
    events = []
    for block in raw[:-2].split("\n\n"):
        assert block.startswith("data: ") and "\n" not in block, block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def gen(client, **body):
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


# ---------------------------------------------------------------------------------------------------
# /generate
# ---------------------------------------------------------------------------------------------------

def test_generate_text(client):
    out = gen(client, text="abc", sampling_params={"max_new_tokens": 5})
    assert out["text"] == "defgh"
    assert out["output_ids"] == [100, 101, 102, 103, 104]
    m = out["meta_info"]
    assert m["finish_reason"] == {"type": "length", "length": 5}
    assert (m["prompt_tokens"], m["completion_tokens"], m["cached_tokens"]) == (4, 5, 0)
    assert isinstance(m["id"], str) and m["e2e_latency"] >= 0


def test_generate_input_ids_stops_at_eos(client):
    out = gen(client, input_ids=[ord("x")], sampling_params={"max_new_tokens": 10})
    assert out["text"] == "yz"
    assert out["output_ids"] == [ord("y"), ord("z"), EOS]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": EOS}
    out = gen(client, input_ids=[ord("x")], sampling_params={"max_new_tokens": 4, "ignore_eos": True})
    assert out["text"] == "yz{|"
    out = gen(client, input_ids=[ord("x")], sampling_params={"max_new_tokens": 4, "min_new_tokens": 4})
    assert out["text"] == "yz{|"


def test_stop_strings_and_ids(client):
    out = gen(client, text="abc", sampling_params={"max_new_tokens": 20, "stop": "gh"})
    assert out["text"] == "def"
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": "gh"}
    out = gen(client, text="abc", sampling_params={"max_new_tokens": 20, "stop": ["zz", "g"], "no_stop_trim": True})
    assert out["text"] == "defg"
    out = gen(client, text="abc", sampling_params={"max_new_tokens": 20, "stop_token_ids": [ord("f")]})
    assert out["text"] == "de"
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": ord("f")}


def test_prefill_only_and_cached_tokens(client):
    out = gen(client, text="abcdef", sampling_params={"max_new_tokens": 0})
    assert out["text"] == "" and out["output_ids"] == []
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
    assert out["meta_info"]["prompt_tokens"] == 7
    out = gen(client, text="abcxyz", sampling_params={"max_new_tokens": 0})
    assert out["meta_info"]["cached_tokens"] == 4  # <s> a b c
    assert client.post("/flush_cache").json()["success"] is True
    out = gen(client, text="abcxyz", sampling_params={"max_new_tokens": 0})
    assert out["meta_info"]["cached_tokens"] == 0


def test_batch_and_n(client, engine):
    outs = gen(client, text=["abc", "xy"], sampling_params={"max_new_tokens": 3, "n": 2, "sampling_seed": 7})
    assert [o["text"] for o in outs] == ["def", "def", "z", "z"]
    assert len({o["meta_info"]["id"] for o in outs}) == 4
    # each engine call is one sequence (n=1); the n samples of a prompt get distinct seeds
    sps = [c["sampling_params"] for c in engine.calls]
    assert all(sp.get("n", 1) == 1 for sp in sps)  # one engine sequence per sample
    assert [sp["sampling_seed"] for sp in sps] == [7, 8, 7, 8]
    outs = gen(client, text="abc", sampling_params={"max_new_tokens": 2, "n": 3})
    assert isinstance(outs, list) and [o["text"] for o in outs] == ["de"] * 3
    outs = gen(client, input_ids=[[97], [120]], sampling_params=[{"max_new_tokens": 1}, {"max_new_tokens": 2}])
    assert [o["text"] for o in outs] == ["b", "yz"]


def test_rid_and_batch_rids(client, engine):
    out = gen(client, text="abc", rid="my-req", sampling_params={"max_new_tokens": 1})
    assert out["meta_info"]["id"] == "my-req"
    outs = gen(client, text=["a", "b"], rid=["r1", "r2"], sampling_params={"max_new_tokens": 1})
    assert [o["meta_info"]["id"] for o in outs] == ["r1", "r2"]


def test_stream_sse_format(client):
    r = client.post("/generate", json={"text": "abc", "sampling_params": {"max_new_tokens": 3}, "stream": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    evs = sse_events(r.text)
    assert evs[-1] == "[DONE]"
    assert [e["text"] for e in evs[:-1]] == ["d", "de", "def"]  # cumulative
    assert [e["meta_info"]["finish_reason"] for e in evs[:-1]] == [None, None, {"type": "length", "length": 3}]
    assert "index" not in evs[0]


def test_stream_holds_back_partial_stop_string(client):
    r = client.post("/generate", json={"text": "abc", "stream": True,
                                       "sampling_params": {"max_new_tokens": 10, "stop": "fgX"}})
    texts = [e["text"] for e in sse_events(r.text)[:-1]]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    assert texts[-1] == "defghijklm"


def test_stream_batch_carries_index(client):
    r = client.post("/generate", json={"text": ["abc", "xy"], "stream": True,
                                       "sampling_params": {"max_new_tokens": 2, "n": 2}})
    evs = sse_events(r.text)
    assert evs[-1] == "[DONE]"
    final = {e["index"]: e["text"] for e in evs[:-1] if e["meta_info"]["finish_reason"]}
    assert final == {0: "de", 1: "de", 2: "z", 3: "z"}


def test_logprob_entries(client):
    out = gen(client, text="abc", sampling_params={"max_new_tokens": 2}, return_logprob=True,
              logprob_start_len=0, top_logprobs_num=2, return_text_in_logprobs=True)
    m = out["meta_info"]
    # prompt <s> a b c: nothing predicts <s>; "a" after <s> is not the model's pick (" " is); b, c are
    assert m["input_token_logprobs"] == [[None, BOS, "<s>"], [pytest.approx(LP_OTHER), 97, "a"],
                                         [pytest.approx(LP_NEXT), 98, "b"], [pytest.approx(LP_NEXT), 99, "c"]]
    assert m["output_token_logprobs"] == [[pytest.approx(LP_NEXT), 100, "d"], [pytest.approx(LP_NEXT), 101, "e"]]
    assert m["input_top_logprobs"][0] is None
    assert m["input_top_logprobs"][1] == [[pytest.approx(LP_NEXT), 32, " "], [pytest.approx(LP_OTHER), 0, "\x00"]]
    assert [e[1] for e in m["output_top_logprobs"][0]] == [100, 0]
    # default logprob_start_len = -1: the last prompt token's entry (as upstream's server), then the output;
    # no text unless asked
    out = gen(client, text="abc", sampling_params={"max_new_tokens": 1}, return_logprob=True)
    assert out["meta_info"]["input_token_logprobs"] == [[pytest.approx(LP_NEXT), 99, None]]
    assert out["meta_info"]["output_token_logprobs"] == [[pytest.approx(LP_NEXT), 100, None]]


def test_select_protocol(client):
    """The two calls the SGLang frontend makes to score `select` choices."""
    first = gen(client, text="abc", sampling_params={"max_new_tokens": 0})
    p = first["meta_info"]["prompt_tokens"]
    outs = gen(client, text=["abc" + c for c in ("x", "de")], sampling_params={"max_new_tokens": 0, "temperature": 0},
               return_logprob=True, return_text_in_logprobs=True, logprob_start_len=max(p - 2, 0))
    scores = []
    for o in outs:
        vals = [e[0] for e in o["meta_info"]["input_token_logprobs"] if e[0] is not None]
        scores.append(sum(vals) / len(vals))
    assert scores[1] == pytest.approx(LP_NEXT) and scores[0] < scores[1]


# ---------------------------------------------------------------------------------------------------
# the other native routes
# ---------------------------------------------------------------------------------------------------

def test_info_routes(client, engine):
    info = client.get("/get_model_info").json()
    assert info["model_path"] == "fake/byte-model" and info["is_generation"] is True
    for path in ("/server_info", "/get_server_info"):
        si = client.get(path).json()
        assert si["model_path"] == "fake/byte-model"
        assert si["server"]["port"] == 30000 and "version" in si
    assert client.get("/health").status_code == 200
    hg = client.get("/health_generate")
    assert hg.status_code == 200 and hg.json()["output_ids"] == [ord("j")]  # "Hi" -> "j"


def test_flush_cache_no_body(client):
    r = client.post("/flush_cache")
    assert r.status_code == 200 and r.json()["success"] is True
    assert client.get("/flush_cache").status_code == 200


def test_tokenize_detokenize(client):
    assert client.post("/tokenize", json={"text": "ab"}).json()["tokens"] == [BOS, 97, 98]
    r = client.post("/tokenize", json={"text": "ab", "add_special_tokens": False}).json()
    assert r == {"tokens": [97, 98], "count": 2, "max_model_len": 512}
    assert client.post("/tokenize", json={"text": ["a", "bc"]}).json()["count"] == [2, 3]
    assert client.post("/detokenize", json={"tokens": [BOS, 104, 105]}).json() == {"text": "hi"}
    r = client.post("/detokenize", json={"tokens": [BOS, 104], "skip_special_tokens": False})
    assert r.json() == {"text": "<s>h"}


def test_concate_and_append_is_a_noop(client):
    r = client.post("/concate_and_append_request", json={"src_rids": ["a", "b"], "dst_rid": "c"})
    assert r.status_code == 200


def test_abort_unknown_rid(client):
    assert client.post("/abort_request", json={"rid": "nope"}).json() == {"success": False}


def test_metrics(client):
    gen(client, text="abc", sampling_params={"max_new_tokens": 3})
    gen(client, text="abc", sampling_params={"max_new_tokens": 0})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for line in ('sgl_jax_requests_total{status="length"} 2.0', "sgl_jax_prompt_tokens_total 8.0",
                 "sgl_jax_generation_tokens_total 3.0", "sgl_jax_cached_tokens_total 3.0",
                 "sgl_jax_cache_hit_rate 0.375", "sgl_jax_time_to_first_token_seconds_count 1.0",
                 "sgl_jax_e2e_latency_seconds_count 2.0", "sgl_jax_step_seconds_count 3.0",
                 "sgl_jax_batch_size_count 3.0", "sgl_jax_num_running 1.0", "sgl_jax_num_waiting 0.0"):
        assert line in text, line
    assert "sgl_jax_kv_pages_used_ratio" in text


def test_metrics_unit():
    m = Metrics()
    m.observe_step(0.02, 8)
    m.set_queue(3, 8, 0.5)
    m.on_first_token(0.1)
    m.on_finish("stop", 100, 10, 40, 1.5)
    m.on_finish("abort", 100, 0, 60, 0.5)
    text = m.render().decode()
    assert "sgl_jax_cache_hit_rate 0.5" in text
    assert 'sgl_jax_requests_total{status="abort"} 1.0' in text
    assert "sgl_jax_kv_pages_used_ratio 0.5" in text
    m.set_cache({"device_pages": 7, "host_pages": 5, "page_bytes": 100, "host_free_slots": 11, "pages_demoted": 9,
                 "host_copy_pages": 3, "pages_demoted_by_copy": 6, "pages_promoted": 4, "host_pages_dropped": 2,
                 "host_tokens_loaded": 64, "host_tokens_recomputed": 3})
    text = m.render().decode()
    for line in ('sgl_jax_cache_pages{tier="device"} 7.0', 'sgl_jax_cache_pages{tier="host"} 5.0',
                 'sgl_jax_cache_tier_bytes{tier="host"} 500.0', "sgl_jax_host_free_slots 11.0",
                 'sgl_jax_cache_events{event="pages_demoted"} 9.0', 'sgl_jax_cache_events{event="pages_promoted"} 4.0',
                 'sgl_jax_cache_events{event="host_pages_dropped"} 2.0',
                 'sgl_jax_cache_events{event="host_tokens_loaded"} 64.0',
                 'sgl_jax_cache_events{event="host_tokens_recomputed"} 3.0', "sgl_jax_host_copy_slots 3.0",
                 'sgl_jax_cache_events{event="pages_demoted_by_copy"} 6.0'):
        assert line in text, line
    assert 'tier="disk"' not in text  # no disk tier: no disk series
    m.set_cache({"device_pages": 7, "host_pages": 5, "page_bytes": 100, "host_free_slots": 11, "pages_demoted": 9,
                 "host_copy_pages": 3, "pages_demoted_by_copy": 6, "pages_promoted": 4, "host_pages_dropped": 2,
                 "host_tokens_loaded": 64, "host_tokens_recomputed": 3,
                 "disk_pages": 6, "disk_bytes": 960, "disk_written": 8, "disk_read": 2, "disk_corrupt": 1,
                 "disk_evicted": 2, "disk_tokens_read": 32, "disk_loading": 1, "disk_pages_spilled": 5})
    text = m.render().decode()
    for line in ('sgl_jax_cache_pages{tier="disk"} 6.0', 'sgl_jax_cache_tier_bytes{tier="disk"} 960.0',
                 "sgl_jax_disk_loading 1.0", 'sgl_jax_cache_events{event="disk_pages_spilled"} 5.0',
                 'sgl_jax_cache_events{event="disk_corrupt"} 1.0', 'sgl_jax_cache_events{event="disk_tokens_read"} 32.0'):
        assert line in text, line
    assert "sgl_jax_batch_size_sum 8.0" in text
    assert "sgl_jax_num_waiting 3.0" in text


# ---------------------------------------------------------------------------------------------------
# OpenAI routes (in-process)
# ---------------------------------------------------------------------------------------------------

def test_models(client):
    d = client.get("/v1/models").json()
    assert d["object"] == "list" and d["data"][0]["id"] == "fake/byte-model"


def test_completions(client, engine):
    d = client.post("/v1/completions", json={"model": "m", "prompt": "abc"}).json()
    assert d["object"] == "text_completion"
    assert d["choices"][0]["text"] == "defghijklmnopqrs"  # default max_tokens 16
    assert d["choices"][0]["finish_reason"] == "length"
    assert d["usage"] == {"prompt_tokens": 4, "completion_tokens": 16, "total_tokens": 20,
                          "prompt_tokens_details": {"cached_tokens": 0}}
    d = client.post("/v1/completions", json={"prompt": ["abc", "xy"], "max_tokens": 3, "n": 2, "seed": 1,
                                             "stop": ["f"], "top_k": 5, "min_p": 0.1, "ignore_eos": True}).json()
    assert [(c["index"], c["text"], c["finish_reason"]) for c in d["choices"]] == [
        (0, "de", "stop"), (1, "de", "stop"), (2, "z{|", "length"), (3, "z{|", "length")]
    assert d["choices"][0]["matched_stop"] == "f"
    # a prompt sampled n times counts once; the second sample of "abc" hits the cache
    assert d["usage"]["prompt_tokens"] == 4 + 3 and d["usage"]["completion_tokens"] == 3 + 3 + 3 + 3
    assert d["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    sp = engine.calls[-1]["sampling_params"]
    assert (sp["top_k"], sp["min_p"], sp["ignore_eos"], sp["sampling_seed"]) == (5, 0.1, True, 2)


def test_completions_token_prompt_echo_logprobs(client):
    d = client.post("/v1/completions", json={"prompt": [97, 98], "max_tokens": 2, "echo": True,
                                             "logprobs": 1}).json()
    c = d["choices"][0]
    assert c["text"] == "abcd"
    lp = c["logprobs"]
    assert lp["tokens"] == ["a", "b", "c", "d"]
    assert lp["token_logprobs"][0] is None and lp["token_logprobs"][1:] == [pytest.approx(LP_NEXT)] * 3
    assert lp["top_logprobs"][1] == {"b": pytest.approx(LP_NEXT)}
    assert lp["text_offset"] == [0, 1, 2, 3]


def test_completions_stream(client):
    r = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 3, "stream": True, "logprobs": 0,
                                             "stream_options": {"include_usage": True}})
    evs = sse_events(r.text)
    assert evs[-1] == "[DONE]"
    chunks = evs[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "def"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert [t for c in chunks[:-1] for t in c["choices"][0]["logprobs"]["tokens"]] == ["d", "e", "f"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


def test_chat(client, engine):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    d = client.post("/v1/chat/completions", json={"model": "m", "messages": msgs, "max_tokens": 4}).json()
    assert d["object"] == "chat.completion"
    assert d["choices"][0]["message"] == {"role": "assistant", "content": "?@AB"}  # template ends with ">"
    assert d["choices"][0]["finish_reason"] == "length"
    ids = engine.calls[-1]["input_ids"]
    assert ids[0] == BOS and ids[1] != BOS  # the template's <s>, not a second BOS
    assert engine.tokenizer.decode(ids) == "<|system|>be brief\n<|user|>hi\n<|assistant|>"
    assert d["usage"]["prompt_tokens"] == len(ids)


def test_chat_n_stop_logprobs_seed(client, engine):
    d = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "x"}], "n": 2, "stop": "B", "logprobs": True, "top_logprobs": 2,
        "seed": 3, "max_completion_tokens": 10}).json()
    assert [c["message"]["content"] for c in d["choices"]] == ["?@A", "?@A"]
    assert [c["index"] for c in d["choices"]] == [0, 1]
    content = d["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in content] == ["?", "@", "A", "B"]
    assert content[0]["bytes"] == [63] and content[0]["logprob"] == pytest.approx(LP_NEXT)
    assert [t["token"] for t in content[0]["top_logprobs"]] == ["?", "\x00"]
    assert [c["sampling_params"]["sampling_seed"] for c in engine.calls[-2:]] == [3, 4]


def test_chat_response_format(client, engine):
    m = [{"role": "user", "content": "x"}]
    client.post("/v1/chat/completions", json={"messages": m, "max_tokens": 1,
                                              "response_format": {"type": "json_object"}})
    assert json.loads(engine.calls[-1]["sampling_params"]["json_schema"]) == {"type": "object"}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    client.post("/v1/chat/completions", json={"messages": m, "max_tokens": 1, "response_format": {
        "type": "json_schema", "json_schema": {"name": "s", "schema": schema}}})
    assert json.loads(engine.calls[-1]["sampling_params"]["json_schema"]) == schema
    client.post("/v1/chat/completions", json={"messages": m, "max_tokens": 1, "regex": "[ab]+"})
    assert engine.calls[-1]["sampling_params"]["regex"] == "[ab]+"


def test_chat_default_max_tokens_is_the_context(client, engine):
    engine.delay = 0
    d = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                  "ignore_eos": True}).json()
    p = d["usage"]["prompt_tokens"]
    assert d["usage"]["completion_tokens"] == 512 - p


def test_chat_stream(client):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
                                                  "stream": True, "n": 2})
    evs = sse_events(r.text)
    assert evs[-1] == "[DONE]"
    chunks = evs[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant", "content": ""}] * 2
    for i in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert "".join(ch["delta"].get("content", "") for ch in mine) == "?@A"
        assert mine[-1]["finish_reason"] == "length"
        assert all(ch["finish_reason"] is None for ch in mine[:-1])


# ---------------------------------------------------------------------------------------------------
# bad input: 400 naming the field, and the server keeps serving
# ---------------------------------------------------------------------------------------------------

BAD = [
    ("/generate", b"{not json", "not valid JSON"),
    ("/generate", b"", "empty"),
    ("/generate", [1, 2], "JSON object"),
    ("/generate", {"sampling_params": {}}, "text or input_ids"),
    ("/generate", {"text": "a", "input_ids": [1]}, "not both"),
    ("/generate", {"text": 5}, "text must be"),
    ("/generate", {"text": ["a", 3]}, "text[1]"),
    ("/generate", {"input_ids": []}, "input_ids"),
    ("/generate", {"input_ids": [1, 999]}, "input_ids[1]"),
    ("/generate", {"input_ids": [[1], [2, -1]]}, "input_ids[1][1]"),
    ("/generate", {"input_ids": [1, "a"]}, "input_ids[1]"),
    ("/generate", {"text": "a", "sampling_params": {"temperature": "hot"}}, "sampling_params.temperature"),
    ("/generate", b'{"text": "a", "sampling_params": {"temperature": NaN}}', "sampling_params.temperature"),
    ("/generate", {"text": "a", "sampling_params": {"temperature": -1}}, "temperature"),
    ("/generate", {"text": "a", "sampling_params": {"top_p": 1.5}}, "top_p"),
    ("/generate", {"text": "a", "sampling_params": {"top_p": 0}}, "top_p"),
    ("/generate", {"text": "a", "sampling_params": {"top_k": 0}}, "top_k"),
    ("/generate", {"text": "a", "sampling_params": {"min_p": 2}}, "min_p"),
    ("/generate", {"text": "a", "sampling_params": {"repetition_penalty": 0}}, "repetition_penalty"),
    ("/generate", {"text": "a", "sampling_params": {"n": 0}}, "sampling_params.n"),
    ("/generate", {"text": "a", "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
    ("/generate", {"text": "a", "sampling_params": {"max_new_tokens": 1.5}}, "max_new_tokens"),
    ("/generate", {"text": "a", "sampling_params": {"max_new_tokens": 2, "min_new_tokens": 3}}, "min_new_tokens"),
    ("/generate", {"text": "a", "sampling_params": {"max_new_tokens": 600}}, "max_new_tokens"),
    ("/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 511}}, "max_new_tokens"),
    ("/generate", {"text": "a", "sampling_params": {"temprature": 1}}, "temprature"),
    ("/generate", {"text": "a", "sampling_params": {"stop": 5}}, "stop"),
    ("/generate", {"text": "a", "sampling_params": {"stop_token_ids": [300]}}, "stop_token_ids[0]"),
    ("/generate", {"text": "a", "sampling_params": {"logit_bias": {"x": 1}}}, "logit_bias"),
    ("/generate", {"text": "a", "sampling_params": {"ebnf": "root ::= 'a'"}}, "ebnf"),
    ("/generate", {"text": "a", "sampling_params": "fast"}, "sampling_params"),
    ("/generate", {"text": ["a", "b"], "sampling_params": [{}]}, "sampling_params has 1 entries"),
    ("/generate", {"text": ["a", "b"], "sampling_params": [{}, {"top_k": 0}]}, "sampling_params[1].top_k"),
    ("/generate", {"text": "a", "return_logprob": "yes"}, "return_logprob"),
    ("/generate", {"text": "a", "top_logprobs_num": 99, "return_logprob": True}, "top_logprobs_num"),
    ("/generate", {"text": "a", "stream": 1}, "stream"),
    ("/generate", {"text": "a", "image_data": "x.png"}, "image_data"),
    ("/generate", {"text": "a", "bogus": 1}, "bogus"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {}, "prompt"),
    ("/v1/completions", {"prompt": [1, 999]}, "prompt[1]"),
    ("/v1/completions", {"prompt": "a", "max_tokens": "x"}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 1000}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "seed": "x"}, "seed"),
    ("/v1/completions", {"prompt": "a", "logprobs": -1}, "logprobs"),
    ("/v1/completions", {"prompt": "a", "temperature": None, "top_p": 7}, "top_p"),
    ("/v1/completions", {"prompt": "a", "suffix": "x"}, "suffix"),
    ("/v1/completions", {"prompt": "a", "frobnicate": 1}, "frobnicate"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content[0].type"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "yaml"}},
     "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": "2"}, "n"),
    ("/tokenize", {"text": 5}, "text"),
    ("/detokenize", {"tokens": [1, 999]}, "tokens[1]"),
    ("/detokenize", {}, "tokens"),
    ("/abort_request", {}, "rid"),
]


@pytest.mark.parametrize("path,body,needle", BAD, ids=[f"{p}:{n}" for p, _, n in BAD])
def test_bad_input_is_400_naming_the_field(client, path, body, needle):
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    msg = r.json()["error"]["message"]
    assert needle in msg, msg
    assert client.get("/health").status_code == 200


def test_bad_stream_request_is_400_before_streaming(client):
    r = client.post("/generate", json={"text": "a", "stream": True, "sampling_params": {"top_k": 0}})
    assert r.status_code == 400 and "top_k" in r.json()["error"]["message"]


def test_oversize_body_rejected(engine):
    with TestClient(create_app(engine, ServerConfig(max_body_bytes=1000))) as c:
        r = c.post("/generate", json={"text": "a" * 2000})
        assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]["message"]
        assert c.post("/generate", json={"text": "a", "sampling_params": {"max_new_tokens": 1}}).status_code == 200


def test_unknown_route_is_json_404(client):
    r = client.get("/nope")
    assert r.status_code == 404 and "error" in r.json()


def test_api_key(engine):
    with TestClient(create_app(engine, ServerConfig(api_key="sekret"))) as c:
        assert c.get("/health").status_code == 200
        for path in ("/get_model_info", "/v1/models", "/metrics", "/server_info"):
            assert c.get(path).status_code == 401, path
        assert c.post("/generate", json={"text": "a"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        h = {"Authorization": "Bearer sekret"}
        assert c.get("/v1/models", headers=h).status_code == 200
        r = c.post("/generate", json={"text": "a", "sampling_params": {"max_new_tokens": 1}}, headers=h)
        assert r.status_code == 200 and r.json()["text"] == "b"
        si = c.get("/server_info", headers=h).json()
        assert si["server"]["api_key"] == "***"


# ---------------------------------------------------------------------------------------------------
# live server: disconnects, aborts, the openai client, the SGLang frontend
# ---------------------------------------------------------------------------------------------------

def _raw_post(port: int, path: str, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
              % (path.encode(), len(data)) + data)
    return s


def _read_until(s: socket.socket, needle: bytes) -> bytes:
    buf = b""
    while needle not in buf:
        chunk = s.recv(4096)
        assert chunk, buf
        buf += chunk
    return buf


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts(live, stream):
    eng = live.engine
    rid = f"disconnect-{stream}"
    s = _raw_post(live.port, "/generate", {"text": "a", "rid": rid, "stream": stream,
                                           "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}})
    wait_until(lambda: rid in eng.running, what="request start")
    if stream:
        _read_until(s, b"data: ")
    s.close()
    wait_until(lambda: rid in eng.aborted_rids, what="abort after disconnect")
    wait_until(lambda: rid not in eng.running)
    eng.check_integrity()


def test_abort_request_route(live):
    eng = live.engine
    result = {}

    def call():
        result["r"] = requests.post(live.url + "/generate", timeout=30, json={
            "text": "a", "rid": "to-abort", "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}})

    th = threading.Thread(target=call)
    th.start()
    wait_until(lambda: "to-abort" in eng.running, what="request start")
    assert requests.post(live.url + "/abort_request", json={"rid": "to-abort"}, timeout=10).json() == {"success": True}
    th.join(10)
    m = result["r"].json()["meta_info"]
    assert m["finish_reason"]["type"] == "abort" and m["completion_tokens"] < 400


def test_abort_request_by_openai_id(live):
    eng = live.engine
    result = {}

    def call():
        result["r"] = requests.post(live.url + "/v1/completions", timeout=30, json={
            "prompt": "a", "rid": "cmpl-mine", "n": 2, "max_tokens": 400, "ignore_eos": True})

    th = threading.Thread(target=call)
    th.start()
    wait_until(lambda: {"cmpl-mine-0", "cmpl-mine-1"} <= set(eng.running), what="request start")
    assert requests.post(live.url + "/abort_request", json={"rid": "cmpl-mine"}, timeout=10).json()["success"] is True
    th.join(10)
    assert [c["finish_reason"] for c in result["r"].json()["choices"]] == ["abort", "abort"]


def test_openai_client(live):
    import openai

    c = openai.OpenAI(base_url=live.url + "/v1", api_key="none")
    assert c.models.list().data[0].id == "fake/byte-model"
    r = c.completions.create(model="m", prompt="abc", max_tokens=4, n=2, logprobs=1)
    assert [ch.text for ch in r.choices] == ["defg", "defg"]
    assert r.choices[0].logprobs.tokens == ["d", "e", "f", "g"]
    assert r.usage.prompt_tokens == 4 and r.usage.completion_tokens == 8
    r = c.completions.create(model="m", prompt="abc", max_tokens=20, stop=["h"], extra_body={"top_k": 3})
    assert r.choices[0].text == "defg" and r.choices[0].finish_reason == "stop"
    pieces = [ch.choices[0].text for ch in c.completions.create(model="m", prompt="abc", max_tokens=3, stream=True)]
    assert "".join(pieces) == "def"
    r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                  logprobs=True, top_logprobs=2, seed=1, n=2)
    assert [ch.message.content for ch in r.choices] == ["?@A", "?@A"]
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].logprobs.content[0].token == "?"
    assert len(r.choices[0].logprobs.content[0].top_logprobs) == 2
    assert r.usage.prompt_tokens_details.cached_tokens >= 0
    stream = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "?@A"
    assert chunks[-1].usage.completion_tokens == 3
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], temperature=-1)
    assert "temperature" in str(e.value)


@pytest.fixture
def sgl_backend(live):
    import sglang as sgl

    backend = sgl.RuntimeEndpoint(live.url)
    sgl.set_default_backend(backend)
    yield sgl
    sgl.set_default_backend(None)


def test_sglang_frontend_gen_select(sgl_backend):
    sgl = sgl_backend

    @sgl.function
    def prog(s, prefix):
        s += prefix
        s += sgl.gen("x", max_tokens=4)
        s += ";abc"
        s += sgl.select("pick", choices=["x", "de", "q"])
        s += sgl.gen("y", max_tokens=10, stop="i")

    state = prog.run(prefix="abc")
    assert state["x"] == "defg"
    assert state["pick"] == "de"
    assert state["y"] == "fgh"
    assert state.text() == "abcdefg;abcdefgh"


def test_sglang_frontend_fork_and_join(sgl_backend):
    sgl = sgl_backend

    @sgl.function
    def prog(s):
        s += "abc"
        forks = s.fork(2)
        for i, f in enumerate(forks):
            f += sgl.gen("g", max_tokens=2 + i)
        forks.join()
        s += "|" + forks[0]["g"] + "|" + forks[1]["g"]

    assert prog.run().text() == "abc|de|def"

    @sgl.function
    def prog2(s):
        s += "abc"
        forks = s.fork(2)
        for i, f in enumerate(forks):
            f += sgl.gen("g", max_tokens=1 + i)
        forks.join("concate_and_append")

    assert prog2.run().text() == "abcdde"


def test_sglang_frontend_stream_and_batch(sgl_backend):
    sgl = sgl_backend

    @sgl.function
    def prog(s, p):
        s += p
        s += sgl.gen("x", max_tokens=5)

    state = prog.run(p="abc", stream=True)
    assert "".join(state.text_iter("x")) == "defgh"
    states = prog.run_batch([{"p": "abc"}, {"p": "pq"}, {"p": "x"}], progress_bar=False)
    assert [st["x"] for st in states] == ["defgh", "rstuv", "yz"]
    assert sgl.global_config is not None


# ---------------------------------------------------------------------------------------------------
# subprocess: SIGTERM drains gracefully
# ---------------------------------------------------------------------------------------------------

def test_sigterm_graceful_shutdown():
    port = free_port()
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "fake_engine.py"), "--port", str(port),
                             "--delay", "0.02", "--drain-timeout", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _up(url), timeout=60, what="subprocess server")

        # a client that disconnects mid-stream gets its request aborted
        s = _raw_post(port, "/generate", {"text": "a", "rid": "gone", "stream": True,
                                          "sampling_params": {"max_new_tokens": 500, "ignore_eos": True}})
        _read_until(s, b"data: ")
        s.close()
        wait_until(lambda: "gone" in requests.get(url + "/server_info", timeout=5).json()["stats"]["aborted_rids"],
                   what="abort of the disconnected stream")

        results: dict = {}

        def long_stream():
            with requests.post(url + "/generate", stream=True, timeout=60, json={
                    "text": "a", "stream": True, "sampling_params": {"max_new_tokens": 500, "ignore_eos": True}}) as r:
                results["long_stream"] = [ln for ln in r.iter_lines(decode_unicode=True) if ln]

        def long_plain():
            results["long_plain"] = requests.post(url + "/generate", timeout=60, json={
                "text": "a", "sampling_params": {"max_new_tokens": 500, "ignore_eos": True}}).json()

        def short():
            results["short"] = requests.post(url + "/generate", timeout=60, json={
                "text": "a", "sampling_params": {"max_new_tokens": 40, "ignore_eos": True}}).json()

        def inflight():
            return requests.get(url + "/server_info", timeout=5).json()["num_inflight_requests"]

        threads = [threading.Thread(target=f, daemon=True) for f in (long_stream, long_plain, short)]
        for t in threads[:2]:
            t.start()
        wait_until(lambda: inflight() == 2, what="two long requests in flight")
        threads[2].start()
        wait_until(lambda: inflight() == 3, what="the short request in flight")
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        try:  # no longer accepting: refused, or 503 on a kept-alive connection
            r = requests.get(url + "/health", timeout=2)
            assert r.status_code == 503
        except requests.ConnectionError:
            pass
        for t in threads:
            t.join(30)
        out, _ = proc.communicate(timeout=30)
        elapsed = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    # the short request finished inside the drain window
    assert results["short"]["meta_info"]["finish_reason"] == {"type": "length", "length": 40}
    # the long ones were aborted after the drain timeout, each with an abort reply
    assert results["long_plain"]["meta_info"]["finish_reason"]["type"] == "abort"
    lines = results["long_stream"]
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][len("data: "):])
    assert last["meta_info"]["finish_reason"]["type"] == "abort"
    assert 2.5 < elapsed < 25
    assert "FakeEngine.shutdown open=0" in out


def _up(url: str) -> bool:
    try:
        return requests.get(url + "/health", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def test_lp_constants():
    assert math.isclose(math.exp(LP_NEXT) + 257 * math.exp(LP_OTHER), 1.0)


def test_non_streaming_calls_ask_the_engine_for_the_final_event_only(client, engine):
    gen(client, text="abc", sampling_params={"max_new_tokens": 2})
    assert engine.calls[-1]["stream"] is False
    client.post("/generate", json={"text": "abc", "sampling_params": {"max_new_tokens": 2}, "stream": True})
    assert engine.calls[-1]["stream"] is True


@pytest.mark.timeout(60)
def test_fake_engine_keeps_the_engine_protocol():
    from protocol_checks import check_engine_protocol

    check_engine_protocol(FakeEngine(delay=0.01), [104, 105])


@pytest.mark.timeout(60)
def test_requests_are_prepared_off_the_event_loop(client, engine):
    assert client.post("/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 2}}).status_code == 200
    assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
    assert client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                     "max_tokens": 2}).status_code == 200
    assert engine.prepared_on_loop == 0 and len(engine.calls) == 3


@pytest.mark.timeout(60)
def test_dead_engine_is_503_on_health_and_new_requests(client, engine):
    engine.dead = True
    r = client.get("/health")
    assert r.status_code == 503 and "dead" in r.json()["error"]["message"]
    for path, body in (("/generate", {"text": "hi"}), ("/v1/completions", {"prompt": "hi"})):
        r = client.post(path, json=body)
        assert r.status_code == 503 and "dead" in r.json()["error"]["message"], (path, r.text)
    r = client.post("/generate", json={"text": "hi", "stream": True})
    assert r.status_code == 503
    engine.dead = False


def test_fields_sglang_gateway_sends_are_accepted(client):
    """SGLang's gateway forwards these with their defaults; values that would change the answer are refused."""
    m = [{"role": "user", "content": "hi"}]
    r = client.post("/generate", json={"text": "hi", "model": None, "background": False, "return_bytes": False,
                                       "return_entropy": False, "sampling_params": {"max_new_tokens": 2}})
    assert r.status_code == 200, r.text
    r = client.post("/v1/chat/completions", json={"model": "x", "messages": m, "max_tokens": 2,
                                                  "continue_final_message": False, "return_hidden_states": False,
                                                  "separate_reasoning": True, "stream_reasoning": True})
    assert r.status_code == 200, r.text
    r = client.post("/v1/chat/completions", json={"model": "x", "messages": m, "continue_final_message": True})
    assert r.status_code == 400 and "continue_final_message" in r.text
    r = client.post("/generate", json={"text": "hi", "return_bytes": True})
    assert r.status_code == 400 and "return_bytes" in r.text
