"""The frontend language's semantics on scripted backends (no model): sampling merges, roles and the chat
template, fork/join, var_scope, errors before any request, run_batch isolation, streaming, async, API
speculation, and the choice methods against upstream SGLang's own implementation (`sglang==0.5.10`, a test
dependency) on fixed logprob inputs.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import time
import subprocess
import sys
import threading

import pytest

import sgl_jax.program as sgl
from sgl_jax.program import ir
from sgl_jax.program.backends.base import Backend, Completion
from sgl_jax.program.chat_template import ChatTemplate
from sgl_jax.program.speculative import first_stop
from sgl_jax.program.choices import ChoicesDecision

pytestmark = pytest.mark.timeout(60)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOL_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                 "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")


class Scripted(Backend):
    """Answers gen i with `answers[i]` (or 'out<i>'), records every call; select picks by a fixed score."""

    def __init__(self, answers=(), template: ChatTemplate | None = None, barrier: threading.Barrier | None = None,
                 fail_on: str | None = None, is_chat_model: bool = False):
        self.answers, self.calls, self.prefills = list(answers), [], []
        self.template, self.barrier, self.fail_on = template, barrier, fail_on
        self.is_chat_model = is_chat_model
        self.lock = threading.Lock()

    def get_chat_template(self):
        return self.template or super().get_chat_template()

    def generate(self, prompt, params):
        if self.barrier is not None:
            self.barrier.wait(timeout=10)  # every branch's call is in flight at once, or this times out
        with self.lock:
            self.calls.append((prompt, params))
            i = len(self.calls) - 1
        if self.fail_on is not None and self.fail_on in prompt.text:
            raise RuntimeError(f"backend refused {self.fail_on!r}")
        text = self.answers[i] if i < len(self.answers) else f"out{i}"
        return Completion([f"{text}#{j}" for j in range(params.n)] if params.n > 1 else text, {"call": i})

    def generate_stream(self, prompt, params):
        with self.lock:
            self.calls.append((prompt, params))
        for piece in ("al", "pha", " beta"):
            yield piece, {"piece": piece}
            time.sleep(0.05)  # a model's pace: the reader sees each piece before the next

    def select(self, prompt, choices, temperature, method):
        self.calls.append((prompt, "select"))
        best = max(choices, key=len)
        return ChoicesDecision(best, {"scores": [len(c) for c in choices]}), None

    def prefill(self, prompt, hold=False):
        self.prefills.append(prompt.text)
        return None, None


def test_sampling_defaults_merge_with_gen_overrides():
    be = Scripted()

    @sgl.function
    def prog(s):
        s += "a" + sgl.gen("x", max_tokens=3)
        s += sgl.gen("y", temperature=0.7, stop=["!"], top_k=5)

    st = prog.run(backend=be, temperature=0.2, max_new_tokens=9, stop="\n", top_p=0.5)
    p1, p2 = be.calls[0][1], be.calls[1][1]
    assert (p1.max_new_tokens, p1.temperature, p1.top_p, p1.stop) == (3, 0.2, 0.5, "\n")
    assert (p2.max_new_tokens, p2.temperature, p2.stop, p2.top_k) == (9, 0.7, ("!",), 5)
    assert st["x"] == "out0" and st["y"] == "out1" and st.text() == "aout0out1"
    sp, top = p2.native()
    assert sp["stop"] == ["!"] and sp["top_k"] == 5 and top == {}


def test_a_program_argument_named_like_a_run_parameter_stays_the_programs():
    be = Scripted()

    @sgl.function
    def prog(s, n, stop="!"):
        s += f"{n}{stop}" + sgl.gen("x")

    st = prog.run(n=3, stop="?", backend=be, temperature=0)
    assert st.text() == "3?out0" and be.calls[0][1].n == 1 and be.calls[0][1].stop == ()
    assert prog.run_batch([{"n": 4}], backend=be)[0].text() == "4!out1"


def test_dtype_and_regex_are_sent_as_regex():
    be = Scripted()

    @sgl.function
    def prog(s):
        s += sgl.gen_int("n") + sgl.gen_string("w") + sgl.gen("r", regex="[ab]+", dtype=None)

    prog.run(backend=be)
    regs = [c[1].native()[0]["regex"] for c in be.calls]
    assert regs == [ir.REGEX_INT, ir.REGEX_STR, "[ab]+"]


def test_roles_render_exactly_as_the_models_template():
    from sgl_jax.models.tokenizer import render_chat_template

    t = ChatTemplate.from_jinja(SMOL_TEMPLATE)
    be = Scripted(["Paris.", "Rome."], template=t)

    @sgl.function
    def chat(s):
        s += sgl.user("Capital of France?")
        s += sgl.assistant(sgl.gen("a1"))
        with s.user():
            s += "And Italy?"
        s += sgl.assistant_begin() + sgl.gen("a2") + sgl.assistant_end()

    st = chat.run(backend=be)
    msgs = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And Italy?"}, {"role": "assistant", "content": "Rome."}]
    assert st.text() == render_chat_template(SMOL_TEMPLATE, msgs, add_generation_prompt=False)
    assert st.messages()[0]["role"] == "system" and st.messages()[1:] == msgs
    # the first gen saw the template's generation prompt
    assert be.calls[0][0].text == render_chat_template(SMOL_TEMPLATE, msgs[:1], add_generation_prompt=True)
    assert be.calls[0][1].stop == ("<|im_end|>",)


@pytest.mark.parametrize("build, message", [
    (lambda: sgl.gen("x", foo=1), "gen() got an unexpected keyword argument 'foo'"),
    (lambda: sgl.select("x", choices=[]), "select: 'choices' is empty"),
    (lambda: sgl.gen("x", choices=[]), "gen: 'choices' is empty"),
    (lambda: sgl.gen("x", regex="(ab"), "gen: 'regex' '(ab' does not compile"),
    (lambda: sgl.gen("x", json_schema="{not json"), "gen: 'json_schema' is not valid JSON"),
    (lambda: sgl.gen("x", dtype=list), "gen: 'dtype' must be one of"),
    (lambda: sgl.gen("x", max_tokens=-1), "gen: 'max_tokens' must be an int >= 0"),
])
def test_bad_arguments_raise_naming_primitive_and_argument(build, message):
    with pytest.raises((TypeError, sgl.ProgramError), match=re.escape(message)):
        build()


def test_nested_role_raises_before_any_request():
    be = Scripted()

    @sgl.function
    def prog(s):
        s += "hi" + sgl.gen("x")
        s += sgl.user_begin()
        s += sgl.assistant_begin()

    with pytest.raises(sgl.ProgramError, match="assistant: role begun inside role 'user'"):
        prog.run(backend=be)
    with pytest.raises(sgl.ProgramError, match="user_end: no 'user' turn is open"):
        sgl.function(lambda s: s.__iadd__(sgl.user_end())).run(backend=be)


def test_fork_branches_run_concurrently_and_join_gathers():
    be = Scripted(barrier=threading.Barrier(3))

    @sgl.function
    def prog(s):
        s += "Q:"
        forks = s.fork(3)
        forks += lambda i: f" b{i}=" + sgl.gen("v", max_tokens=2)
        forks.join()
        s += " done"

    st = prog.run(backend=be)
    assert sorted(st["v"]) == ["out0", "out1", "out2"]
    assert st.text() == "Q: done"
    assert be.prefills == ["Q:"]  # the shared prefix is prefilled once, before the branches
    assert sorted(c[0].text for c in be.calls) == ["Q: b0=", "Q: b1=", "Q: b2="]


class Holding(Scripted):
    """Prefill returns a hold handle; releases are recorded."""

    def __init__(self):
        super().__init__()
        self.released = []

    def prefill(self, prompt, hold=False):
        self.prefills.append(prompt.text)
        return (f"hold-{len(self.prefills)}" if hold else None), None

    def release(self, handle):
        self.released.append(handle)


def test_a_fork_hold_is_released_once_whether_or_not_the_fork_is_joined():
    be = Holding()

    @sgl.function
    def joined(s):
        s += "P"
        f = s.fork(3)
        f += sgl.gen("x")
        f.join()

    @sgl.function
    def never_joined(s):
        s += "Q"
        f = s.fork(2)
        f[0] += sgl.gen("y")  # branch 1 never calls: its hold share is released when the program ends
        f[0]["y"]

    joined.run(backend=be)
    assert be.released == ["hold-1"]
    never_joined.run(backend=be)
    assert be.released == ["hold-1", "hold-2"]


def test_fork_forms_and_concate_and_append():
    be = Scripted(["A", "B"])

    @sgl.function
    def prog(s):
        s += "P"
        f = s.fork(2)
        f += [" x", " y"]
        f += sgl.gen("g")
        assert f[0].text() + f[1].text() in ("P xAP yB", "P xBP yA")
        f.join("concate_and_append")

    st = prog.run(backend=be)
    assert st.text() in ("P xA yB", "P xB yA")
    with pytest.raises(sgl.ProgramError, match="join: mode must be"):
        sgl.function(lambda s: s.fork(2).join("zip")).run(backend=be)


def test_var_scope_copy_setitem_contains_and_n():
    be = Scripted(["one"])

    @sgl.function
    def prog(s):
        with s.var_scope("scope"):
            s += "a" + sgl.gen("x") + "b"
        c = s.copy()
        c += "z"
        s["mine"] = 5
        s += sgl.gen("many", n=2)

    st = prog.run(backend=be)
    assert st["scope"] == "aoneb" and st["mine"] == 5 and "x" in st and "nope" not in st
    assert st["many"] == ["out1#0", "out1#1"] and st.text() == "aonebout1#0"


def test_backend_error_is_recorded_and_reading_the_var_names_it():
    be = Scripted(fail_on="bad")

    @sgl.function
    def prog(s, q):
        s += q + sgl.gen("x")

    st = prog.run(q="bad input", backend=be)
    assert isinstance(st.error(), RuntimeError) and "refused" in str(st.error())
    with pytest.raises(sgl.ProgramError, match="variable 'x' was not set: the program failed"):
        st["x"]


def test_reading_a_variable_submitted_after_a_failure_raises_instead_of_hanging():
    # the failure happened before these gens were submitted (after a sync, and in fork branches, which
    # inherit it): their variables are never set and a reader must get the error, not wait forever
    be = Scripted(fail_on="bad")

    @sgl.function
    def prog(s, q, read=True):
        s += q + sgl.gen("x")
        s.sync()
        s += sgl.gen("y")
        forks = s.fork(2)
        forks += sgl.gen("z")
        if read:
            s["zs"] = [f["z"] for f in forks]

    with pytest.raises(sgl.ProgramError, match="variable 'z' was not set: the program failed: backend refused"):
        prog.run(q="bad", backend=be)
    st = prog.run(q="bad", read=False, backend=be)
    with pytest.raises(sgl.ProgramError, match="variable 'y' was not set: the program failed"):
        st["y"]
    # run_batch traces every program first (its backend answers no call): reading a branch's variable
    # after the first gen used to hang the trace, and so the whole batch
    states = prog.run_batch([{"q": "one"}, {"q": "two"}], backend=Scripted(), num_threads=2)
    assert [s.error() for s in states] == [None, None]
    assert all(len(s["zs"]) == 2 and all(z.startswith("out") for z in s["zs"]) for s in states)


def test_run_batch_isolates_a_failing_program_and_precaches_the_shared_prefix():
    be = Scripted()

    @sgl.function
    def prog(s, q):
        s += "A long shared instruction for every program. Question: " + q
        if q == "boom":
            raise ValueError("program body failed")
        s += sgl.gen("a", max_tokens=2)

    states = prog.run_batch([{"q": "one"}, {"q": "boom"}, {"q": "two"}], backend=be, num_threads=2)
    assert [s.error() is None for s in states] == [True, False, True]
    assert "program body failed" in str(states[1].error())
    assert states[0]["a"].startswith("out") and states[2]["a"].startswith("out")
    assert be.prefills == ["A long shared instruction for every program. Question: "]
    with pytest.raises(TypeError, match="prog: missing a required argument: 'q'"):
        prog.run_batch([{}], backend=be)


def test_trace_stops_at_the_first_generation():
    be = Scripted()

    @sgl.function
    def prog(s, q, k=2):
        s += "System text. " + "Q: " + q + sgl.gen("a")
        s += "never reached"

    tr = prog.trace(backend=be)
    assert tr.prefix == "System text. Q: "
    assert prog.trace(backend=be, q="hi").prefix == "System text. Q: hi"
    assert be.calls == []
    assert prog.cache(backend=be) == "System text. Q: " and be.prefills == ["System text. Q: "]
    bound = prog.bind(q="fixed")
    assert bound.trace(backend=be).prefix == "System text. Q: fixed"


def test_stream_text_iter_and_async_iter():
    be = Scripted()

    @sgl.function
    def prog(s):
        s += "Say:" + sgl.gen("x")

    st = prog.run(backend=be, stream=True)
    assert list(st.text_iter("x")) == ["al", "pha", " beta"]
    assert "".join(st.text_iter()) == "Say:alpha beta"

    async def collect():
        st2 = prog.run(backend=be, stream=True)
        return [x async for x in st2.text_async_iter("x", return_meta_data=True)]

    chunks = asyncio.run(collect())
    assert "".join(c for c, _ in chunks) == "alpha beta" and chunks[-1][1] == {"piece": " beta"}


def test_arun_and_arun_batch_compose_with_asyncio():
    be = Scripted()

    @sgl.function
    def prog(s, q):
        s += q + sgl.gen("a", max_tokens=1)

    async def main():
        one, many = await asyncio.gather(prog.arun(q="x", backend=be),
                                         prog.arun_batch([{"q": "y"}, {"q": "z"}], backend=be))
        return one, many

    one, many = asyncio.run(main())
    assert one["a"].startswith("out") and [s.text()[0] for s in many] == ["y", "z"]


class FakeAPI(Backend):
    """An API whose model writes `document`: it continues any prompt that is a prefix of it (and answers
    '??' otherwise), honouring stop and max tokens (4 characters a token); counts calls."""

    def __init__(self, document: str, is_chat_model=False):
        self.document, self.is_chat_model, self.calls = document, is_chat_model, []

    def generate(self, prompt, params):
        self.calls.append((prompt.text, prompt.messages, params.max_new_tokens, params.stop))
        if self.is_chat_model:
            text = self.document
        else:
            text = self.document[len(prompt.text):] if self.document.startswith(prompt.text) else "??"
        if params.stop:
            i = first_stop(text, params.stop)
            text = text if i < 0 else text[:i]
        return Completion(text[: params.max_new_tokens * 4], {})


def _person(s):
    s += "Name:" + sgl.gen("name", stop="\n") + "\nAge:" + sgl.gen("age", stop="\n") + "\nCity:" + \
        sgl.gen("city", stop="\n")


def test_api_speculation_makes_one_call_for_three_gens_when_the_continuation_matches():
    doc = "Name: Ada\nAge: 36\nCity: London\nHobby: chess"
    plain, spec = FakeAPI(doc), FakeAPI(doc)
    a = sgl.function(_person).run(backend=plain, max_new_tokens=32)
    b = sgl.function(num_api_spec_tokens=64)(_person).run(backend=spec, max_new_tokens=32)
    assert len(plain.calls) == 3 and len(spec.calls) == 1 and b.num_api_calls == 1
    assert [b[k] for k in ("name", "age", "city")] == [a[k] for k in ("name", "age", "city")] == \
        [" Ada", " 36", " London"]
    assert spec.calls[0][2] == 64 and spec.calls[0][3] == ()  # the speculative call ignores the stop


def test_api_speculation_falls_back_to_normal_calls_on_a_mismatch():
    spec = FakeAPI("Name: Ada\nBorn: 1815\n")  # the model does not write "Age:" next
    st = sgl.function(num_api_spec_tokens=64)(_person).run(backend=spec, max_new_tokens=32)
    assert st["name"] == " Ada" and len(spec.calls) >= 2  # the mismatch forced a fresh call
    assert st.text().startswith("Name: Ada\nAge:")


def test_api_speculation_on_a_chat_model_runs_the_turn_once():
    api = FakeAPI("Name: Ada\nAge: 36\n", is_chat_model=True)

    @sgl.function(num_api_spec_tokens=32)
    def prog(s):
        s += sgl.user("Describe a person.")
        s += sgl.assistant("Name:" + sgl.gen("name", stop="\n") + "\nAge:" + sgl.gen("age", stop="\n"))

    st = prog.run(backend=api)
    assert (st["name"], st["age"]) == (" Ada", " 36") and len(api.calls) == 1
    assert api.calls[0][1] == [{"role": "user", "content": "Describe a person."}]
    assert st.messages()[-1] == {"role": "assistant", "content": "Name: Ada\nAge: 36"}


def _random_case(rng):
    k = rng.randint(2, 4)
    choices = [f"c{i}" for i in range(k)]
    ins = [[[rng.choice([-0.1, -0.5, -1.0, -2.0, -3.0]), rng.randint(0, 99), "t"] for _ in range(rng.randint(1, 4))]
           for _ in range(k)]
    unc = [[[None if j == 0 else rng.uniform(-4, -0.1), e[1], "t"] for j, e in enumerate(x)] for x in ins]
    if rng.random() < 0.5:  # a server's default window: one entry per choice (upstream broadcasts it)
        unc = [[[rng.choice([None, rng.uniform(-4, -0.1)]), x[-1][1], "t"]] for x in ins]
    norms = [sum(e[0] for e in x) / len(x) for x in ins]
    return choices, ins, unc, norms


def test_choice_methods_agree_with_upstream_on_fixed_inputs():
    from sglang.lang import choices as up

    rng = random.Random(0)
    pairs = [(sgl.token_length_normalized, up.token_length_normalized),
             (sgl.greedy_token_selection, up.greedy_token_selection),
             (sgl.unconditional_likelihood_normalized, up.unconditional_likelihood_normalized)]
    for _ in range(300):
        choices, ins, unc, norms = _random_case(rng)
        for ours, theirs in pairs:
            kw = dict(choices=choices, normalized_prompt_logprobs=norms, input_token_logprobs=ins,
                      output_token_logprobs=[[] for _ in choices], unconditional_token_logprobs=unc)
            assert ours(**kw).decision == theirs(**kw).decision, (ours, kw)


def test_greedy_token_selection_treats_last_bit_differences_as_ties():
    """The shared prompt tokens' logprobs of two choices computed in different engine steps differ by ~1e-5: still a
    tie, so the choices' own first tokens decide (upstream's exact comparison would drop the second choice at the
    prompt token); a difference above the tolerance still decides there."""
    kw = dict(choices=["a", "b"], normalized_prompt_logprobs=[0.0, 0.0], output_token_logprobs=[[], []])
    near = [[[-8.98767, 1, "p"], [-3.67, 2, "a"]], [[-8.98770, 1, "p"], [-3.52, 3, "b"]]]
    assert sgl.greedy_token_selection(input_token_logprobs=near, **kw).decision == "b"
    far = [[[-8.98, 1, "p"], [-3.67, 2, "a"]], [[-8.99, 1, "p"], [-3.52, 3, "b"]]]
    assert sgl.greedy_token_selection(input_token_logprobs=far, **kw).decision == "a"


def test_healing_drops_the_merged_prompt_token_like_upstream():
    from sgl_jax.program.choices import heal

    entries = [[-1.0, 5, " A"], [-2.0, 6, "B"], [-4.0, 7, "C"]]
    kept, norm = heal("text ending in A", entries)  # the prompt ends with " A": not part of the choice
    assert kept == entries[1:] and norm == pytest.approx(-3.0)
    kept, norm = heal("text ending in X", entries)
    assert kept == entries and norm == pytest.approx(-7 / 3)


def test_state_renders_for_jupyter():
    be = Scripted(["<b>bold</b>"], template=ChatTemplate.from_jinja(SMOL_TEMPLATE))

    @sgl.function
    def prog(s):
        s += sgl.user("hi") + sgl.assistant(sgl.gen("ans"))

    out = prog.run(backend=be)._repr_html_()
    assert 'title="ans"' in out and "&lt;b&gt;bold&lt;/b&gt;" in out and "color:#888" in out


def test_the_frontend_never_imports_jax():
    code = ("import sys; sys.modules['jax'] = None; sys.modules['jaxlib'] = None\n"
            "sys.path.insert(0, 'tests')\n"
            "import sgl_jax.program as sgl\n"
            "from test_program_lang import Scripted\n"
            "st = sgl.function(lambda s: s.__iadd__('x' + sgl.gen('y'))).run(backend=Scripted())\n"
            "assert st['y'] == 'out0', st.text()\n"
            "assert not any(k == 'jax' or k.startswith('jax.') for k, v in sys.modules.items() if v is not None)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.timeout(60)
def test_openai_backend_loads_a_tokenizer_given_as_a_path(tmp_path):
    """`OpenAI(..., tokenizer=PATH)`: the path is loaded (it used to be kept as a string, whose .encode is str's),
    and API speculation truncates by its tokens without asking any server."""
    from sgl_jax.models.testing import write_tiny_gguf
    from sgl_jax.models.tokenizer import Tokenizer
    from sgl_jax.program.backends.openai import OpenAI

    path = write_tiny_gguf("llama", str(tmp_path / "tiny.gguf"))
    be = OpenAI("m", base_url="http://127.0.0.1:9/v1", api_key="none", tokenizer=path)
    tok = Tokenizer.from_path(path)
    text = "a sentence long enough to be cut"
    ids = tok.encode(text, add_special_tokens=False)
    assert be.truncate(text, 5) == tok.decode(ids[:5]) and be.truncate(text, 10_000) == text
