"""The frontend language on the real model, on all three backends, and against upstream's frontend.

One server (`python -m sgl_jax.serve --config configs/smollm2-135m.yaml`) and one in-process engine on the
same preset. Each program below is a rewrite (not an import) of one of upstream SGLang's frontend test
programs; it runs on the in-process `EngineBackend`, on `RuntimeEndpoint` to the server, and on `OpenAI` to
the server's `/v1`. Assertions about the protocol and structure are strict; about answer quality, loose
(SmolLM2-135M). Then: the same programs give the same greedy text through our frontend and upstream's
(`sglang==0.5.10`) against the same server; `select` decides as upstream's client does; and the in-process
backend's cache accounting (fork computes the shared prefix once, a chain recomputes nothing it sent).
"""

from __future__ import annotations

import json
import os
import re

import pytest

import sgl_jax.program as sgl

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "smollm2-135m.yaml")
BACKENDS = ("engine", "http", "openai")


@pytest.fixture(scope="module")
def engine_backend():
    # warmup off: only the shapes the tests reach compile, as in the server beside it (start-up and warmup have
    # tests of their own)
    be = sgl.EngineBackend(CONFIG, warmup=False)
    yield be
    be.shutdown()


@pytest.fixture(scope="module")
def backends(server, engine_backend):
    return {"engine": engine_backend, "http": sgl.RuntimeEndpoint(server.url),
            "openai": sgl.OpenAI("default", base_url=server.url + "/v1", api_key="none", is_chat_model=False),
            "openai-chat": sgl.OpenAI("default", base_url=server.url + "/v1", api_key="none", is_chat_model=True)}


def chat_backend(backends, name):
    return backends["openai-chat"] if name == "openai" else backends[name]


# ------------------------------------------------------------------------------------------- programs
@sgl.function
def few_shot_qa(s, question):
    s += "The following are questions with short answers.\n"
    s += "Q: What is the capital of France?\nA: Paris\n"
    s += "Q: What is the capital of Germany?\nA: Berlin\n"
    s += "Q: What is the capital of Italy?\nA: Rome\n"
    s += "Q: " + question + "\nA:" + sgl.gen("answer", stop="\n", max_tokens=16)


@sgl.function
def mt_bench(s, q1, q2):
    s += sgl.system("You are a helpful assistant.")
    s += sgl.user(q1)
    s += sgl.assistant(sgl.gen("a1", max_tokens=24))
    s += sgl.user(q2)
    s += sgl.assistant(sgl.gen("a2", max_tokens=24))


@sgl.function
def select_capital(s):
    s += "Q: What is the capital of France?\nA: The capital of France is"
    s += sgl.select("city", choices=[" Paris", " London", " Tokyo"])


@sgl.function
def decode_int(s):
    s += "Q: How many days are there in a week?\nA: The number is " + sgl.gen_int("n", max_tokens=4)


@sgl.function
def json_regex(s):
    s += "Describe Paris as JSON with its name and country.\n"
    s += sgl.gen("json", max_tokens=48,
                 regex=r'\{"name": "[A-Za-z ]{1,16}", "country": "[A-Za-z ]{1,16}", "population": [0-9]{1,8}\}')


@sgl.function
def expert_answer(s, question):
    s += "Question: " + question + "\n"
    s += "Which expert should answer it? The best expert is a" + sgl.select(
        "expert", choices=[" physicist", " chef", " lawyer"]) + ".\n"
    s += "Answer from that expert:" + sgl.gen("answer", max_tokens=16, stop="\n")


@sgl.function
def tool_use(s, question):
    s += "To answer '" + question + "', the tool to use is the" + sgl.select(
        "tool", choices=[" calculator", " search engine"]) + "."


@sgl.function
def parallel_decoding(s, topic):
    s += "Here are three short tips about " + topic + ".\n"
    forks = s.fork(3)
    forks += lambda i: f"Tip {i + 1}:" + sgl.gen("tip", max_tokens=12, stop="\n") + "\n"
    forks.join()
    s += "In summary:" + sgl.gen("summary", max_tokens=12, stop="\n")


@sgl.function
def parallel_encoding(s, docs):
    s += "Read the documents.\n"
    forks = s.fork(len(docs))
    forks += lambda i: f"Document {i + 1}: {docs[i]}\n"
    forks.join("concate_and_append")
    s += "Question: which document mentions a river?\nAnswer: Document" + sgl.gen("which", max_tokens=3, stop="\n")


@sgl.function
def stream_program(s):
    s += "Q: Write one sentence about the sea.\nA:" + sgl.gen("ans", max_tokens=16, stop="\n")


