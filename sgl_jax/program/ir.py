"""The program's expressions: what `gen`, `select`, roles and constant text build, before any backend runs them.

A program appends expressions to its state (`s += ...`); the interpreter (`interpreter.py`) executes them in
order on the state's worker. Expressions are plain frozen data: they are checked when they are built (a bad
argument raises here, naming the primitive and the argument, before any request is sent) and are shared
freely between states (a fork's branches, a batch's programs).

Sampling parameters follow SGLang's frontend: `SamplingDefaults` holds the program-level values given to
`run(...)`; a `gen` carries only the fields it sets (`None` = inherit), and `merge` overlays them.
Host code: no jax import.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Sequence

# Regexes for `gen(dtype=...)`, the same languages as upstream's frontend sends for the four dtypes.
REGEX_INT = r"[-+]?[0-9]+[ \n]*"
REGEX_FLOAT = r"[-+]?[0-9]*\.?[0-9]+[ \n]*"
REGEX_BOOL = r"(True|False)"
REGEX_STR = r"\"[\w\d\s]*\""
DTYPE_REGEX = {"int": REGEX_INT, "float": REGEX_FLOAT, "bool": REGEX_BOOL, "str": REGEX_STR}

ROLES = ("system", "user", "assistant")


class ProgramError(ValueError):
    """A program is malformed (a bad primitive argument, a nested role, ...); raised before any request."""


# The generation fields a `gen` may set and `run(...)` may default, in the order the wire protocol lists them.
SAMPLING_FIELDS = ("max_new_tokens", "min_new_tokens", "n", "stop", "stop_token_ids", "stop_regex", "temperature",
                   "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty", "ignore_eos",
                   "return_logprob", "logprob_start_len", "top_logprobs_num", "return_text_in_logprobs", "dtype",
                   "regex", "json_schema")
# Fields that are request options, not sampling parameters, on the native API.
LOGPROB_FIELDS = ("return_logprob", "logprob_start_len", "top_logprobs_num", "return_text_in_logprobs")


@dataclasses.dataclass(frozen=True)
class SamplingDefaults:
    """Program-level sampling values (`fn.run(temperature=0, ...)`); upstream's defaults."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    n: int = 1
    stop: tuple = ()
    stop_token_ids: tuple = ()
    stop_regex: tuple = ()
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    ignore_eos: bool = False
    return_logprob: bool | None = None
    logprob_start_len: int | None = None
    top_logprobs_num: int | None = None
    return_text_in_logprobs: bool | None = None
    dtype: str | None = None
    regex: str | None = None
    json_schema: str | None = None

    def merge(self, overrides: dict) -> "SamplingDefaults":
        """These defaults with a gen's set fields on top (a field set to None inherits)."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def with_stop(self, extra: Sequence[str]) -> "SamplingDefaults":
        """Add the chat template's stop strings (kept after the user's own)."""
        if not extra:
            return self
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return dataclasses.replace(self, stop=tuple(stop) + tuple(s for s in extra if s not in stop))

    def regex_for_request(self) -> str | None:
        """`dtype` wins over `regex` (upstream's rule); None when unconstrained."""
        if self.dtype is not None:
            return DTYPE_REGEX[self.dtype]
        return self.regex

    def native(self) -> tuple[dict, dict]:
        """(sampling_params, top-level logprob options) as the native /generate body carries them."""
        sp = {k: getattr(self, k) for k in SAMPLING_FIELDS if k not in LOGPROB_FIELDS and k not in ("dtype",)}
        sp["stop"] = [sp["stop"]] if isinstance(sp["stop"], str) else list(sp["stop"])
        sp["stop_token_ids"] = list(sp["stop_token_ids"])
        sp["stop_regex"] = [sp["stop_regex"]] if isinstance(sp["stop_regex"], str) else list(sp["stop_regex"])
        sp["regex"] = self.regex_for_request()
        top = {k: getattr(self, k) for k in LOGPROB_FIELDS if getattr(self, k) is not None}
        return sp, top


def _check_dtype(dtype) -> str | None:
    if dtype is None:
        return None
    name = dtype.__name__ if isinstance(dtype, type) else dtype
    if name not in DTYPE_REGEX:
        raise ProgramError(f"gen: 'dtype' must be one of int, float, bool, str (or their names), got {dtype!r}")
    return name


def _check_regex(regex: str | None, primitive: str) -> None:
    if regex is None:
        return
    if not isinstance(regex, str) or not regex:
        raise ProgramError(f"{primitive}: 'regex' must be a non-empty string, got {regex!r}")
    from sgl_jax.constrained.regex import RegexError, parse

    try:
        parse(regex)
    except RegexError as e:
        raise ProgramError(f"{primitive}: 'regex' {regex!r} does not compile: {e}") from None


def _check_json_schema(schema) -> str | None:
    if schema is None:
        return None
    if isinstance(schema, dict):
        return json.dumps(schema)
    if not isinstance(schema, str):
        raise ProgramError(f"gen: 'json_schema' must be a dict or a JSON string, got {type(schema).__name__}")
    try:
        json.loads(schema)
    except ValueError as e:
        raise ProgramError(f"gen: 'json_schema' is not valid JSON: {e}") from None
    return schema


def check_choices(choices, primitive: str) -> tuple[str, ...]:
    if isinstance(choices, str) or not isinstance(choices, (list, tuple)):
        raise ProgramError(f"{primitive}: 'choices' must be a list of strings, got {type(choices).__name__}")
    if not choices:
        raise ProgramError(f"{primitive}: 'choices' is empty")
    bad = [c for c in choices if not isinstance(c, str)]
    if bad:
        raise ProgramError(f"{primitive}: every choice must be a string, got {bad[0]!r}")
    return tuple(choices)


# ------------------------------------------------------------------------------------------ expressions
class Expr:
    """Base of every program expression; `a + b` concatenates (upstream programs write `"Q: " + gen(...)`)."""

    def __add__(self, other) -> "Concat":
        return Concat.of(self, other)

    def __radd__(self, other) -> "Concat":
        return Concat.of(other, self)


@dataclasses.dataclass(frozen=True, eq=False)
class Constant(Expr):
    text: str


@dataclasses.dataclass(frozen=True, eq=False)
class Concat(Expr):
    parts: tuple

    @staticmethod
    def of(*items) -> "Concat":
        parts: list = []
        for x in items:
            if isinstance(x, Concat):
                parts.extend(x.parts)
            else:
                parts.append(as_expr(x))
        return Concat(tuple(parts))


@dataclasses.dataclass(frozen=True, eq=False)
class Gen(Expr):
    name: str | None
    params: dict  # the SAMPLING_FIELDS this gen sets (None-valued fields left out)


@dataclasses.dataclass(frozen=True, eq=False)
class Select(Expr):
    name: str | None
    choices: tuple
    temperature: float
    method: Any  # a ChoicesMethod (choices.py)


@dataclasses.dataclass(frozen=True, eq=False)
class RoleBegin(Expr):
    role: str


@dataclasses.dataclass(frozen=True, eq=False)
class RoleEnd(Expr):
    role: str


@dataclasses.dataclass(frozen=True, eq=False)
class VarScopeBegin(Expr):
    name: str


@dataclasses.dataclass(frozen=True, eq=False)
class VarScopeEnd(Expr):
    name: str


@dataclasses.dataclass(frozen=True, eq=False)
class Image(Expr):
    path: Any


@dataclasses.dataclass(frozen=True, eq=False)
class JoinText(Expr):
    """`join("concate_and_append")`: append each branch's text after the fork point."""

    states: tuple


def as_expr(x) -> Expr:
    if isinstance(x, Expr):
        return x
    if isinstance(x, str):
        return Constant(x)
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return Constant(str(x))
    raise ProgramError(f"cannot append a {type(x).__name__} to a program state: {x!r} (use a string or a primitive)")


def flatten(expr: Expr) -> list[Expr]:
    return [e for p in expr.parts for e in flatten(p)] if isinstance(expr, Concat) else [expr]


def make_gen(name, *, choices=None, choices_method=None, **params) -> Expr:
    """Build a `gen` (or a `select` when `choices` is given), validating every argument."""
    if name is not None and not isinstance(name, str):
        raise ProgramError(f"gen: 'name' must be a string, got {name!r}")
    if choices is not None:
        from sgl_jax.program.choices import token_length_normalized

        temperature = params.get("temperature")
        return Select(name, check_choices(choices, "gen"), 0.0 if temperature is None else float(temperature),
                      choices_method or token_length_normalized)
    params["dtype"] = _check_dtype(params.get("dtype"))
    _check_regex(params.get("regex"), "gen")
    params["json_schema"] = _check_json_schema(params.get("json_schema"))
    set_ = [k for k in ("regex", "json_schema") if params.get(k) is not None]
    if len(set_) > 1:
        raise ProgramError("gen: at most one of 'regex' and 'json_schema' may be set")
    n = params.get("n")
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ProgramError(f"gen: 'n' must be an int >= 1, got {n!r}")
    mt = params.get("max_new_tokens")
    if mt is not None and (not isinstance(mt, int) or mt < 0):
        raise ProgramError(f"gen: 'max_tokens' must be an int >= 0, got {mt!r}")
    for key in ("stop", "stop_regex"):
        v = params.get(key)
        if v is not None and not isinstance(v, str) and not (
                isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)):
            raise ProgramError(f"gen: {key!r} must be a string or a list of strings, got {v!r}")
        if isinstance(v, list):
            params[key] = tuple(v)
    if isinstance(params.get("stop_token_ids"), list):
        params["stop_token_ids"] = tuple(params["stop_token_ids"])
    return Gen(name, {k: v for k, v in params.items() if v is not None})


def check_choices_method(method: Callable) -> Callable:
    if not callable(method):
        raise ProgramError(f"select: 'choices_method' must be a choices method, got {method!r}")
    return method
