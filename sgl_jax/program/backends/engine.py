"""`EngineBackend`: programs on the in-process `sgl_jax.Engine`, no HTTP -- where the co-design pays off.

- Token ids, not text: every call sends the state's exact ids (the ids earlier calls sent and generated,
  then the constant text since, tokenized), so a chain of calls never re-tokenizes generated text and each
  call after the first finds everything before it in the radix cache.
- `fork(n)`: the parent prompt is prefilled once and held in the radix cache (`Engine.hold_prefix`) until
  every branch has sent its first call; the branches' calls arrive together and are batched.
- `select`: the prefix is prefilled once (in the choices' own step when the engine is idle), then every choice
  is scored in one batched prefill with prompt logprobs only from two tokens before the prompt's end (the same
  window and normalisation as upstream's client, so the decisions agree), and the choice's exact ids become the
  state's.
- Generated text trimmed by a stop string or ended by EOS keeps only the ids that decode to the kept text.

Host code: the engine is handed in (or built lazily from a config), so importing this module needs no jax.
"""

from __future__ import annotations

from sgl_jax.models.tokenizer import prefix_encoder
from sgl_jax.program.backends.base import Backend, Completion, Prompt
from sgl_jax.program.chat_template import DEFAULT, ChatTemplate
from sgl_jax.program.choices import decide

_MAX_TRIM_STEPS = 64


