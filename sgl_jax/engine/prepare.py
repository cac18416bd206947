"""One request path: every front end turns its input into `PreparedRequest`s here, once.

The server, the Engine API and the frontend language all call `RequestPreparer.prepare` (in the
caller's thread -- the server runs it in a worker thread, never on its event loop) and hand the
result to the engine. Preparing tokenizes the prompt, validates the sampling parameters, the
logprob options and the constraint (syntax, and whether any valid output fits in `max_new_tokens`),
and compiles the stop regexes into linear-time matchers. Nothing is validated or tokenized again
after this; a bad request raises `InvalidRequestError` naming the field before anything is queued.

`expand_batch` is the one place that expands SGLang's single / batch / `n > 1` forms into
per-sequence items. Host code: no jax import.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from sgl_jax.errors import InvalidRequestError
from sgl_jax.sampling_params import SamplingParams, check_token_ids

from sgl_jax.engine.stops import StopRegex, compile_stop_regex
from sgl_jax.models.tokenizer import prefix_encoder


@dataclasses.dataclass(frozen=True)
class PreparedRequest:
    """A validated, tokenized request for one sequence: what the engine queues."""

    input_ids: tuple[int, ...]
    params: SamplingParams
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    rid: str | None = None
    constraint: tuple[str, Any] | None = None  # (kind, spec): regex | json | choices | ebnf
    stop_regex: tuple[StopRegex, ...] = ()
    stop_ids: frozenset = frozenset()  # EOS ids (unless ignore_eos) and the request's stop_token_ids

    def with_rid(self, rid: str | None) -> "PreparedRequest":
        return dataclasses.replace(self, rid=rid)


def constraint_of(sp: SamplingParams) -> tuple[str, Any] | None:
    """The request's one structured-output constraint, or None; more than one is an error."""
    given = [(k, v) for k, v in (("regex", sp.regex), ("json", sp.json_schema), ("choices", sp.choices),
                                 ("ebnf", sp.ebnf)) if v]
    if len(given) > 1:
        raise InvalidRequestError(f"at most one of regex, json_schema, choices, ebnf may be set; got "
                                  f"{', '.join(k for k, _ in given)}")
    return given[0] if given else None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class RequestPreparer:
    """Validates and tokenizes requests against one model (vocabulary, context, limits).

    `check_constraint(sp)` is the constraint manager's validation (raises InvalidRequestError).
    """

    def __init__(self, tokenizer, *, vocab_size: int, max_context_len: int, max_top_logprobs: int,
                 max_logit_bias: int | None = None, max_stop_token_ids: int | None = None,
                 check_constraint: Callable[[SamplingParams], None] | None = None):
        self.tokenizer = tokenizer
        self._encoder = prefix_encoder(tokenizer)  # requests' texts share prefixes: tokenized past them
        self.max_logit_bias, self.max_stop_token_ids = max_logit_bias, max_stop_token_ids
        self.vocab_size = vocab_size
        self.max_context_len = max_context_len
        self.max_top_logprobs = max_top_logprobs
        self.check_constraint = check_constraint

    def prompt_ids(self, text, input_ids) -> list[int]:
        if (text is None) == (input_ids is None):
            raise InvalidRequestError("exactly one of 'text' and 'input_ids' must be given", field="text")
        if text is not None:
            if not isinstance(text, str):
                raise InvalidRequestError(f"'text' must be a string, got {type(text).__name__}", field="text")
            ids = self._encoder.encode(text)
            if not ids:
                raise InvalidRequestError(
                    "'text' is empty and this model's tokenizer adds no BOS token, so the prompt would have no "
                    "tokens; send at least one character (or input_ids)" if not text else
                    f"'text' {text[:40]!r} encodes to no tokens", field="text")
            return ids
        input_ids = check_token_ids(input_ids, self.vocab_size, "input_ids")
        if not input_ids:
            raise InvalidRequestError("'input_ids' is empty: the prompt must have at least one token",
                                      field="input_ids")
        return list(input_ids)

    def prepare(self, *, text=None, input_ids=None, sampling_params=None, return_logprob=False,
                logprob_start_len=-1, top_logprobs_num=0, return_text_in_logprobs=False,
                rid=None) -> PreparedRequest:
        """Validate and tokenize one sequence's request; raises InvalidRequestError naming the field."""
        ids = self.prompt_ids(text, input_ids)
        sp = SamplingParams.from_dict(
            sampling_params, vocab_size=self.vocab_size, max_context=self.max_context_len, prompt_len=len(ids),
            max_logit_bias=self.max_logit_bias, max_stop_token_ids=self.max_stop_token_ids)
        if len(ids) >= self.max_context_len:
            raise InvalidRequestError(f"the prompt has {len(ids)} tokens; the context length is "
                                      f"{self.max_context_len}", field="input_ids")
        if not isinstance(return_logprob, bool):
            raise InvalidRequestError("'return_logprob' must be a bool", field="return_logprob")
        if not isinstance(return_text_in_logprobs, bool):
            raise InvalidRequestError("'return_text_in_logprobs' must be a bool", field="return_text_in_logprobs")
        if not _is_int(logprob_start_len) or logprob_start_len < -1:
            raise InvalidRequestError(f"'logprob_start_len' must be an int >= -1, got {logprob_start_len!r}",
                                      field="logprob_start_len")
        if logprob_start_len >= len(ids) and return_logprob:
            raise InvalidRequestError(f"'logprob_start_len' ({logprob_start_len}) must be smaller than the prompt "
                                      f"length ({len(ids)})", field="logprob_start_len")
        if not _is_int(top_logprobs_num) or not 0 <= top_logprobs_num <= self.max_top_logprobs:
            raise InvalidRequestError(f"'top_logprobs_num' must be an int in [0, {self.max_top_logprobs}], "
                                      f"got {top_logprobs_num!r}", field="top_logprobs_num")
        if rid is not None and (not isinstance(rid, str) or not rid):
            raise InvalidRequestError(f"'rid' must be a non-empty string, got {rid!r}", field="rid")
        if return_logprob and logprob_start_len == -1:
            # the default window is the last prompt token's entry, as upstream's server gives it (its frontend's
            # unconditional-likelihood select reads that entry)
            logprob_start_len = len(ids) - 1
        con = constraint_of(sp)
        if con is not None and self.check_constraint is not None:
            self.check_constraint(sp)
        stop_regex = tuple(compile_stop_regex(p) for p in sp.stop_regex)
        stop_ids = set(sp.stop_token_ids)
        if not sp.ignore_eos:
            stop_ids |= set(self.tokenizer.stop_token_ids)
        return PreparedRequest(
            input_ids=tuple(ids), params=sp, return_logprob=return_logprob,
            logprob_start_len=logprob_start_len, top_logprobs_num=top_logprobs_num if return_logprob else 0,
            return_text_in_logprobs=return_text_in_logprobs, rid=rid, constraint=con, stop_regex=stop_regex,
            stop_ids=frozenset(stop_ids))


