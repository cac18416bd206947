"""`SglFunction`: what `@function` makes of `def program(s, ...)`, and how a program (or a batch) is run.

A program's life:
 1. `run(**kw)` checks the arguments against the signature (before anything is sent), builds the run-level
    `SamplingDefaults`, and makes a state whose executor uses the backend's chat template.
 2. The body runs in the caller's thread (in a background thread with `stream=True`), submitting expressions;
    the executor runs them on its worker and calls the backend.
 3. When the body returns, the executor drains and the state is returned; variables, text, messages and
    meta_info are read from it.

`run_batch` first traces the programs (runs each body up to its first generation against a backend that
answers nothing) to find the longest constant prefix they share, prefills it once, then runs the programs on
a thread pool; one program's failure is recorded on its own state and the others finish. `arun` /
`arun_batch` are the asyncio forms. Host code: no jax import.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import inspect
import os
import threading

from sgl_jax.program import api, ir
from sgl_jax.program.backends.base import Backend, Prompt
from sgl_jax.program.executor import Executor
from sgl_jax.program.state import ProgramState

_RUN_PARAMS = ("max_new_tokens", "n", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k",
               "min_p", "frequency_penalty", "presence_penalty", "ignore_eos", "return_logprob",
               "logprob_start_len", "top_logprobs_num", "return_text_in_logprobs", "min_new_tokens")
_PLACEHOLDER = "\x00"


class _StopTrace(Exception):
    pass


class _TraceBackend(Backend):
    """Answers no call: tracing stops at the program's first generation."""

    def __init__(self, template):
        self.template = template

    def get_chat_template(self):
        return self.template

    def generate(self, prompt, params):
        raise _StopTrace()

    def select(self, prompt, choices, temperature, method):
        raise _StopTrace()


@dataclasses.dataclass
class TracedProgram:
    """A program's expressions up to its first generation, and the constant text they make (`prefix`)."""

    exprs: list
    prefix: str


def _defaults(kw: dict, program_args=()) -> ir.SamplingDefaults:
    """Pop the run-level sampling keywords from `kw`; a name the program itself takes stays its argument."""
    d = {k: kw.pop(k) for k in _RUN_PARAMS if k in kw and k not in program_args}
    for key in ("stop", "stop_token_ids", "stop_regex"):
        v = d.get(key)
        if v is None:
            d.pop(key, None)
        elif isinstance(v, list):
            d[key] = tuple(v)
    return ir.SamplingDefaults().merge(d)


