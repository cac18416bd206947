"""Every request a run sends, as token ids, and the optimal cache hit rate they allow.

`Recorder` keeps (prompt ids, output ids) per request in arrival order. It is attached to a backend's
transport, below the frontend, so it sees exactly what the runtime saw:
- the in-process engine: `Engine.generate` is wrapped on the instance (the backend sends token ids);
- our `RuntimeEndpoint`: its `_post` is wrapped; upstream's `RuntimeEndpoint`: the `http_request` its module
  calls. Both send text, so prompts are kept as text and turned into ids afterwards by the server's own
  `/tokenize` (the tokenization the server applied); outputs are the `output_ids` the server returned.

`optimal_hit_rate(requests)`: what an infinite cache could have reused, with requests taken in arrival order:
for each request, the longest prefix its prompt shares with any earlier request's prompt + output, summed,
over all prompt tokens. Computed with a token trie (one dict per node); page granularity is not applied (the
engine reuses whole pages and then part of a page by copying it, so it can reach this bound except for each
prompt's last token, which is always computed).
`optimal_hit_rate_naive` is the O(n^2) twin the tests compare against. Host code: no jax.
"""

from __future__ import annotations

import threading


def optimal_hits(requests, page_size: int = 1) -> tuple[int, int]:
    """(reusable prompt tokens, total prompt tokens) for [(prompt ids, output ids), ...] in arrival order.

    page_size > 1: the bound for a cache of whole pages that computes at least each prompt's last token (as
    the engine's does): each match is cut to len(prompt) - 1 and rounded down to whole pages. The gap between
    the two bounds is what page granularity costs; the gap below the paged one is the schedule's."""
    root: dict = {}
    hits = total = 0
    for prompt, output in requests:
        node, m = root, 0
        for t in prompt:
            node = node.get(t)
            if node is None:
                break
            m += 1
        if page_size > 1:
            m = min(m, len(prompt) - 1) // page_size * page_size
        hits += m
        total += len(prompt)
        node = root
        for t in list(prompt) + list(output):
            node = node.setdefault(t, {})
    return hits, total


def optimal_hit_rate(requests) -> float:
    hits, total = optimal_hits(requests)
    return hits / total if total else 0.0


def optimal_hit_rate_naive(requests) -> float:
    """Twin of optimal_hit_rate: compares each prompt with every earlier sequence directly."""
    seen: list[list[int]] = []
    hits = total = 0
    for prompt, output in requests:
        best = 0
        for s in seen:
            m = 0
            while m < len(prompt) and m < len(s) and prompt[m] == s[m]:
                m += 1
            best = max(best, m)
        hits += best
        total += len(prompt)
        seen.append(list(prompt) + list(output))
    return hits / total if total else 0.0


class Recorder:
    """Requests in arrival order: `arrive(prompt)` reserves a slot at send time, `finish(slot, output)` fills it.
    A prompt is a list of ids or a text to tokenize later (`resolve`). Only records while `active`."""

    def __init__(self):
        self.lock = threading.Lock()
        self.active = False
        self.prompts: list = []
        self.outputs: list = []

    def start(self) -> None:
        with self.lock:
            self.prompts, self.outputs, self.active = [], [], True

    def stop(self) -> None:
        self.active = False

    def arrive(self, prompt) -> int | None:
        if not self.active:
            return None
        with self.lock:
            self.prompts.append(prompt)
            self.outputs.append([])
            return len(self.prompts) - 1

    def finish(self, slot: int | None, output_ids) -> None:
        """The request's output: ids, or a text to tokenize later (APIs that return no ids)."""
        if slot is not None:
            self.outputs[slot] = output_ids if isinstance(output_ids, str) else list(output_ids or [])

    def resolve(self, tokenize) -> list[tuple[list[int], list[int]]]:
        """The requests as ids; `tokenize(list of texts) -> list of id lists` handles the text prompts."""
        texts = sorted({p for p in self.prompts + self.outputs if isinstance(p, str)})
        ids = dict(zip(texts, tokenize(texts))) if texts else {}
        return [(ids[p] if isinstance(p, str) else list(p), ids[o] if isinstance(o, str) else o)
                for p, o in zip(self.prompts, self.outputs)]


def _expand(prompts: list, sampling_params) -> list:
    """A batch with n > 1 comes back prompt-major, n outputs per prompt."""
    n = sampling_params.get("n", 1) if isinstance(sampling_params, dict) else 1
    return [p for p in prompts for _ in range(max(int(n or 1), 1))]


def record_engine(engine, rec: Recorder):
    """Wrap `engine.generate` on the instance; returns a function that unwraps it."""
    orig = engine.generate

    def generate(prompt=None, sampling_params=None, input_ids=None, **kw):
        if kw.get("stream") or not rec.active:
            return orig(prompt, sampling_params, input_ids, **kw)
        src = input_ids if input_ids is not None else prompt
        batched = isinstance(src, list) and bool(src) and not isinstance(src[0], int)
        items = list(src) if batched else [src]
        items = [engine.tokenizer.encode(x) if isinstance(x, str) else x for x in items]
        slots = [rec.arrive(p) for p in _expand(items, sampling_params)]
        out = orig(prompt, sampling_params, input_ids, **kw)
        for slot, o in zip(slots, out if isinstance(out, list) else [out]):
            rec.finish(slot, o.get("output_ids"))
        return out

    engine.generate = generate
    return lambda: engine.__dict__.pop("generate", None)


def _record_body(rec: Recorder, body) -> list:
    if not isinstance(body, dict):
        return []
    src = body.get("input_ids") if body.get("input_ids") is not None else body.get("text")
    batched = isinstance(src, list) and bool(src) and not isinstance(src[0], int)
    return [rec.arrive(p) for p in _expand(list(src) if batched else [src], body.get("sampling_params"))]


def _record_response(rec: Recorder, slots: list, obj) -> None:
    for slot, o in zip(slots, obj if isinstance(obj, list) else [obj]):
        rec.finish(slot, o.get("output_ids") if isinstance(o, dict) else None)


def record_runtime_endpoint(backend, rec: Recorder):
    """Wrap our RuntimeEndpoint's `_post` (non-streamed /generate calls); returns the unwrapper."""
    orig = backend._post

    def _post(body, path="/generate", stream=False):
        if path != "/generate" or stream or not rec.active:
            return orig(body, path, stream)
        slots = _record_body(rec, body)
        obj = orig(body, path, stream)
        _record_response(rec, slots, obj)
        return obj

    backend._post = _post
    return lambda: backend.__dict__.pop("_post", None)


def record_upstream(rec: Recorder):
    """Wrap the `http_request` upstream's RuntimeEndpoint module calls; returns the unwrapper."""
    from sglang.lang.backend import runtime_endpoint as mod

    orig = mod.http_request

    def http_request(url, json=None, stream=False, **kw):
        if stream or not url.endswith("/generate") or not rec.active:
            return orig(url, json=json, stream=stream, **kw)
        slots = _record_body(rec, json)
        res = orig(url, json=json, stream=stream, **kw)
        try:
            _record_response(rec, slots, res.json())  # the body is cached: the caller reads it again
        except ValueError:
            pass
        return res

    mod.http_request = http_request

    def undo():
        mod.http_request = orig

    return undo
