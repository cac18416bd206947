"""Per-request sampling parameters: the `sampling_params` dict of SGLang's `/generate`, validated.

`SamplingParams.from_dict` accepts exactly the keys the SGLang frontend and upstream clients send
(see /work/shared/reference/sglang-wire-protocol.md) and turns every mistake into an
`InvalidRequestError` that names the key and the expected value, so that the server answers 400
instead of the engine failing later. Lists become tuples, so the object is hashable and frozen.

Semantics worth knowing:
* `temperature == 0` (or `top_k == 1`) means greedy; `top_k == -1` means no top-k cut.
* `max_new_tokens == 0` means prefill only: cache the prompt, return no tokens.
  `max_new_tokens: null` means "as many as the context allows" when the prompt length is known
  (upstream's meaning), else the default 128.
* `stop` may be one string or a list; a matched stop string is trimmed from the text unless
  `no_stop_trim`.
* `json_schema` may be given as an object; it is serialized to a JSON string, the form the engine gets.
* `logit_bias` keys may be strings (OpenAI sends `{"50256": -100}`); they become ints. The engine takes
  at most `max_logit_bias` entries (config; more is a 400, never a silent cut). `min_new_tokens`
  suppresses the stop tokens in slots of its own, so it never takes one of the user's.
* Token ids (`input_ids`, `logit_bias` keys, `stop_token_ids`) are checked against `vocab_size`, the
  tokenizer's vocabulary: a model whose embedding has more rows (padding) never sees or emits those ids.
* `frequency_penalty` / `presence_penalty` follow OpenAI: in [-2, 2].

No jax import: this is host code, used by the server and the scheduler alike.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from typing import Any

from sgl_jax.errors import InvalidRequestError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    n: int = 1
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    stop_regex: tuple[str, ...] = ()
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None
    choices: tuple[str, ...] | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    sampling_seed: int | None = None

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def is_constrained(self) -> bool:
        return any(x is not None for x in (self.regex, self.json_schema, self.ebnf, self.choices))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict that `from_dict` accepts back unchanged."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "logit_bias":
                v = {str(i): b for i, b in v}
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(
        cls,
        d: Mapping[str, Any] | None,
        *,
        vocab_size: int | None = None,
        max_context: int | None = None,
        prompt_len: int | None = None,
        where: str = "sampling_params",
        names: Mapping[str, str] | None = None,
        max_logit_bias: int | None = None,
        max_stop_token_ids: int | None = None,
    ) -> SamplingParams:
        """Validate and normalize a wire-format dict.

        `where` prefixes field names in messages ("sampling_params.top_p"); `names` renames keys in
        messages for callers that speak another dialect (e.g. {"max_new_tokens": "max_tokens"}).
        `max_logit_bias` / `max_stop_token_ids` (the engine's limits; None = unchecked) bound the number
        of `logit_bias` entries / `stop_token_ids`.
        """
        return _Parser(where, names or {}, max_logit_bias, max_stop_token_ids).parse(
            d, vocab_size, max_context, prompt_len)


def check_token_ids(ids: Any, vocab_size: int, field: str = "input_ids") -> list[int]:
    """`ids` as a list of token ids in [0, vocab_size); InvalidRequestError naming the first bad one."""
    if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise InvalidRequestError(f"'{field}' must be a list of integers", field=field)
    for j, t in enumerate(ids):
        if not 0 <= t < vocab_size:
            raise InvalidRequestError(f"'{field}'[{j}] is {t}, not a token id: the vocabulary is [0, {vocab_size})",
                                      field=field)
    return list(ids)


_FIELDS = {f.name: f for f in dataclasses.fields(SamplingParams)}
KNOWN_KEYS = frozenset(_FIELDS)


class _Parser:
    def __init__(self, where: str, names: Mapping[str, str], max_logit_bias: int | None = None,
                 max_stop_token_ids: int | None = None):
        self.where = where
        self.names = names
        self.max_logit_bias = max_logit_bias
        self.max_stop_token_ids = max_stop_token_ids

    def name(self, key: str) -> str:
        key = self.names.get(key, key)
        return f"{self.where}.{key}" if self.where else key

    def fail(self, key: str, msg: str):
        raise InvalidRequestError(f"{self.name(key)} {msg}", field=key)

    # -- scalar checks ---------------------------------------------------------------------------
    def int_(self, key: str, v: Any, lo: int | None = None) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(key, f"must be an integer, got {v!r}")
        if lo is not None and v < lo:
            self.fail(key, f"must be >= {lo}, got {v!r}")
        return v

    def float_(self, key: str, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.fail(key, f"must be a number, got {v!r}")
        v = float(v)
        if not math.isfinite(v):
            self.fail(key, f"must be a finite number, got {v!r}")
        return v

    def bool_(self, key: str, v: Any) -> bool:
        if not isinstance(v, bool):
            self.fail(key, f"must be true or false, got {v!r}")
        return v

    def str_or_none(self, key: str, v: Any) -> str | None:
        if v is not None and not isinstance(v, str):
            self.fail(key, f"must be a string or null, got {type(v).__name__} {v!r}")
        return v

    def str_tuple(self, key: str, v: Any) -> tuple[str, ...]:
        if v is None:
            return ()
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, (list, tuple)):
            self.fail(key, f"must be a string or a list of strings, got {v!r}")
        for i, s in enumerate(v):
            if not isinstance(s, str) or not s:
                raise InvalidRequestError(
                    f"{self.name(key)}[{i}] must be a non-empty string, got {s!r}", field=key)
        return tuple(v)

    def token_id(self, key: str, v: Any, vocab_size: int | None, label: str) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise InvalidRequestError(f"{self.name(key)}{label} must be a token id (integer), got {v!r}", field=key)
        if v < 0 or (vocab_size is not None and v >= vocab_size):
            bound = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
            raise InvalidRequestError(f"{self.name(key)}{label} must be a token id in {bound}, got {v}", field=key)
        return v

    # -- the dict --------------------------------------------------------------------------------
    def parse(self, d, vocab_size, max_context, prompt_len) -> SamplingParams:
        """Long because it has one short branch per wire key, in the order of the wire format."""
        if d is None:
            d = {}
        if not isinstance(d, Mapping):
            raise InvalidRequestError(
                f"{self.where or 'sampling_params'} must be a JSON object, got {type(d).__name__} {d!r}",
                field=self.where or "sampling_params")
        for k in d:
            if k not in KNOWN_KEYS:
                raise InvalidRequestError(
                    f"unknown sampling parameter {self.name(str(k))!r}; known: {', '.join(sorted(KNOWN_KEYS))}",
                    field=str(k))
        # null means "the default" for every key (and "to the context limit" for max_new_tokens).
        v = {k: x for k, x in d.items() if x is not None}
        out: dict[str, Any] = {}

        if "max_new_tokens" in v:
            out["max_new_tokens"] = self.int_("max_new_tokens", v["max_new_tokens"], lo=0)
        elif "max_new_tokens" in d and max_context is not None and prompt_len is not None:
            out["max_new_tokens"] = max(max_context - prompt_len, 0)
        if "min_new_tokens" in v:
            out["min_new_tokens"] = self.int_("min_new_tokens", v["min_new_tokens"], lo=0)
        if "n" in v:
            out["n"] = self.int_("n", v["n"], lo=1)
        if "top_k" in v:
            k = self.int_("top_k", v["top_k"])
            if k == 0 or k < -1:
                self.fail("top_k", f"must be -1 (off) or >= 1, got {k}")
            out["top_k"] = k
        if "sampling_seed" in v:
            out["sampling_seed"] = self.int_("sampling_seed", v["sampling_seed"])

        if "temperature" in v:
            t = self.float_("temperature", v["temperature"])
            if t < 0:
                self.fail("temperature", f"must be >= 0 (0 = greedy), got {t}")
            out["temperature"] = t
        if "top_p" in v:
            p = self.float_("top_p", v["top_p"])
            if not 0.0 < p <= 1.0:
                self.fail("top_p", f"must be in (0, 1], got {p}")
            out["top_p"] = p
        if "min_p" in v:
            p = self.float_("min_p", v["min_p"])
            if not 0.0 <= p <= 1.0:
                self.fail("min_p", f"must be in [0, 1], got {p}")
            out["min_p"] = p
        for key in ("frequency_penalty", "presence_penalty"):
            if key in v:
                x = self.float_(key, v[key])
                if not -2.0 <= x <= 2.0:
                    self.fail(key, f"must be in [-2, 2], got {x}")
                out[key] = x
        if "repetition_penalty" in v:
            x = self.float_("repetition_penalty", v["repetition_penalty"])
            if x <= 0:
                self.fail("repetition_penalty", f"must be > 0 (1 = off), got {x}")
            out["repetition_penalty"] = x

        for key in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"):
            if key in v:
                out[key] = self.bool_(key, v[key])

        if "stop" in v:
            out["stop"] = self.str_tuple("stop", v["stop"])
        if "stop_regex" in v:
            pats = self.str_tuple("stop_regex", v["stop_regex"])
            for i, p in enumerate(pats):
                try:
                    re.compile(p)
                except re.error as e:
                    raise InvalidRequestError(
                        f"{self.name('stop_regex')}[{i}] is not a valid regular expression ({e}): {p!r}",
                        field="stop_regex") from None
            out["stop_regex"] = pats
        if "stop_token_ids" in v:
            ids = v["stop_token_ids"]
            if not isinstance(ids, (list, tuple)):
                self.fail("stop_token_ids", f"must be a list of token ids, got {ids!r}")
            if self.max_stop_token_ids is not None and len(ids) > self.max_stop_token_ids:
                self.fail("stop_token_ids", f"has {len(ids)} entries; at most {self.max_stop_token_ids} are "
                                            "allowed (engine config max_stop_token_ids)")
            out["stop_token_ids"] = tuple(
                self.token_id("stop_token_ids", t, vocab_size, f"[{i}]") for i, t in enumerate(ids))

        for key in ("regex", "ebnf"):
            if key in v:
                s = self.str_or_none(key, v[key])
                if s == "":
                    self.fail(key, "must be a non-empty string or null, got ''")
                out[key] = s
        if "json_schema" in v:
            js = v["json_schema"]
            if isinstance(js, (dict, bool)):
                js = json.dumps(js)
            elif isinstance(js, str):
                try:
                    json.loads(js)
                except ValueError as e:
                    self.fail("json_schema", f"must be a JSON schema (object or JSON string); the string is not valid JSON: {e}")
            else:
                self.fail("json_schema", f"must be a JSON schema (object or JSON string), got {js!r}")
            out["json_schema"] = js
        if "choices" in v:
            ch = v["choices"]
            if not isinstance(ch, (list, tuple)) or not ch:
                self.fail("choices", f"must be a non-empty list of strings, got {ch!r}")
            out["choices"] = self.str_tuple("choices", ch)
        constraints = [k for k in ("regex", "json_schema", "ebnf", "choices") if k in out]
        if len(constraints) > 1:
            raise InvalidRequestError(
                f"{self.where or 'request'}: at most one of regex, json_schema, ebnf, choices may be set, "
                f"got {', '.join(constraints)}", field=constraints[1])

        if "logit_bias" in v:
            out["logit_bias"] = self.logit_bias(v["logit_bias"], vocab_size)

        sp = SamplingParams(**out)
        if sp.min_new_tokens > sp.max_new_tokens:
            self.fail("min_new_tokens",
                      f"({sp.min_new_tokens}) must be <= {self.name('max_new_tokens')} ({sp.max_new_tokens})")
        if prompt_len is not None and max_context is not None:
            if prompt_len > max_context:
                raise InvalidRequestError(
                    f"the prompt has {prompt_len} tokens, more than the context limit max_context_len={max_context}",
                    field="prompt")
            if prompt_len + sp.max_new_tokens > max_context:
                self.fail("max_new_tokens",
                          f"({sp.max_new_tokens}) + prompt length ({prompt_len}) = {prompt_len + sp.max_new_tokens} "
                          f"exceeds the context limit max_context_len={max_context}; "
                          f"ask for at most {max_context - prompt_len} new tokens")
        return sp

    def logit_bias(self, lb: Any, vocab_size: int | None) -> tuple[tuple[int, float], ...]:
        if isinstance(lb, Mapping):
            items = list(lb.items())
        elif isinstance(lb, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in lb):
            items = [tuple(p) for p in lb]
        else:
            self.fail("logit_bias", f"must be an object mapping token ids to biases, got {lb!r}")
        if self.max_logit_bias is not None and len(items) > self.max_logit_bias:
            self.fail("logit_bias", f"has {len(items)} entries; at most {self.max_logit_bias} are allowed "
                                    "(engine config max_logit_bias)")
        out: dict[int, float] = {}
        for k, b in items:
            tid = k
            if isinstance(k, str):
                try:
                    tid = int(k.strip())
                except ValueError:
                    raise InvalidRequestError(
                        f"{self.name('logit_bias')} key {k!r} must be a token id (an integer)", field="logit_bias") from None
            self.token_id("logit_bias", tid, vocab_size, f"[{k!r}]")
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b):
                raise InvalidRequestError(
                    f"{self.name('logit_bias')}[{k!r}] must be a finite number, got {b!r}", field="logit_bias")
            out[tid] = float(b)
        return tuple(sorted(out.items()))