@sgl.function
def regex_ip(s):
    s += "Q: What is the IP address of the Google DNS servers?\nA: "
    s += sgl.gen("ip", max_tokens=20, regex=r"((25[0-5]|2[0-4]\d|[01]?\d\d?)\.){3}(25[0-5]|2[0-4]\d|[01]?\d\d?)")


@sgl.function
def dtype_gen(s):
    s += "Q: What is 12 + 30?\nA: " + sgl.gen("int_res", dtype=int, max_tokens=6) + "\n"
    s += "Q: What is 0.5 + 0.25?\nA: " + sgl.gen("float_res", dtype=float, max_tokens=8) + "\n"
    s += "Q: Is the sky blue? (True/False)\nA: " + sgl.gen("bool_res", dtype=bool, max_tokens=4) + "\n"
    s += "Q: Name a fruit in quotes.\nA: " + sgl.gen("str_res", dtype=str, max_tokens=10) + "\n"


@sgl.function
def react_loop(s, question):
    s += "Answer the question by thinking, then searching or finishing.\nQuestion: " + question + "\n"
    for step in range(3):
        s += f"Thought {step + 1}:" + sgl.gen(f"thought_{step}", max_tokens=12, stop="\n") + "\n"
        s += f"Action {step + 1}:" + sgl.select(f"action_{step}", choices=[" Search", " Finish"]) + "\n"
        if s[f"action_{step}"] == " Finish":
            break
        s += f"Observation {step + 1}: Paris is the capital and largest city of France.\n"


@sgl.function
def min_tokens(s):
    s += "Say hi." + sgl.gen("out", min_tokens=10, max_tokens=12, stop=".")


# ------------------------------------------------------------------------------------------- on every backend
@pytest.mark.parametrize("name", BACKENDS)
def test_programs_on_every_backend(backends, name):
    be = backends[name]
    run = dict(backend=be, temperature=0)

    st = few_shot_qa.run(question="What is the capital of Spain?", **run)
    assert st.error() is None and "\n" not in st["answer"] and "Madrid" in st["answer"]

    st = mt_bench.run(q1="Name a color.", q2="Name another one.", backend=chat_backend(backends, name),
                      temperature=0)
    msgs = st.messages()
    assert st.error() is None and [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert msgs[2]["content"] == st["a1"].strip() and st["a1"] and st["a2"]

    assert select_capital.run(**run)["city"] == " Paris"

    st = decode_int.run(**run)
    assert re.fullmatch(r"[-+]?[0-9]+[ \n]*", st["n"]) and int(st["n"]) >= 0  # 135M: the number varies

    js = json.loads(json_regex.run(**run)["json"])
    assert set(js) == {"name", "country", "population"}

    st = expert_answer.run(question="Why is the sky blue?", **run)
    assert st["expert"] in (" physicist", " chef", " lawyer") and st.error() is None

    assert tool_use.run(question="What is 23 * 17?", **run)["tool"] in (" calculator", " search engine")

    st = parallel_decoding.run(topic="staying healthy", **run)
    assert len(st["tip"]) == 3 and all(isinstance(t, str) for t in st["tip"]) and st.error() is None

    st = parallel_encoding.run(docs=["The Nile is a long river.", "Bread is made of flour."], **run)
    assert "Document 1: The Nile" in st.text() and "Document 2: Bread" in st.text() and st.error() is None

    st = regex_ip.run(**run)
    assert re.fullmatch(r"(\d{1,3}\.){3}\d{1,3}", st["ip"])

    st = dtype_gen.run(**run)
    int(st["int_res"]), float(st["float_res"])
    assert st["bool_res"] in ("True", "False") and re.fullmatch(r'"[\w\d\s]*"', st["str_res"])

    st = react_loop.run(question="What is the capital of France?", **run)
    assert st.error() is None and st["action_0"] in (" Search", " Finish")

    st = min_tokens.run(**run)
    assert st.get_meta_info("out")["completion_tokens"] >= 10


@pytest.mark.parametrize("name", BACKENDS)
def test_stream_matches_the_non_streamed_run(backends, name):
    be = backends[name]
    full = stream_program.run(backend=be, temperature=0)
    st = stream_program.run(backend=be, temperature=0, stream=True)
    chunks = list(st.text_iter("ans"))
    assert "".join(chunks) == full["ans"]
    if name == "engine":
        assert len(chunks) > 1  # streamed token by token, not all at the end


@pytest.mark.parametrize("name", BACKENDS)
def test_stream_with_logprobs(backends, name):
    @sgl.function
    def prog(s):
        s += "Count: one, two," + sgl.gen("x", max_tokens=6, return_logprob=True, top_logprobs_num=2)

    st = prog.run(backend=backends[name], temperature=0, stream=True)
    pieces = list(st.text_iter("x"))
    meta = st.get_meta_info("x")
    assert "".join(pieces) == st["x"] and len(meta["output_token_logprobs"]) >= 1
    assert all(len(t) == 2 for t in meta["output_top_logprobs"] if t)
    full = prog.run(backend=backends[name], temperature=0)  # greedy: the sampled token is the top-1
    entries = full.get_meta_info("x")["output_token_logprobs"]
    assert [e[0] for e in entries] == pytest.approx([t[0][0] for t in full.get_meta_info("x")["output_top_logprobs"]],
                                                    abs=1e-4)


# ------------------------------------------------------------------------------------------- vs upstream
SELECT_PROMPTS = [
    ("The capital of France is", [" Paris", " London", " Berlin"]),
    ("The capital of France is ", ["Paris", "London", "Berlin"]),  # the prompt ends in a space
    ("Is water wet? Answer yes or no. Answer:", [" yes", " no"]),
    # a prefix of exactly 32 tokens (two full pages of 16): the window starts inside the cached pages
    ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
     "seventeen eighteen nineteen twenty twenty-one twenty-two twenty-three twenty-four. Next:",
     [" twenty-five", " thirty", " one"]),
]


