"""API speculative execution (`@function(num_api_spec_tokens=N)`), the SGLang paper's trick for API models.

An API model charges per call and cannot share a KV cache with the program, so a chain of gens separated by
constant text costs one round trip each. With speculation the first gen asks for at least N tokens and
ignores its stop; the program then consumes that text:

- completion models: each gen takes the speculated text up to its own stop string; each constant that follows
  must match the speculated text exactly and is consumed from it. A constant that does not match discards
  the speculation, and the next gen makes a normal call (which speculates again). A gen whose stop does not
  occur in a stale speculation also makes a normal call.
- chat models: inside an assistant turn, constants and gens are recorded instead of run; at the end of the
  turn one call generates the whole turn, and the records are matched against it in order (a constant must
  appear next, a gen takes text up to its stop or up to the next constant). From the first mismatch on, the
  remaining gens are made as normal calls, one each, with the turn's text so far.

`spec_calls` counts the calls made, so a test (and a user) can see what speculation saved.
Host code: no jax import.
"""

from __future__ import annotations

import dataclasses

from sgl_jax.program import ir


def first_stop(text: str, stop) -> int:
    """Index of the earliest stop string in `text`, or -1 (no stop, or none occurs)."""
    stops = [stop] if isinstance(stop, str) else list(stop or ())
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else -1


class SpecMixin:
    """Speculation state and steps of an `Executor` (see the module docstring)."""

    num_spec_calls = 0

    def _spec_active_chat(self) -> bool:
        return self.spec_tokens is not None and self.backend.is_chat_model and self.cur_role == "assistant"

    def spec_fill(self, text: str, prefix: bool) -> bool:
        """True when the text was recorded for a chat turn's speculative call instead of appended."""
        if self.spec_tokens is None:
            return False
        if self._spec_active_chat() and not prefix:
            self.spec_calls.append(("fill", text))
            return True
        if self.speculated.startswith(text):
            self.speculated = self.speculated[len(text):]
        else:
            self.speculated = ""
        return False

    def _spec_call(self, params: ir.SamplingDefaults):
        n = max(params.max_new_tokens, self.spec_tokens)
        c = self.backend.generate(self.prompt(), dataclasses.replace(params, max_new_tokens=n, stop=(), n=1))
        self.num_spec_calls += 1
        self._after_call()
        return c

    def spec_gen(self, e: ir.Gen, params: ir.SamplingDefaults) -> bool:
        """Serve a gen from speculation (True), or leave it to a normal call (False)."""
        if self.backend.is_chat_model:
            if self.cur_role != "assistant":
                return False
            self.spec_calls.append(("gen", e, params))
            return True
        fresh = False
        if not self.speculated:
            c = self._spec_call(params)
            self.speculated, fresh, meta = (c.text if isinstance(c.text, str) else c.text[0]), True, c.meta_info
        else:
            meta = {"speculative": True}
        pos = first_stop(self.speculated, params.stop)
        if pos < 0 and params.stop and not fresh:  # a stale speculation without this gen's stop
            self.speculated = ""
            return self.spec_gen(e, params)
        if pos < 0:
            comp = self.backend.truncate(self.speculated, params.max_new_tokens)
        else:
            comp = self.speculated[:pos]
        self.speculated = self.speculated[len(comp):]
        self._append_generated(e.name, comp, None)
        self._set(e.name, comp, meta)
        return True

    def spec_role_end(self) -> None:
        """End of an assistant turn on a chat model: run the recorded turn with one call, then match."""
        if not self.spec_calls:
            return
        records, self.spec_calls = self.spec_calls, []
        gens = [r for r in records if r[0] == "gen"]
        params = gens[0][2] if gens else self.defaults
        turn = ""
        if gens:
            c = self.backend.generate(self.prompt(), dataclasses.replace(
                params, max_new_tokens=max(self.spec_tokens, params.max_new_tokens), stop=(), n=1))
            self.num_spec_calls += 1
            self._after_call()
            turn = c.text if isinstance(c.text, str) else c.text[0]
        matched = True
        for i, r in enumerate(records):
            if r[0] == "fill":
                if matched and turn.startswith(r[1]):
                    turn = turn[len(r[1]):]
                else:
                    matched = False
                self._plain_fill(r[1])
                continue
            _, e, p = r
            if matched:
                nxt = next((x[1] for x in records[i + 1:] if x[0] == "fill"), None)
                pos = first_stop(turn, p.stop)
                if pos < 0 and nxt:
                    pos = turn.find(nxt)
                if pos < 0 and (p.stop or nxt):
                    matched = False
                else:
                    comp = turn if pos < 0 else turn[:pos]
                    turn = turn[len(comp):]
                    self._append_generated(e.name, comp, None)
                    self._set(e.name, comp, {"speculative": True})
                    continue
            self._normal_chat_gen(e, p)

    def _plain_fill(self, text: str) -> None:
        start = len(self.text)
        self.text += text
        self.spans.append((start, len(self.text), "text", None))

    def _normal_chat_gen(self, e: ir.Gen, params) -> None:
        prompt = self.prompt()
        partial = self.text[self.role_begin:].lstrip()
        if partial:
            prompt.messages = prompt.messages + [{"role": "assistant", "content": partial}]
        c = self.backend.generate(prompt, params)
        self.num_spec_calls += 1
        first = c.text[0] if isinstance(c.text, list) else c.text
        self._append_generated(e.name, first, None)
        self._set(e.name, c.text, c.meta_info)