class EngineBackend(Backend):
    tracks_ids = True

    def __init__(self, engine=None, chat_template: ChatTemplate | str | None = None, **overrides):
        """`engine`: an `sgl_jax.Engine`, an `EngineConfig`, a preset path (`configs/*.yaml`) or a model name."""
        self._owns = False
        if engine is None or not hasattr(engine, "generate"):
            engine = self._build(engine, overrides)
            self._owns = True
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self._encoder = prefix_encoder(self.tokenizer)  # a select's prompt and choices: tokenized once
        self._special = set(getattr(self.tokenizer, "special_token_ids", ()) or ())
        if isinstance(chat_template, str):
            from sgl_jax.program.chat_template import get_chat_template

            chat_template = get_chat_template(chat_template)
        self._template = chat_template

    @staticmethod
    def _build(spec, overrides):
        from sgl_jax.engine import Engine

        if isinstance(spec, str) and spec.endswith((".yaml", ".yml")):
            from sgl_jax.config import load_config

            return Engine(load_config(spec, overrides or None).engine)
        return Engine(spec, **overrides)

    # ------------------------------------------------------------------------------- basics
    def get_chat_template(self) -> ChatTemplate:
        if self._template is None:
            tok = self.tokenizer
            if getattr(tok, "chat_template", None):
                self._template = ChatTemplate.from_jinja(tok.chat_template, bos_token=tok.bos_token or "",
                                                         eos_token=tok.eos_token or "")
            else:
                self._template = DEFAULT
        return self._template

    def tokenize(self, text: str, first: bool = False) -> list[int]:
        return self._encoder.encode(text, add_special_tokens=first)

    def ids(self, prompt: Prompt, extra: str = "") -> list[int]:
        """The exact ids of `prompt.text + extra`: fixed ids, then the rest tokenized (BOS only at the start,
        as the server adds it)."""
        fixed = prompt.fixed_ids or []
        rest = prompt.text[prompt.fixed_chars:] + extra
        return fixed + (self.tokenize(rest, first=not fixed) if rest else [])

    def flush_cache(self) -> bool:
        return self.engine.flush_cache()

    def get_server_info(self) -> dict:
        return self.engine.get_server_info()

    def shutdown(self) -> None:
        if self._owns:
            self.engine.shutdown()

    # ------------------------------------------------------------------------------- generation
    def _kept(self, prompt_ids: list[int], out_ids: list[int], text: str) -> tuple[list[int], int]:
        """(prompt ids + the output ids that decode to a prefix of `text`, that prefix's length)."""
        out = list(out_ids)
        while out and out[-1] in self._special:
            out.pop()
        for _ in range(_MAX_TRIM_STEPS):
            d = self.tokenizer.decode(out)
            if text.startswith(d):
                return prompt_ids + out, len(d)
            if not out:
                break
            out.pop()
        return prompt_ids, 0

    def generate(self, prompt: Prompt, params) -> Completion:
        sp, top = params.native()
        ids = self.ids(prompt)
        out = self.engine.generate(input_ids=ids, sampling_params=sp, prefix_hold=prompt.gather, **top)
        if isinstance(out, list):
            kept, chars = self._kept(ids, out[0]["output_ids"], out[0]["text"])
            return Completion([o["text"] for o in out], [o["meta_info"] for o in out], kept, chars)
        kept, chars = self._kept(ids, out["output_ids"], out["text"])
        return Completion(out["text"], out["meta_info"], kept, chars)

    def generate_stream(self, prompt: Prompt, params):
        sp, top = params.native()
        ids = self.ids(prompt)
        pos, last = 0, None
        for ev in self.engine.generate(input_ids=ids, sampling_params=sp, stream=True, prefix_hold=prompt.gather,
                                       **top):
            last = ev
            delta = ev["text"][pos:]
            pos = len(ev["text"])
            yield delta, ev["meta_info"]
        if last is not None:
            kept, chars = self._kept(ids, last["output_ids"], last["text"])
            return Completion(last["text"], last["meta_info"], kept, chars)
        return None

    def prefill(self, prompt: Prompt, hold: bool = False):
        """Cache the prompt (and hold it). When every full page of it is cached already, only the hold is
        taken: a prefill request would cost the branches a whole engine step of latency for nothing."""
        ids = self.ids(prompt)
        page = self.engine.config.cache.page_size
        if hold:
            h = self.engine.hold_prefix(ids)
            if h is not None and h.num_tokens >= ((len(ids) - 1) // page) * page:
                return h, ids
            self.engine.release_prefix(h)
        self.engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 0})
        return (self.engine.hold_prefix(ids) if hold else None), ids

    def gather(self, handle, siblings: int) -> None:
        self.engine.gather_siblings(handle, siblings)

    def release(self, handle) -> None:
        self.engine.release_prefix(handle)

    # ------------------------------------------------------------------------------- select
    def _logprobs(self, id_lists, start: int) -> list[dict]:
        return self.engine.generate(input_ids=id_lists, sampling_params={"max_new_tokens": 0, "temperature": 0},
                                    return_logprob=True, return_text_in_logprobs=True, logprob_start_len=start)

    def select(self, prompt: Prompt, choices, temperature, method):
        """The prefix first, then the choices in one batch -- or, when the engine is idle and the uncached part of
        the prefix fits one step's prefill budget, the choices alone: the first computes that part and the others
        share its pages and borrow its rows for the rest, in the same step (`Scheduler._share_in_step`,
        `Scheduler._lender`), one step instead of two. Under load the prefix goes first: a prefix step packs
        other programs' prompts, where every prompt-logprob step is bounded by its logits rows
        (`full_logit_rows`). A fork branch's first call always sends the prefix first (its arrival among its
        siblings, `prefix_hold`)."""
        prefix_ids = self.ids(prompt)
        cands = [self.ids(prompt, c) for c in choices]
        uncached = self.engine.idle_uncached(prefix_ids) if prompt.gather is None else None
        own = sum(len(c) - len(prefix_ids) for c in cands)
        if uncached is None or uncached + own > self.engine.config.scheduler.max_prefill_tokens:
            self.engine.generate(input_ids=prefix_ids, sampling_params={"max_new_tokens": 0},
                                 prefix_hold=prompt.gather)
        start = max(len(prefix_ids) - 2, 0)
        outs = self._logprobs(cands, start)
        windows = [o["meta_info"]["input_token_logprobs"] for o in outs]
        outputs = [o["meta_info"].get("output_token_logprobs", []) for o in outs]

        def unconditional(token_lists):
            res = self._logprobs([list(t) for t in token_lists], -1)  # the server default, as upstream asks
            return [o["meta_info"]["input_token_logprobs"] for o in res]

        decision = decide(method, prompt.text, choices, windows, outputs, unconditional)
        i = list(choices).index(decision.decision)
        return decision, Completion(decision.decision, decision.meta_info, cands[i], len(decision.decision))