def test_our_frontend_and_upstreams_give_the_same_greedy_text(server, backends):
    import sglang as upstream

    up = upstream.RuntimeEndpoint(server.url)
    ours = backends["http"]

    def up_prog(s, question):
        s += "Q: " + question + "\nA:" + upstream.gen("answer", stop="\n", max_tokens=16)
        s += "\nQ: Is that right?\nA:" + upstream.select("ok", choices=[" Yes", " No"])
        forks = s.fork(2)
        forks += lambda i: f"\nReason {i}:" + upstream.gen("why", max_tokens=8, stop="\n")
        forks.join()

    def our_prog(s, question):
        s += "Q: " + question + "\nA:" + sgl.gen("answer", stop="\n", max_tokens=16)
        s += "\nQ: Is that right?\nA:" + sgl.select("ok", choices=[" Yes", " No"])
        forks = s.fork(2)
        forks += lambda i: f"\nReason {i}:" + sgl.gen("why", max_tokens=8, stop="\n")
        forks.join()

    for q in ("What is the capital of Spain?", "What color is grass?"):
        a = upstream.function(up_prog).run(question=q, backend=up, temperature=0)
        b = sgl.function(our_prog).run(question=q, backend=ours, temperature=0)
        assert (a.text(), a["answer"], a["ok"], a["why"]) == (b.text(), b["answer"], b["ok"], b["why"])
        c = sgl.function(our_prog).run(question=q, backend=backends["engine"], temperature=0)
        assert (c["answer"], c["ok"]) == (a["answer"], a["ok"])


@pytest.mark.parametrize("method", ["token_length_normalized", "greedy_token_selection",
                                    "unconditional_likelihood_normalized"])
def test_select_decides_as_upstreams_client(server, backends, method):
    import sglang as upstream
    from sglang.lang import choices as up_choices

    up = upstream.RuntimeEndpoint(server.url)
    names = ["engine", "http"] + (["openai"] if method != "unconditional_likelihood_normalized" else [])
    # every prompt for the default method; the two hard ones (a trailing space, a page-boundary prefix) for
    # the others (suite time)
    prompts = SELECT_PROMPTS if method == "token_length_normalized" else [SELECT_PROMPTS[1], SELECT_PROMPTS[3]]
    # (the OpenAI API returns no token ids, so the unconditional request cannot be made through it)
    for prompt, choices in prompts:
        def up_prog(s):
            s += prompt + upstream.select("c", choices=choices, choices_method=getattr(up_choices, method))

        ref = upstream.function(up_prog).run(backend=up)
        assert ref.error() is None, ref.error()  # upstream's client did crash here before (no default window entry)
        ref = ref["c"]
        got = {}
        for n in names:
            st = sgl.function(lambda s: s.__iadd__(prompt + sgl.select("c", choices=choices,
                                                                       choices_method=getattr(sgl, method)))
                              ).run(backend=backends[n])
            assert st.error() is None, (n, st.error())
            got[n] = st["c"]
        assert len(set(got.values())) == 1, (prompt, got)
        assert got["http"] == ref, (prompt, method, got, ref)


