"""Output processing: the one path every output token takes, sampled or forced. Host code, no jax.

`OutputProcessor` owns each request's output state (`OutputState`: text, incremental detokenizer,
stop matcher, logprob entries, finish reason, sink) and its contract is:
 - `append(req, tok, ...)` adds one token to `req.output_ids` with its logprob entries and then runs the
   finish checks (stop token ids after `min_new_tokens`, stop strings, stop regexes, length, context)
   on it. Sampled tokens and tokens appended by jump-forward both come through here, so a stop inside
   a forced run ends the request exactly where sampling it token by token would have.
 - `truncate(req, k)` takes the last k tokens back (jump-forward re-tokenized them).
 - `collect_input_logprobs` turns a step's prompt-logprob rows into wire entries.
 - `emit(req, final)` builds SGLang's output dict and hands it to the request's sink; the final event
   also updates the served-token counters and the metrics.
It never touches the scheduler or the device.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

from sgl_jax.engine.prepare import PreparedRequest
from sgl_jax.engine.stops import StopMatcher

log = logging.getLogger("sgl_jax.engine")


@dataclasses.dataclass(eq=False)
class OutputState:
    """What the engine has produced for one request so far."""

    prep: PreparedRequest
    sink: Callable[[dict], None]
    stream: bool
    seed: int
    detok: Any
    stops: StopMatcher
    text: str = ""
    t_start: float = 0.0
    t_first: float | None = None
    finish_reason: dict | None = None
    input_logprobs: list = dataclasses.field(default_factory=list)
    input_top: list = dataclasses.field(default_factory=list)
    output_logprobs: list = dataclasses.field(default_factory=list)
    output_top: list = dataclasses.field(default_factory=list)
    next_input_pos: int = 0
    forced_tokens: int = 0  # tokens appended by jump-forward
    cons: Any = None  # the constraint manager's per-request state (constraints.ConstraintState)

    @property
    def params(self):
        return self.prep.params


class OutputProcessor:
    def __init__(self, tokenizer, max_context_len: int, metrics=None):
        self.tokenizer = tokenizer
        self.max_context_len = max_context_len
        self.metrics = metrics
        self.counters = {"prompt_tokens": 0, "cached_tokens": 0, "generation_tokens": 0, "requests": 0}

    def start(self, prep: PreparedRequest, sink, stream: bool, seed: int) -> OutputState:
        sp = prep.params
        st = OutputState(prep=prep, sink=sink, stream=stream, seed=seed,
                         detok=self.tokenizer.detokenizer(skip_special_tokens=sp.skip_special_tokens),
                         stops=StopMatcher(sp.stop, prep.stop_regex), t_start=time.perf_counter())
        st.next_input_pos = max(prep.logprob_start_len, 0) if prep.return_logprob else 0
        return st

    # ------------------------------------------------------------------------------ tokens
    def token_text(self, d: OutputState, tok: int):
        return self.tokenizer.decode([tok], skip_special_tokens=False) if d.prep.return_text_in_logprobs else None

    def top_entry(self, d: OutputState, ids, vals):
        k = d.prep.top_logprobs_num
        return [[float(v), int(i), self.token_text(d, int(i))] for i, v in zip(ids[:k], vals[:k])]

    def append(self, req, tok: int, logprob: float | None = None, top=None, *, forced: bool = False,
               check: bool = True) -> None:
        """Add one output token (sampled, or forced with no logprob) and run the finish checks on it."""
        d: OutputState = req.data
        req.output_ids.append(tok)
        if forced:
            d.forced_tokens += 1
        elif d.t_first is None:
            d.t_first = time.perf_counter()
            if self.metrics is not None:
                self.metrics.on_first_token(d.t_first - d.t_start)
        if d.prep.return_logprob:
            d.output_logprobs.append([None if logprob is None else float(logprob), tok, self.token_text(d, tok)])
            if d.prep.top_logprobs_num:
                d.output_top.append(None if top is None else self.top_entry(d, *top))
        if check and d.finish_reason is None:
            self.check_finish(req, tok)

    def truncate(self, req, k: int) -> None:
        """Take back the last k output tokens (their text is detokenized afresh)."""
        if k <= 0:
            return
        d: OutputState = req.data
        del req.output_ids[len(req.output_ids) - k:]
        if d.prep.return_logprob:
            del d.output_logprobs[len(d.output_logprobs) - k:]
            if d.prep.top_logprobs_num:
                del d.output_top[len(d.output_top) - k:]
        d.detok = self.tokenizer.detokenizer(skip_special_tokens=d.params.skip_special_tokens)
        d.text = d.detok.feed(list(req.output_ids)) if req.output_ids else ""

    def finish(self, req, reason: dict) -> None:
        """Set the finish reason and flush the detokenizer (no-op if already finished)."""
        d: OutputState = req.data
        if d.finish_reason is None:
            d.text += d.detok.finish()
            d.finish_reason = reason

    def check_finish(self, req, tok: int) -> None:
        d: OutputState = req.data
        p = d.params
        n = len(req.output_ids)
        if tok in d.prep.stop_ids and n >= p.min_new_tokens:
            self.finish(req, {"type": "stop", "matched": tok})
            return
        new = d.detok.feed(tok)
        d.text += new
        if d.stops:
            hit = d.stops.feed(d.text, new, active=n >= p.min_new_tokens)
            if hit is not None:
                pos, s = hit
                d.text = d.text[:pos + len(s)] if p.no_stop_trim else d.text[:pos]
                d.finish_reason = {"type": "stop", "matched": s}
                return
        if n >= req.max_new_tokens:
            self.finish(req, {"type": "length", "length": req.max_new_tokens})
        elif req.num_tokens >= self.max_context_len:
            self.finish(req, {"type": "length", "length": n})

    # ----------------------------------------------------------------------- prompt logprobs
    def collect_input_logprobs(self, req, c, a, e, tlps, top_ids, top_lps) -> None:
        """Prompt-logprob entries from logits rows a..e-1 of chunk c (positions predicting the next token)."""
        d: OutputState = req.data
        n_prompt = len(req.prompt_ids)
        first_pos = c.end - (e - a)  # position of logits row a
        for j in range(a, e):
            target = first_pos + (j - a) + 1  # the prompt position this row predicts
            if d.next_input_pos == 0 and target == 1 and not d.input_logprobs:
                d.input_logprobs.append([None, req.prompt_ids[0], self.token_text(d, req.prompt_ids[0])])
                if d.prep.top_logprobs_num:
                    d.input_top.append(None)
                d.next_input_pos = 1
            if target != d.next_input_pos or target >= n_prompt:
                continue
            tok = req.prompt_ids[target]
            d.input_logprobs.append([float(tlps[j]), tok, self.token_text(d, tok)])
            if d.prep.top_logprobs_num:
                d.input_top.append(self.top_entry(d, top_ids[j], top_lps[j]))
            d.next_input_pos = target + 1
        if n_prompt == 1 and not d.input_logprobs:
            d.input_logprobs.append([None, req.prompt_ids[0], self.token_text(d, req.prompt_ids[0])])

    # --------------------------------------------------------------------------------- events
    def visible_text(self, d: OutputState) -> str:
        """While streaming, hold back a tail that could still become a stop string."""
        if d.finish_reason is not None or not d.params.stop:
            return d.text
        hold = 0
        for s in d.params.stop:
            for k in range(min(len(s) - 1, len(d.text)), 0, -1):
                if d.text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return d.text[:len(d.text) - hold]

    def event(self, req, final: bool) -> dict:
        d: OutputState = req.data
        meta = {"id": req.rid, "finish_reason": d.finish_reason if final else None,
                "prompt_tokens": len(req.prompt_ids), "completion_tokens": len(req.output_ids),
                "cached_tokens": req.cached_tokens, "e2e_latency": time.perf_counter() - d.t_start}
        if d.prep.constraint is not None:
            meta["forced_tokens"] = d.forced_tokens  # appended by jump-forward, not sampled
        if d.prep.return_logprob:
            meta["input_token_logprobs"] = list(d.input_logprobs)
            meta["output_token_logprobs"] = list(d.output_logprobs)
            if d.prep.top_logprobs_num:
                meta["input_top_logprobs"] = list(d.input_top)
                meta["output_top_logprobs"] = list(d.output_top)
        return {"text": d.text if final else self.visible_text(d), "output_ids": list(req.output_ids),
                "meta_info": meta}

    def emit(self, req, final: bool) -> None:
        """Hand the request's current output to its sink (the final one once, with its finish reason)."""
        d: OutputState = req.data
        if final:
            fr = d.finish_reason or {"type": "abort", "message": "aborted"}
            d.finish_reason = fr
            if fr.get("type") != "abort":
                c = self.counters
                c["requests"] += 1
                c["prompt_tokens"] += len(req.prompt_ids)
                c["cached_tokens"] += req.cached_tokens
                c["generation_tokens"] += len(req.output_ids)
            if self.metrics is not None:
                self.metrics.on_finish(fr.get("type", "stop"), len(req.prompt_ids), len(req.output_ids),
                                       req.cached_tokens, time.perf_counter() - d.t_start)
        try:
            d.sink(self.event(req, final))
        except Exception:  # noqa: BLE001 - a consumer's closed event loop must not stop the engine
            log.debug("sink of %s failed", req.rid, exc_info=True)
