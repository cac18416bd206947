"""`ProgramState` (the `s` a program receives) and `StateGroup` (what `s.fork(n)` returns).

The state is a thin handle over its `Executor` (executor.py): appending submits, reading waits. Role
structure is checked here, in the caller's thread, as expressions are appended, so a nested role raises at
the line that nests it, before any request is sent.

`fork(n)`: the parent's pending expressions finish, its prompt is prefilled once on the backend and held in
the cache (the in-process engine locks it in the radix tree) until every branch has sent its first call; the
branches start from the parent's text, ids, messages and variables and run on their own threads, so their
calls reach the engine together. `join()` gathers the branches' new variables into lists on the parent
(default), or appends their text (`"concate_and_append"`). Host code: no jax import.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import threading

from sgl_jax.program import ir
from sgl_jax.program.executor import Executor


class _Countdown:
    """Calls `fn` once: after `done()` has been called `n` times, or at `fire()` (the parent program ended
    while a branch had not called yet -- a fork that is never joined must not keep its prefix held)."""

    def __init__(self, n: int, fn):
        self.n, self.fn, self.lock = n, fn, threading.Lock()

    def done(self) -> None:
        with self.lock:
            self.n -= 1
            fn = self.fn if self.n == 0 else None
            if fn is not None:
                self.fn = None
        if fn is not None:
            fn()

    def fire(self) -> None:
        with self.lock:
            fn, self.fn = self.fn, None
        if fn is not None:
            fn()


class ProgramState:
    def __init__(self, executor: Executor):
        self._ex = executor
        self._role: str | None = None  # the role open at submission time (checked in the caller's thread)

    # ---------------------------------------------------------------------------- building
    def __iadd__(self, other):
        expr = ir.as_expr(other)
        for e in ir.flatten(expr):
            if isinstance(e, ir.RoleBegin):
                if self._role is not None:
                    raise ir.ProgramError(f"{e.role}: role begun inside role {self._role!r}; roles do not nest "
                                          f"(end the {self._role} turn first)")
                self._role = e.role
            elif isinstance(e, ir.RoleEnd):
                if self._role != e.role:
                    raise ir.ProgramError(f"{e.role}_end: no {e.role!r} turn is open (open: {self._role!r})")
                self._role = None
        self._ex.submit(expr)
        return self

    def _role_scope(self, role: str, expr=None):
        if expr is not None:
            self.__iadd__(ir.RoleBegin(role) + expr + ir.RoleEnd(role))
            return None

        @contextlib.contextmanager
        def scope():
            self.__iadd__(ir.RoleBegin(role))
            yield
            self.__iadd__(ir.RoleEnd(role))

        return scope()

    def system(self, expr=None):
        return self._role_scope("system", expr)

    def user(self, expr=None):
        return self._role_scope("user", expr)

    def assistant(self, expr=None):
        return self._role_scope("assistant", expr)

    @contextlib.contextmanager
    def var_scope(self, name: str):
        self.__iadd__(ir.VarScopeBegin(name))
        yield
        self.__iadd__(ir.VarScopeEnd(name))

    # ---------------------------------------------------------------------------- fork / copy
    def fork(self, size: int = 1, position_ids_offset=None) -> "StateGroup":
        if not isinstance(size, int) or size < 1:
            raise ir.ProgramError(f"fork: 'size' must be an int >= 1, got {size!r}")
        ex = self._ex
        ex.sync()
        hold = None
        if size > 1 and ex.text and ex.error is None:
            try:
                hold, ids = ex.backend.prefill(ex.prompt(), hold=True)
                if hold is not None:
                    ex.backend.gather(hold, size)
                if ids is not None and ex.fixed_ids is not None:
                    ex.fixed_ids, ex.fixed_chars = list(ids), len(ex.text)
            except Exception as err:  # noqa: BLE001 -- the parent records it; branches inherit the failure
                ex.fail(err)
        countdown = _Countdown(size, lambda: ex.backend.release(hold)) if hold is not None else None
        if countdown is not None:
            ex.cleanups.append(countdown.fire)
        states = []
        for _ in range(size):
            c = Executor(ex.backend, ex.defaults, ex.template, stream=ex.stream, spec_tokens=ex.spec_tokens,
                         use_thread=ex.use_thread)
            c.text, c.fixed_chars, c.messages = ex.text, ex.fixed_chars, list(ex.messages)
            c.fixed_ids = list(ex.fixed_ids) if ex.fixed_ids is not None else None
            c.cur_role, c.role_begin, c.fork_start = ex.cur_role, ex.role_begin, len(ex.text)
            c.variables, c.meta, c.spans = dict(ex.variables), dict(ex.meta), list(ex.spans)
            c.error = ex.error
            c.on_first_call = countdown.done if countdown is not None else None
            c.gather = hold  # its first call is one of `size` siblings (in-process: they start in one step)
            st = ProgramState(c)
            st._role = self._role
            states.append(st)
            ex.cleanups.append(c.end)  # a branch never joined ends with its parent (its worker thread exits)
        return StateGroup(states, self)

    def copy(self) -> "ProgramState":
        return self.fork(1)[0]

    # ---------------------------------------------------------------------------- reading
    def text(self) -> str:
        self._ex.sync()
        return self._ex.text

    def messages(self) -> list[dict]:
        self._ex.sync()
        return list(self._ex.messages)

    def sync(self) -> None:
        self._ex.sync()

    def error(self):
        self._ex.sync()
        return self._ex.error

    def get_var(self, name: str):
        return self._ex.get_var(name)

    def set_var(self, name: str, value) -> None:
        self._ex.sync()
        self._ex.variables[name] = value

    def get_meta_info(self, name: str):
        self._ex.get_var(name)
        return self._ex.meta.get(name)

    def __getitem__(self, name: str):
        return self.get_var(name)

    def __setitem__(self, name: str, value) -> None:
        self.set_var(name, value)

    def __contains__(self, name: str) -> bool:
        self._ex.sync()
        return name in self._ex.variables

    @property
    def num_api_calls(self) -> int:
        """Calls made by API speculation (completion or chat turn); see speculative.py."""
        return self._ex.num_spec_calls

    # ---------------------------------------------------------------------------- streaming
    def text_iter(self, var_name: str | None = None):
        """Yield new text as it is generated: the whole state's text (var_name None) or one variable's."""
        ex = self._ex
        if not ex.stream:
            yield self.text() if var_name is None else self.get_var(var_name)
            return
        pos, seen = 0, -1
        while True:
            with ex.changed:
                while ex.version == seen:
                    ex.changed.wait()
                seen = ex.version
            if var_name is None:
                cur, done = ex.text, ex.finished or ex.error is not None
            else:
                ev = ex.events.get(var_name)
                cur = ex.variables.get(var_name, "")
                cur = cur if isinstance(cur, str) else ""
                done = (ev is not None and ev.is_set()) or ex.error is not None or (ex.finished and ev is None)
            if len(cur) > pos:
                yield cur[pos:]
                pos = len(cur)
            if done:
                return

    async def text_async_iter(self, var_name: str | None = None, return_meta_data: bool = False):
        """Asyncio twin of text_iter; with return_meta_data, yields (text, meta_info) pairs."""
        loop = asyncio.get_running_loop()
        it = self.text_iter(var_name)
        end = object()
        while True:
            chunk = await loop.run_in_executor(None, next, it, end)
            if chunk is end:
                return
            yield (chunk, self._ex.meta.get(var_name)) if return_meta_data else chunk

    # ---------------------------------------------------------------------------- display
    def __repr__(self) -> str:
        return f"ProgramState({self.text()!r})"

    def _repr_html_(self) -> str:
        """Jupyter: role markup dimmed, generated spans highlighted with their variable names."""
        ex = self._ex
        ex.sync()
        out, pos = [], 0
        for start, end, kind, name in sorted(ex.spans):
            if start < pos:
                continue
            piece = html.escape(ex.text[start:end]).replace("\n", "<br>")
            if kind == "role":
                out.append(f'<span style="color:#888;font-size:85%">{piece}</span>')
            elif kind == "gen":
                title = html.escape(name or "")
                out.append(f'<span style="background:#e6f3ff;border-bottom:2px solid #3b82f6" '
                           f'title="{title}">{piece}</span>')
            else:
                out.append(piece)
            pos = end
        if pos < len(ex.text):
            out.append(html.escape(ex.text[pos:]).replace("\n", "<br>"))
        err = f'<div style="color:#b91c1c">error: {html.escape(str(ex.error))}</div>' if ex.error else ""
        return f'<div style="font-family:monospace;white-space:pre-wrap">{"".join(out)}</div>{err}'


class StateGroup:
    """The branches of `s.fork(n)`: `forks += x` appends to each (a value, a list, or `lambda i: ...`)."""

    def __init__(self, states: list[ProgramState], parent: ProgramState):
        self.states, self.parent = states, parent
        self._vars_at_fork = set(parent._ex.variables)

    def __len__(self) -> int:
        return len(self.states)

    def __iter__(self):
        return iter(self.states)

    def __getitem__(self, i: int) -> ProgramState:
        return self.states[i]

    def __setitem__(self, i: int, value) -> None:
        """`forks[i] += ...` appends in place and assigns the same state back; anything else is a mistake."""
        if value is not self.states[i]:
            raise ir.ProgramError(f"fork: branch {i} cannot be replaced (append to it with forks[{i}] += ...)")

    def __iadd__(self, other):
        if callable(other) and not isinstance(other, ir.Expr):
            for i, s in enumerate(self.states):
                s += other(i)
        elif isinstance(other, (list, tuple)):
            if len(other) != len(self.states):
                raise ir.ProgramError(f"fork: {len(other)} values appended to {len(self.states)} branches")
            for s, x in zip(self.states, other):
                s += x
        else:
            for s in self.states:
                s += other
        return self

    def join(self, mode: str = "gather_variable") -> None:
        if mode not in ("gather_variable", "concate_and_append"):
            raise ir.ProgramError(f"join: mode must be 'gather_variable' or 'concate_and_append', got {mode!r}")
        if mode == "gather_variable":
            pex = self.parent._ex
            pex.sync()
            for s in self.states:
                s._ex.sync()
                for k, v in s._ex.variables.items():
                    if k not in self._vars_at_fork:
                        pex.variables.setdefault(k, []).append(v)
        else:
            self.parent += ir.JoinText(tuple(self.states))
            self.parent.sync()
        for s in self.states:
            s._ex.end()