@pytest.mark.timeout(300)
def test_select_on_an_idle_engine_takes_one_step_and_under_load_two_requests(engine_backend):
    """In-process `select`: with the engine idle and its prefix cached but for a short question, the choices go
    alone and their step computes the question once (one step, one request per choice, the later choices on the
    first's pages and rows); with another request running, the prefix goes first (one request more). Both decide
    alike."""
    engine = engine_backend.engine
    ctx = "Answer each question with one word.\n" + "Q: What colour is the sky?\nA: blue\n" * 8
    choices = [" Paris", " London", " Berlin"]

    @sgl.function
    def prog(s, q):
        s += ctx + "Q: " + q + "\nA:" + sgl.select("c", choices=choices)

    engine.flush_cache()
    assert prog.run(q="Where is the Louvre?", backend=engine_backend).error() is None  # caches ctx
    q = ("Which city is the capital of France, the one on the river Seine, with the Eiffel Tower, the Louvre "
         "and Notre-Dame in it?")  # a few pages past the cached context
    before = engine.stats()
    idle = prog.run(q=q, backend=engine_backend)
    after = engine.stats()
    assert idle.error() is None and idle["c"] == " Paris"
    assert after["num_steps"] - before["num_steps"] == 1
    assert after["num_requests"] - before["num_requests"] == len(choices)
    assert after["shared_in_step"] - before["shared_in_step"] == len(choices) - 1
    assert after["borrowed_tokens"] > before["borrowed_tokens"]
    engine.flush_cache()
    assert prog.run(q="Where is the Louvre?", backend=engine_backend).error() is None
    busy = engine.generate(prompt="Count slowly:", sampling_params={"max_new_tokens": 400, "ignore_eos": True},
                           stream=True)
    next(busy)  # it is running
    before = engine.stats()
    loaded = prog.run(q=q, backend=engine_backend)
    after = engine.stats()
    busy.close()
    assert loaded.error() is None and loaded["c"] == idle["c"]
    assert after["num_requests"] - before["num_requests"] == len(choices) + 1
    assert after["shared_in_step"] == before["shared_in_step"]


# ------------------------------------------------------------------------------------------- cache accounting
def _counters(engine):
    st = engine.stats()
    return st["prompt_tokens"], st["cached_tokens"]


def test_fork_computes_the_shared_prefix_once(engine_backend):
    engine = engine_backend.engine
    engine.flush_cache()
    prefix = "Here is a long shared context about the history of the city. " * 6

    @sgl.function
    def prog(s):
        s += prefix
        forks = s.fork(8)
        forks += lambda i: f" Fact {i}:" + sgl.gen("f", max_tokens=1)
        forks.join()

    p0, c0 = _counters(engine)
    st = prog.run(backend=engine_backend, temperature=0)
    p1, c1 = _counters(engine)
    assert st.error() is None and engine.num_prefix_holds == 0  # every hold was released
    tok = engine.tokenizer
    P = len(tok.encode(prefix))
    suffixes = [len(tok.encode(f" Fact {i}:", add_special_tokens=False)) for i in range(8)]
    computed = (p1 - p0) - (c1 - c0)
    # the prefix once, then each branch at most its suffix (and at most the prefix's last token again); at
    # least every distinct prefix of the 8 prompts once (a branch admitted after another may copy the suffix
    # tokens they share, " Fact", from its page); without the shared prefill and hold each branch would
    # compute the whole prefix: 8 * P more
    ids = [tok.encode(prefix) + tok.encode(f" Fact {i}:", add_special_tokens=False) for i in range(8)]
    distinct = len({tuple(x[:k]) for x in ids for k in range(1, len(x) + 1)})
    assert distinct <= computed <= P + sum(suffixes) + 8, (computed, distinct, P, suffixes)
    # again, the prefix now cached: no prefill request, only the hold; the branches compute their suffixes
    p0, c0 = _counters(engine)
    assert prog.run(backend=engine_backend, temperature=0).error() is None
    p1, c1 = _counters(engine)
    assert (p1 - p0) == 8 * P + sum(suffixes)  # 8 branch prompts and nothing else was sent
    # (the first run's branches are cached too, so a branch may reuse part of its own suffix)
    assert (p1 - p0) - (c1 - c0) <= sum(suffixes) + 8 * engine.config.cache.page_size


def test_a_call_chain_recomputes_nothing_it_already_sent(engine_backend):
    engine = engine_backend.engine
    page = engine.config.cache.page_size
    engine.flush_cache()

    @sgl.function
    def chain(s):
        s += "A story about a cat. " * 4 + "Line 1:" + sgl.gen("a", max_tokens=12, ignore_eos=True)
        s += " Line 2:" + sgl.gen("b", max_tokens=12, ignore_eos=True)
        s += " Line 3:" + sgl.gen("c", max_tokens=12, ignore_eos=True)

    st = chain.run(backend=engine_backend, temperature=0)
    metas = [st.get_meta_info(k) for k in "abc"]
    for prev, cur in zip(metas, metas[1:]):
        sent = prev["prompt_tokens"] + prev["completion_tokens"]
        assert cur["cached_tokens"] >= (sent // page) * page, (prev, cur)