class SglFunction:
    def __init__(self, func, num_api_spec_tokens: int | None = None, bind_arguments: dict | None = None):
        params = list(inspect.signature(func).parameters)
        if not params or params[0] != "s":
            raise ir.ProgramError(f"function {func.__name__}: the first parameter must be 's', got {params[:1]}")
        if num_api_spec_tokens is not None and (not isinstance(num_api_spec_tokens, int) or num_api_spec_tokens < 1):
            raise ir.ProgramError(f"function: 'num_api_spec_tokens' must be an int >= 1, got {num_api_spec_tokens!r}")
        self.func, self.num_api_spec_tokens = func, num_api_spec_tokens
        self.bind_arguments = dict(bind_arguments or {})
        self.signature = inspect.signature(func)
        self.arg_names = params[1:]
        self.__name__ = getattr(func, "__name__", "program")
        self.__doc__ = func.__doc__

    def bind(self, **kwargs) -> "SglFunction":
        unknown = [k for k in kwargs if k not in self.arg_names]
        if unknown:
            raise TypeError(f"{self.__name__}.bind: unknown argument(s) {unknown}; the program takes {self.arg_names}")
        return SglFunction(self.func, self.num_api_spec_tokens, {**self.bind_arguments, **kwargs})

    def _bound(self, args, kwargs) -> inspect.BoundArguments:
        kwargs = {**self.bind_arguments, **kwargs}
        try:
            return self.signature.bind(None, *args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{self.__name__}: {e}") from None

    def _executor(self, backend, defaults, stream, use_thread) -> Executor:
        backend = backend or api.get_default_backend()
        if backend is None:
            raise ir.ProgramError(f"{self.__name__}: no backend; pass backend= or call set_default_backend()")
        return Executor(backend, defaults, backend.get_chat_template(), stream=stream,
                        spec_tokens=self.num_api_spec_tokens, use_thread=use_thread)

    # ------------------------------------------------------------------------------------ run
    def run(self, *args, stream: bool = False, backend=None, use_thread: bool = True, **kwargs) -> ProgramState:
        defaults = _defaults(kwargs, self.arg_names)
        bound = self._bound(args, kwargs)
        state = ProgramState(self._executor(backend, defaults, stream, use_thread))
        if stream:
            threading.Thread(target=self._body, args=(state, bound, False), daemon=True).start()
            return state
        self._body(state, bound, True)
        return state

    def _body(self, state: ProgramState, bound: inspect.BoundArguments, raise_errors: bool) -> None:
        try:
            self.func(state, *bound.args[1:], **bound.kwargs)
        except BaseException as e:  # noqa: BLE001
            state._ex.sync()
            if state._ex.error is None:
                state._ex.fail(e)
            if raise_errors:
                raise
        finally:
            state._ex.end()

    def __call__(self, *args, **kwargs) -> ProgramState:
        return self.run(*args, **kwargs)

    async def arun(self, *args, **kwargs) -> ProgramState:
        """`await fn.arun(...)`: run() off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, lambda: self.run(*args, **kwargs))

    # ------------------------------------------------------------------------------------ batch
    def run_batch(self, batch_kwargs, *, backend=None, num_threads="auto", progress_bar: bool = False,
                  **kwargs) -> list[ProgramState]:
        if not isinstance(batch_kwargs, (list, tuple)):
            raise TypeError(f"{self.__name__}.run_batch: expected a list of argument dicts")
        items = [kw if isinstance(kw, dict) else dict(zip(self.arg_names, kw)) for kw in batch_kwargs]
        if not items:
            return []
        defaults = _defaults(kwargs, self.arg_names)
        if kwargs:
            raise TypeError(f"{self.__name__}.run_batch: unknown keyword argument(s) {sorted(kwargs)}")
        bounds = [self._bound((), kw) for kw in items]  # every program's arguments checked first
        backend = backend or api.get_default_backend()
        if len(items) > 1:
            self._precache(backend, bounds)
        if num_threads == "auto":
            num_threads = max(96, (os.cpu_count() or 1) * 16)
        states = [ProgramState(self._executor(backend, defaults, False, True)) for _ in items]
        bar = _progress(len(items)) if progress_bar else None
        with concurrent.futures.ThreadPoolExecutor(max(1, min(int(num_threads), len(items)))) as pool:
            futs = [pool.submit(self._body, st, b, False) for st, b in zip(states, bounds)]
            for f in concurrent.futures.as_completed(futs):
                f.result()
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        return states

    async def arun_batch(self, batch_kwargs, **kwargs) -> list[ProgramState]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, lambda: self.run_batch(batch_kwargs, **kwargs))

    # ------------------------------------------------------------------------------------ trace
    def trace(self, *, backend=None, **kwargs) -> TracedProgram:
        """Run the body up to its first generation; arguments not given are placeholders (their text cuts
        the constant prefix). Program code before the first generation runs (keep it side-effect free)."""
        backend = backend or api.get_default_backend()
        template = backend.get_chat_template() if backend is not None else None
        from sgl_jax.program.chat_template import DEFAULT

        ex = Executor(_TraceBackend(template or DEFAULT), ir.SamplingDefaults(), template or DEFAULT,
                      use_thread=False)
        recorded: list = []
        submit = ex.submit
        ex.submit = lambda e: (recorded.extend(ir.flatten(e)), submit(e))  # type: ignore[method-assign]
        args = {n: f"{_PLACEHOLDER}{n}{_PLACEHOLDER}" for n in self.arg_names if n not in kwargs
                and n not in self.bind_arguments and self.signature.parameters[n].default is inspect._empty}
        try:
            self.func(ProgramState(ex), **{**self.bind_arguments, **args, **kwargs})
        except Exception:  # noqa: BLE001 -- the trace ends at the first generation or value read
            pass
        return TracedProgram(recorded, ex.text.split(_PLACEHOLDER, 1)[0])

    def cache(self, backend=None) -> str:
        """Prefill this program's constant prefix on the backend; returns the prefix."""
        backend = backend or api.get_default_backend()
        prefix = self.trace(backend=backend).prefix
        if prefix:
            backend.prefill(Prompt(prefix))
        return prefix

    def _precache(self, backend, bounds) -> None:
        prefixes = [self.trace(backend=backend, **{k: v for k, v in b.arguments.items() if k != "s"}).prefix
                    for b in bounds]
        common = os.path.commonprefix(prefixes)
        if len(common) >= 16:
            backend.prefill(Prompt(common))


def _progress(total: int):
    try:
        import tqdm

        return tqdm.tqdm(total=total)
    except ImportError:
        return None