def nth_sample(sp: dict | None, j: int) -> dict:
    """The sampling-params dict of the j-th of n samples of one prompt (one engine sequence each): without
    `n`, and a given sampling_seed offset by j so the samples differ. Used by every front end."""
    out = dict(sp or {})
    out.pop("n", None)
    seed = out.get("sampling_seed")
    if j and isinstance(seed, int) and not isinstance(seed, bool):
        out["sampling_seed"] = seed + j
    return out


def expand_batch(prompt, input_ids, sampling_params) -> tuple[bool, list[tuple[dict, dict]]]:
    """SGLang's single / batch / n > 1 forms -> (batched, [(prompt kwargs, sampling-params dict)])."""
    if prompt is not None and input_ids is not None:
        raise InvalidRequestError("give either 'prompt'/'text' or 'input_ids', not both", field="text")
    if prompt is None and input_ids is None:
        raise InvalidRequestError("one of 'prompt'/'text' and 'input_ids' is required", field="text")
    batched = isinstance(prompt, list) or (isinstance(input_ids, list) and bool(input_ids)
                                           and isinstance(input_ids[0], list))
    if batched:
        items = prompt if prompt is not None else input_ids
    else:
        items = [prompt if prompt is not None else input_ids]
    if batched and not items:
        raise InvalidRequestError("the batch is empty", field="text")
    if isinstance(sampling_params, list):
        if len(sampling_params) != len(items):
            raise InvalidRequestError(f"'sampling_params' has {len(sampling_params)} entries for "
                                      f"{len(items)} prompts", field="sampling_params")
        sps = sampling_params
    else:
        sps = [sampling_params] * len(items)
    out = []
    for item, sp in zip(items, sps):
        n = (sp or {}).get("n", 1) if isinstance(sp, dict) else 1
        if not _is_int(n) or n < 1:
            raise InvalidRequestError(f"sampling param 'n' must be an int >= 1, got {n!r}", field="n")
        for i in range(n):
            kw = {"text": item} if prompt is not None else {"input_ids": item}
            out.append((kw, nth_sample(sp, i)))
    return batched or len(out) > 1, out
