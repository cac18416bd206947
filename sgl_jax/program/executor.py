"""The interpreter: one `Executor` per program state runs that state's expressions, in order, on its own thread.

A program's Python body runs in the caller's thread and only *submits* expressions (`s += gen(...)`); each
state's executor runs them on a worker thread. That is what makes `fork` parallel: `forks += gen(...)` submits
to every branch at once, the branches' calls reach the backend together, and the engine batches them.
Reading a variable (`s["x"]`) waits for the expression that sets it.

What an executor keeps, per state:
 1. the text so far, and -- with a backend that tracks them -- the exact token ids of the part already sent
    or generated (`fixed_ids` for `text[:fixed_chars]`), so every call sends the ids the engine computed
    before and hits the radix cache in full;
 2. chat messages and the current role (roles become the backend's chat-template markup);
 3. variables, their meta_info, and an event per pending variable;
 4. spans (what was constant, role markup, or generated) for rendering, and stream notifications;
 5. API speculation: the text a speculative call produced beyond what the program has consumed.

A backend error fails the state, not the process: `error()` returns it, later expressions are skipped, and
reading a variable that was never set raises `ProgramError` naming it. Host code: no jax import.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

from sgl_jax.program import ir
from sgl_jax.program.backends.base import Backend, Completion, Prompt
from sgl_jax.program.chat_template import ChatTemplate
from sgl_jax.program.speculative import SpecMixin


class Executor(SpecMixin):
    def __init__(self, backend: Backend, defaults: ir.SamplingDefaults, template: ChatTemplate, *,
                 stream: bool = False, spec_tokens: int | None = None, use_thread: bool = True):
        self.backend, self.defaults, self.template = backend, defaults, template
        self.stream, self.spec_tokens, self.use_thread = stream, spec_tokens, use_thread
        self.text = ""
        self.fixed_ids: list[int] | None = [] if backend.tracks_ids else None
        self.fixed_chars = 0
        self.messages: list[dict] = []
        self.cur_role: str | None = None
        self.role_begin = 0
        self.variables: dict[str, Any] = {}
        self.meta: dict[str, Any] = {}
        self.events: dict[str, threading.Event] = {}
        self.spans: list[tuple[int, int, str, str | None]] = []  # (start, end, kind, name)
        self.error: BaseException | None = None
        self.fork_start = 0
        self.on_first_call = None  # a fork's prefix hold: released once this branch has sent its first call
        self.gather = None  # that hold, sent with the first call so the fork's branches start together
        self.cleanups: list = []  # run when this state ends: its forks' branches end, their holds are released
        self.changed = threading.Condition()
        self.version = 0
        self.streaming: set[str] = set()
        self.finished = False
        self.speculated = ""
        self.spec_calls: list = []
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._pending = 0
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None

    # ------------------------------------------------------------------------------ submission
    def submit(self, expr: ir.Expr) -> None:
        for e in ir.flatten(expr):
            name = getattr(e, "name", None)
            if isinstance(e, (ir.Gen, ir.Select, ir.VarScopeBegin)) and name is not None:
                self.events[name] = threading.Event()
            if not self.use_thread:
                self._run_one(e)
                continue
            with self._lock:
                self._pending += 1
                self._idle.clear()
                if self._worker is None:
                    self._worker = threading.Thread(target=self._work, daemon=True, name="sgl-program")
                    self._worker.start()
            self._queue.put(e)

    def _work(self) -> None:
        while True:
            e = self._queue.get()
            if e is None:
                return
            try:
                self._run_one(e)
            finally:
                with self._lock:
                    self._pending -= 1
                    if self._pending == 0:
                        self._idle.set()

    def _run_one(self, e: ir.Expr) -> None:
        if self.error is not None:
            # skipped: its variable will never be set, so wake its readers (they raise, naming the failure);
            # `fail` only sets the events that existed when the failure happened
            ev = self.events.get(getattr(e, "name", None))
            if ev is not None:
                ev.set()
            return
        try:
            self._execute(e)
        except BaseException as err:  # noqa: BLE001 -- recorded on the state, re-raised to readers
            self.fail(err)

    def fail(self, err: BaseException) -> None:
        self.error = err
        for ev in self.events.values():
            ev.set()
        self._release_hold()
        self.notify()

    def sync(self) -> None:
        self._idle.wait()

    def end(self) -> None:
        """No more expressions: stop the worker once the queue drains, release any prefix hold."""
        if self.finished:
            return
        if self._worker is not None:
            self._queue.put(None)
        self.sync()
        self._release_hold()
        self.finished = True
        cleanups, self.cleanups = self.cleanups, []
        for fn in cleanups:
            fn()
        self.notify()

    def notify(self) -> None:
        with self.changed:
            self.version += 1
            self.changed.notify_all()

    # ------------------------------------------------------------------------------ reading
    def get_var(self, name: str):
        ev = self.events.get(name)
        if ev is not None:
            ev.wait()
        elif name not in self.variables:
            self.sync()
        if name not in self.variables:
            if self.error is not None:
                raise ir.ProgramError(f"variable {name!r} was not set: the program failed: {self.error}") \
                    from self.error
            raise KeyError(f"the program has no variable {name!r}; it has {sorted(self.variables)}")
        return self.variables[name]

    def prompt(self) -> Prompt:
        return Prompt(self.text, list(self.fixed_ids) if self.fixed_ids is not None else None, self.fixed_chars,
                      list(self.messages), self.cur_role, self.gather if self.on_first_call is not None else None)

    # ------------------------------------------------------------------------------ execution
    def _execute(self, e: ir.Expr) -> None:
        if isinstance(e, ir.Constant):
            self.fill(e.text)
        elif isinstance(e, ir.Gen):
            self._gen(e)
        elif isinstance(e, ir.Select):
            self._select(e)
        elif isinstance(e, ir.RoleBegin):
            self._role_begin(e.role)
        elif isinstance(e, ir.RoleEnd):
            self._role_end(e.role)
        elif isinstance(e, ir.VarScopeBegin):
            self.variables[e.name] = len(self.text)
        elif isinstance(e, ir.VarScopeEnd):
            start = self.variables[e.name]
            self.variables[e.name] = self.text[start:]
            self.events.setdefault(e.name, threading.Event()).set()
        elif isinstance(e, ir.JoinText):
            for st in e.states:
                ex = st._ex
                ex.sync()
                self.fill(ex.text[ex.fork_start:])
        elif isinstance(e, ir.Image):
            raise ir.ProgramError("image: this backend serves a text-only model")
        else:
            raise ir.ProgramError(f"unknown expression {e!r}")

    def fill(self, text: str, kind: str = "text", prefix: bool = False) -> None:
        if not text:
            return
        if self.spec_fill(text, prefix):
            return
        start = len(self.text)
        self.text += text
        self.spans.append((start, len(self.text), kind, None))
        self.notify()

    def _params(self, e: ir.Gen) -> ir.SamplingDefaults:
        return self.defaults.merge(e.params).with_stop(self.template.stop_str)

    def _after_call(self) -> None:
        self._release_hold()

    def _release_hold(self) -> None:
        cb, self.on_first_call = self.on_first_call, None
        if cb is not None:
            cb()

    def _append_generated(self, name: str | None, text: str, c: Completion | None) -> None:
        start = len(self.text)
        self.text += text
        if c is not None and c.ids is not None and self.fixed_ids is not None:
            self.fixed_ids = list(c.ids)
            self.fixed_chars = start + c.ids_chars
        self.spans.append((start, len(self.text), "gen", name))

    def _gen(self, e: ir.Gen) -> None:
        params = self._params(e)
        if self.spec_tokens is not None:
            if self.spec_gen(e, params):
                return
        if self.stream:
            self._gen_stream(e, params)
            return
        c = self.backend.generate(self.prompt(), params)
        self._after_call()
        first = c.text[0] if isinstance(c.text, list) else c.text
        self._append_generated(e.name, first, c)
        self._set(e.name, c.text, c.meta_info)

    def _gen_stream(self, e: ir.Gen, params) -> None:
        name = e.name
        start = len(self.text)
        if name is not None:
            self.variables[name] = ""
            self.streaming.add(name)
        meta, final = None, None
        it = self.backend.generate_stream(self.prompt(), params)
        while True:
            try:
                delta, meta = next(it)
            except StopIteration as stop:  # the generator returns a Completion with the exact ids, if known
                final = stop.value
                break
            self._after_call()
            self.text += delta
            if name is not None:
                self.variables[name] += delta
                self.meta[name] = meta
            self.notify()
        if final is not None and final.ids is not None and self.fixed_ids is not None:
            self.fixed_ids, self.fixed_chars = list(final.ids), start + final.ids_chars
        self.spans.append((start, len(self.text), "gen", name))
        self.streaming.discard(name)
        self._set(name, self.variables.get(name, self.text[start:]), meta)

    def _set(self, name: str | None, value, meta) -> None:
        if name is not None:
            self.variables[name] = value
            self.meta[name] = meta
            self.events.setdefault(name, threading.Event()).set()
        self.notify()

    def _select(self, e: ir.Select) -> None:
        if e.temperature > 1e-5:
            raise ir.ProgramError(f"select {e.name!r}: only temperature 0 is supported, got {e.temperature}")
        decision, c = self.backend.select(self.prompt(), e.choices, e.temperature, e.method)
        self._after_call()
        self._append_generated(e.name, decision.decision, c)
        self._set(e.name, decision.decision, decision.meta_info)

    def _role_begin(self, role: str) -> None:
        if self.cur_role is not None:
            raise ir.ProgramError(f"role {role!r} begun inside role {self.cur_role!r}: roles do not nest")
        t = self.template
        if not self.messages and role != "system":
            if t.default_system_prompt:
                self._role_begin("system")
                self.fill(t.default_system_prompt)
                self._role_end("system")
            elif t.preamble and not self.text.startswith(t.preamble):
                self.fill(t.preamble, "role", prefix=True)
        self.cur_role = role
        self.fill(t.prefix_suffix(role)[0], "role", prefix=True)
        self.role_begin = len(self.text)

    def _role_end(self, role: str) -> None:
        if self.cur_role != role:
            raise ir.ProgramError(f"role {role!r} ended while in role {self.cur_role!r}")
        self.spec_role_end()
        content = self.text[self.role_begin:].lstrip()
        self.cur_role = None
        self.fill(self.template.prefix_suffix(role)[1], "role")
        self.messages.append({"role": role, "content": content})
