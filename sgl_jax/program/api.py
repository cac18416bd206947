"""The primitives a program is written with: SGLang's frontend names and arguments.

`gen`, `gen_int`, `gen_string`, `select`, the roles (`system`/`user`/`assistant`, their `_begin`/`_end`
forms), `function`, and the default-backend helpers. Every primitive validates its arguments when called
(a bad keyword is a TypeError naming the primitive; an empty `choices`, a regex that does not compile, a
json_schema that is not JSON raise `ProgramError`), so a malformed program fails before any request is sent.
Host code: no jax import.
"""

from __future__ import annotations

from sgl_jax.program import ir
from sgl_jax.program.choices import token_length_normalized

_DEFAULT_BACKEND = None


def set_default_backend(backend) -> None:
    global _DEFAULT_BACKEND
    _DEFAULT_BACKEND = backend


def get_default_backend():
    return _DEFAULT_BACKEND


def flush_cache(backend=None) -> bool:
    backend = backend or _DEFAULT_BACKEND
    return False if backend is None else backend.flush_cache()


def get_server_info(backend=None):
    backend = backend or _DEFAULT_BACKEND
    return None if backend is None else backend.get_server_info()


def function(func=None, *, num_api_spec_tokens: int | None = None):
    """`@function` or `@function(num_api_spec_tokens=N)`: make an SGLang program from `def f(s, ...)`."""
    from sgl_jax.program.sglfunction import SglFunction

    if func is not None:
        return SglFunction(func, num_api_spec_tokens=num_api_spec_tokens)
    return lambda f: SglFunction(f, num_api_spec_tokens=num_api_spec_tokens)


def gen(name: str | None = None, max_tokens: int | None = None, min_tokens: int | None = None, n: int | None = None,
        stop=None, stop_token_ids=None, stop_regex=None, temperature: float | None = None,
        top_p: float | None = None, top_k: int | None = None, min_p: float | None = None,
        frequency_penalty: float | None = None, presence_penalty: float | None = None,
        ignore_eos: bool | None = None, return_logprob: bool | None = None, logprob_start_len: int | None = None,
        top_logprobs_num: int | None = None, return_text_in_logprobs: bool | None = None, dtype=None,
        choices=None, choices_method=None, regex: str | None = None, json_schema=None) -> ir.Expr:
    """Generate into variable `name`. Unset arguments inherit the values given to `run(...)`.

    With `choices`, this is `select`; `dtype` (int, float, bool, str) constrains to that literal's regex.
    """
    return ir.make_gen(name, choices=choices, choices_method=choices_method, max_new_tokens=max_tokens,
                       min_new_tokens=min_tokens, n=n, stop=stop, stop_token_ids=stop_token_ids,
                       stop_regex=stop_regex, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                       frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                       ignore_eos=ignore_eos, return_logprob=return_logprob, logprob_start_len=logprob_start_len,
                       top_logprobs_num=top_logprobs_num, return_text_in_logprobs=return_text_in_logprobs,
                       dtype=dtype, regex=regex, json_schema=json_schema)


def gen_int(name: str | None = None, max_tokens: int | None = None, n: int | None = None, stop=None,
            stop_token_ids=None, stop_regex=None, temperature: float | None = None, top_p: float | None = None,
            top_k: int | None = None, min_p: float | None = None, frequency_penalty: float | None = None,
            presence_penalty: float | None = None, ignore_eos: bool | None = None,
            return_logprob: bool | None = None, logprob_start_len: int | None = None,
            top_logprobs_num: int | None = None, return_text_in_logprobs: bool | None = None) -> ir.Expr:
    """`gen(dtype=int)`."""
    return gen(name, max_tokens, None, n, stop, stop_token_ids, stop_regex, temperature, top_p, top_k, min_p,
               frequency_penalty, presence_penalty, ignore_eos, return_logprob, logprob_start_len,
               top_logprobs_num, return_text_in_logprobs, dtype=int)


def gen_string(name: str | None = None, max_tokens: int | None = None, n: int | None = None, stop=None,
               stop_token_ids=None, stop_regex=None, temperature: float | None = None, top_p: float | None = None,
               top_k: int | None = None, min_p: float | None = None, frequency_penalty: float | None = None,
               presence_penalty: float | None = None, ignore_eos: bool | None = None,
               return_logprob: bool | None = None, logprob_start_len: int | None = None,
               top_logprobs_num: int | None = None, return_text_in_logprobs: bool | None = None) -> ir.Expr:
    """`gen(dtype=str)`: a double-quoted string."""
    return gen(name, max_tokens, None, n, stop, stop_token_ids, stop_regex, temperature, top_p, top_k, min_p,
               frequency_penalty, presence_penalty, ignore_eos, return_logprob, logprob_start_len,
               top_logprobs_num, return_text_in_logprobs, dtype=str)


def select(name: str | None = None, choices=None, temperature: float = 0.0,
           choices_method=token_length_normalized) -> ir.Expr:
    """Append the choice the model scores best (see choices.py for the methods)."""
    return ir.Select(name, ir.check_choices(choices, "select"), float(temperature),
                     ir.check_choices_method(choices_method))


def image(expr) -> ir.Expr:
    return ir.Image(expr)


def _role(name: str, expr=None) -> ir.Expr:
    if expr is None:
        return ir.RoleBegin(name) + ir.RoleEnd(name)
    return ir.RoleBegin(name) + expr + ir.RoleEnd(name)


def system(expr=None) -> ir.Expr:
    return _role("system", expr)


def user(expr=None) -> ir.Expr:
    return _role("user", expr)


def assistant(expr=None) -> ir.Expr:
    return _role("assistant", expr)


def system_begin() -> ir.Expr:
    return ir.RoleBegin("system")


def system_end() -> ir.Expr:
    return ir.RoleEnd("system")


def user_begin() -> ir.Expr:
    return ir.RoleBegin("user")


def user_end() -> ir.Expr:
    return ir.RoleEnd("user")


def assistant_begin() -> ir.Expr:
    return ir.RoleBegin("assistant")


def assistant_end() -> ir.Expr:
    return ir.RoleEnd("assistant")
