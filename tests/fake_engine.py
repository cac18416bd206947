"""FakeEngine: the `sgl_jax.engine.Engine` interface with outputs you can work out by hand.

It lets the server be tested without a model (JetStream's mock-engine habit).

Tokenizer (`ByteTokenizer`): ids 0..255 are bytes; 256 is "<s>" (BOS), 257 is "</s>" (EOS);
vocab_size 258. `encode` puts BOS first when add_special_tokens, and reads the texts "<s>" and "</s>"
as the special ids. The chat template renders `<s><|role|>content\\n...<|assistant|>`.

Model: the next token after t is t + 1 for printable ASCII (32 <= t < 126), except that "z" is
followed by EOS (by "{" under ignore_eos or before min_new_tokens); any other t is followed by " ".
So "abc" continues "defgh...xyz" and stops with finish_reason {"type": "stop", "matched": 257}.
The model puts probability 1/2 on that next token and spreads the rest evenly over the other 257:
logprob(t | prev) = log(1/2) if t is the next token else log(1/2 / 257). Top-k lists the next token
first, then the other ids in increasing order.

Prefix cache: every finished sequence is remembered; cached_tokens is the longest common prefix of
the prompt with one of them, at most prompt length - 1. `flush_cache` forgets (refused while busy).
Pages: a running request holds ceil(tokens / page_size) pages; `check_integrity` checks the totals.
Time: one token per `delay` seconds (asyncio.sleep), so streams interleave and can be interrupted.
Counters: `started`, `finished`, `aborted`, `open_requests`; `calls` keeps each request's kwargs,
`aborted_rids` the rids that were aborted (by `abort` or by closing the generator).

`python tests/fake_engine.py --port P [--delay S] [--drain-timeout S] [--api-key K]` serves it with
the real server (used by the subprocess test of graceful shutdown).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re
import time
import uuid

from sgl_jax.config import EngineConfig
from sgl_jax.engine.prepare import PreparedRequest
from sgl_jax.errors import InvalidRequestError, UnsupportedFeatureError
from sgl_jax.sampling_params import SamplingParams

BOS, EOS = 256, 257
VOCAB = 258
LP_NEXT = math.log(0.5)
LP_OTHER = math.log(0.5 / (VOCAB - 1))


class ByteTokenizer:
    vocab_size = VOCAB
    bos_token_id = BOS
    eos_token_id = EOS
    stop_token_ids = frozenset({EOS})
    _SPECIAL = {"<s>": BOS, "</s>": EOS}
    _NAMES = {BOS: "<s>", EOS: "</s>"}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [BOS] if add_special_tokens else []
        for part in re.split(r"(<s>|</s>)", text):
            if part in self._SPECIAL:
                ids.append(self._SPECIAL[part])
            else:
                ids.extend(part.encode("utf-8"))
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        out, buf = [], bytearray()
        for i in ids:
            if i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if not skip_special_tokens:
                out.append(self._NAMES[i])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        s = "<s>" + "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)
        return s + "<|assistant|>" if add_generation_prompt else s


def next_token(prev: int, eos_allowed: bool = True) -> int:
    if prev == ord("z"):
        return EOS if eos_allowed else ord("{")
    if 32 <= prev < 126:
        return prev + 1
    return ord(" ")


def logprob(tok: int, prev: int) -> float:
    return LP_NEXT if tok == next_token(prev) else LP_OTHER


def top_logprobs(prev: int, k: int) -> list[tuple[float, int]]:
    nxt = next_token(prev)
    out = [(LP_NEXT, nxt)]
    out += [(LP_OTHER, i) for i in range(VOCAB) if i != nxt][: max(k - 1, 0)]
    return out[:k]


@dataclasses.dataclass
class _Running:
    rid: str
    tokens: int
    abort_message: str | None = None


class FakeEngine:
    def __init__(self, *, delay: float = 0.002, max_context_len: int = 512, page_size: int = 4,
                 total_pages: int = 4096, metrics=None, model_path: str = "fake/byte-model"):
        self.tokenizer = ByteTokenizer()
        self.model_path = model_path
        self.max_context_len = max_context_len
        self.config = EngineConfig.make(model=model_path, max_context_len=max_context_len, page_size=page_size)
        self.metrics = metrics
        self.delay = delay
        self.page_size = page_size
        self.total_pages = total_pages
        self.running: dict[str, _Running] = {}
        self.pages_in_use = 0
        self.cache: list[list[int]] = []
        self.calls: list[dict] = []
        self.aborted_rids: list[str] = []
        self.started = self.finished = self.aborted = 0
        self.is_shut_down = False
        self.prepared_on_loop = 0
        self.dead = False
        self._raw: dict = {}  # (ids, params) -> the raw fields a test may inspect in `calls`

    # -- interface ----------------------------------------------------------------------------------
    @property
    def open_requests(self) -> int:
        return len(self.running)

    def _prompt(self, text, input_ids) -> list[int]:
        if (text is None) == (input_ids is None):
            raise InvalidRequestError("give exactly one of text or input_ids", field="text")
        if text is not None:
            if not isinstance(text, str):
                raise InvalidRequestError(f"text must be a string, got {text!r}", field="text")
            return self.tokenizer.encode(text)
        if not isinstance(input_ids, list) or not input_ids:
            raise InvalidRequestError("input_ids must be a non-empty list of token ids", field="input_ids")
        for j, t in enumerate(input_ids):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < VOCAB:
                raise InvalidRequestError(f"input_ids[{j}] must be a token id in [0, {VOCAB}), got {t!r}",
                                          field="input_ids")
        return list(input_ids)

    def _check(self, text, input_ids, sampling_params, return_logprob, logprob_start_len, top_logprobs_num):
        ids = self._prompt(text, input_ids)
        sp = SamplingParams.from_dict(sampling_params, vocab_size=VOCAB, max_context=self.max_context_len,
                                      prompt_len=len(ids))
        if sp.ebnf is not None:
            raise UnsupportedFeatureError("sampling_params.ebnf is not supported by FakeEngine", field="ebnf")
        if sp.n != 1:
            raise InvalidRequestError(f"sampling_params.n must be 1 per engine call, got {sp.n}", field="n")
        if not isinstance(top_logprobs_num, int) or not 0 <= top_logprobs_num <= 20:
            raise InvalidRequestError(f"top_logprobs_num must be in [0, 20], got {top_logprobs_num!r}",
                                      field="top_logprobs_num")
        if not isinstance(logprob_start_len, int) or logprob_start_len < -1 or logprob_start_len >= len(ids):
            raise InvalidRequestError(
                f"logprob_start_len must be -1 or in [0, {len(ids)}) for this prompt, got {logprob_start_len!r}",
                field="logprob_start_len")
        return ids, sp

    def prepare(self, *, text=None, input_ids=None, sampling_params=None, return_logprob=False,
                logprob_start_len=-1, top_logprobs_num=0, return_text_in_logprobs=False, rid=None) -> PreparedRequest:
        self._check_open()
        try:  # the server must prepare in a worker thread, never on its event loop
            asyncio.get_running_loop()
            self.prepared_on_loop += 1
        except RuntimeError:
            pass
        ids, sp = self._check(text, input_ids, sampling_params, return_logprob, logprob_start_len, top_logprobs_num)
        prep = PreparedRequest(input_ids=tuple(ids), params=sp, return_logprob=return_logprob,
                               logprob_start_len=logprob_start_len, top_logprobs_num=top_logprobs_num,
                               return_text_in_logprobs=return_text_in_logprobs, rid=rid)
        self._raw[prep.input_ids, sp] = dict(text=text, input_ids=input_ids, sampling_params=sampling_params)
        return prep

    def validate(self, **kw) -> None:
        self.prepare(**kw)

    def health(self) -> tuple[bool, str]:
        if self.dead:
            return False, "the engine is dead: injected"
        return (False, "the engine is shut down") if self.is_shut_down else (True, "ok")

    def _check_open(self) -> None:
        if self.is_shut_down:
            raise RuntimeError("the engine is shut down")

    async def generate_stream(self, *, prepared: PreparedRequest | None = None, stream=True, **kw):
        """One sequence's cumulative events; with stream=False only the final one."""
        if prepared is None:
            prepared = self.prepare(**kw)
        self._check_open()
        p = prepared
        ids, sp = list(p.input_ids), p.params
        return_logprob, logprob_start_len, top_logprobs_num = p.return_logprob, p.logprob_start_len, p.top_logprobs_num
        return_text_in_logprobs = p.return_text_in_logprobs
        rid = p.rid or uuid.uuid4().hex
        if rid in self.running:
            raise InvalidRequestError(f"rid {rid!r} is already in use by a running request", field="rid")
        self.calls.append(dict(self._raw.get((p.input_ids, sp), {}), return_logprob=return_logprob,
                               logprob_start_len=logprob_start_len, top_logprobs_num=top_logprobs_num, rid=rid,
                               stream=stream))
        t0 = time.perf_counter()
        run = _Running(rid, len(ids))
        self.running[rid] = run
        self.started += 1
        pages = self._pages(run.tokens)
        self.pages_in_use += pages
        cached = self._cached(ids)
        out: list[int] = []
        done = False
        tt = return_text_in_logprobs

        def entry(lp, t):
            return [lp, t, self.tokenizer.decode([t], skip_special_tokens=False) if tt else None]

        def event(text_, finish):
            meta = {"id": rid, "finish_reason": finish, "prompt_tokens": len(ids), "completion_tokens": len(out),
                    "cached_tokens": cached, "e2e_latency": time.perf_counter() - t0}
            if return_logprob:
                start = len(ids) - 1 if logprob_start_len < 0 else logprob_start_len
                meta["input_token_logprobs"] = [entry(None if p == 0 else logprob(ids[p], ids[p - 1]), ids[p])
                                                for p in range(start, len(ids))]
                seq = ids + out
                meta["output_token_logprobs"] = [entry(logprob(seq[p], seq[p - 1]), seq[p])
                                                 for p in range(len(ids), len(seq))]
                if top_logprobs_num:
                    meta["input_top_logprobs"] = [
                        None if p == 0 else [entry(lp, t) for lp, t in top_logprobs(ids[p - 1], top_logprobs_num)]
                        for p in range(start, len(ids))]
                    meta["output_top_logprobs"] = [
                        [entry(lp, t) for lp, t in top_logprobs(seq[p - 1], top_logprobs_num)]
                        for p in range(len(ids), len(seq))]
            return {"text": text_, "output_ids": list(out), "meta_info": meta}

        try:
            if sp.max_new_tokens == 0:
                done = True
                self._finish(rid, ids, out, "length", cached, t0)
                yield event("", {"type": "length", "length": 0})
                return
            prev = ids[-1]
            while True:
                await asyncio.sleep(self.delay)
                if run.abort_message is not None:
                    done = True
                    self._finish(rid, ids, out, "abort", cached, t0, remember=False)
                    yield event(self._visible(out, sp), {"type": "abort", "message": run.abort_message})
                    return
                can_stop = len(out) + 1 >= sp.min_new_tokens
                tok = next_token(prev, eos_allowed=can_stop and not sp.ignore_eos)
                out.append(tok)
                prev = tok
                new_pages = self._pages(len(ids) + len(out))
                self.pages_in_use += new_pages - pages
                pages = new_pages
                if self.metrics is not None:
                    if len(out) == 1:
                        self.metrics.on_first_token(time.perf_counter() - t0)
                    self.metrics.observe_step(self.delay, len(self.running))
                    self.metrics.set_queue(0, len(self.running), self.pages_in_use / self.total_pages)
                finish, text_ = self._finish_reason(out, sp, can_stop)
                if finish is not None:
                    done = True
                    self._finish(rid, ids, out, finish["type"], cached, t0)
                    yield event(text_, finish)
                    return
                if stream:
                    yield event(text_, None)
        finally:
            self.running.pop(rid, None)
            self.pages_in_use -= pages
            if not done:  # closed early: GeneratorExit or cancellation
                self._finish(rid, ids, out, "abort", cached, t0, remember=False)

    def abort(self, rid: str) -> bool:
        run = self.running.get(rid)
        if run is None or run.abort_message is not None:
            return False
        run.abort_message = "aborted by request"
        return True

    def flush_cache(self) -> bool:
        if self.running:
            return False
        self.cache.clear()
        return True

    def get_server_info(self) -> dict:
        return {"model_path": self.model_path, "max_context_len": self.max_context_len,
                "engine": dataclasses.asdict(self.config),
                "stats": {"started": self.started, "finished": self.finished, "aborted": self.aborted,
                          "open_requests": self.open_requests, "pages_in_use": self.pages_in_use,
                          "aborted_rids": list(self.aborted_rids)}}

    def check_integrity(self) -> None:
        assert self.pages_in_use >= 0, self.pages_in_use
        if not self.running:
            assert self.pages_in_use == 0, f"{self.pages_in_use} pages leaked with no request running"

    def shutdown(self) -> None:
        self.is_shut_down = True
        print(f"FakeEngine.shutdown open={self.open_requests} finished={self.finished} aborted={self.aborted}",
              flush=True)

    # -- internals ----------------------------------------------------------------------------------
    def _pages(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def _cached(self, ids: list[int]) -> int:
        best = 0
        for seq in self.cache:
            k = 0
            for a, b in zip(seq, ids):
                if a != b:
                    break
                k += 1
            best = max(best, k)
        return min(best, len(ids) - 1)

    def _finish(self, rid, ids, out, status, cached, t0, remember=True):
        if status == "abort":
            self.aborted += 1
            self.aborted_rids.append(rid)
        else:
            self.finished += 1
        if remember:
            self.cache.append(ids + out)
        if self.metrics is not None:
            self.metrics.on_finish(status, len(ids), len(out), cached, time.perf_counter() - t0)

    def _visible(self, out: list[int], sp: SamplingParams) -> str:
        """The text so far, minus a tail that could still become a stop string (held back)."""
        text = self.tokenizer.decode(out, skip_special_tokens=sp.skip_special_tokens)
        hold = 0
        for s in sp.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return text[: len(text) - hold]

    def _finish_reason(self, out: list[int], sp: SamplingParams, can_stop: bool):
        tok = out[-1]
        skip = sp.skip_special_tokens
        if can_stop and tok == EOS:
            return {"type": "stop", "matched": EOS}, self.tokenizer.decode(out[:-1], skip_special_tokens=skip)
        if can_stop and tok in sp.stop_token_ids:
            kept = out if sp.no_stop_trim else out[:-1]
            return {"type": "stop", "matched": tok}, self.tokenizer.decode(kept, skip_special_tokens=skip)
        text = self.tokenizer.decode(out, skip_special_tokens=skip)
        if can_stop:
            for s in sp.stop:
                i = text.find(s)
                if i >= 0:
                    return {"type": "stop", "matched": s}, (text if sp.no_stop_trim else text[:i])
        if len(out) >= sp.max_new_tokens:
            return {"type": "length", "length": sp.max_new_tokens}, text
        return None, self._visible(out, sp)


def main(argv=None) -> None:
    import argparse

    from sgl_jax.config import ServerConfig
    from sgl_jax.metrics import Metrics
    from sgl_jax.serve.server import serve

    p = argparse.ArgumentParser(description="serve FakeEngine with the real server")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--delay", type=float, default=0.002)
    p.add_argument("--drain-timeout", type=float, default=30.0)
    p.add_argument("--api-key", default="")
    a = p.parse_args(argv)
    metrics = Metrics()
    engine = FakeEngine(delay=a.delay, metrics=metrics)
    serve(engine, ServerConfig(port=a.port, drain_timeout_s=a.drain_timeout, api_key=a.api_key,
                               log_level="info"), metrics)


if __name__ == "__main__":
    main()
