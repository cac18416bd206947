"""The engine thread: inbox -> schedule -> run -> postprocess, and what happens when something fails.

`EngineLoop` is the only owner of the scheduler, the radix cache, the constraint table and the device
state once started; other threads talk to it through `submit`, `abort` and `call` (run between steps), and
`call_now` (short cache operations, under the state lock the engine thread holds in its host phases).

A request's life in the loop:
 1. `submit(req)` (any thread) registers the rid as live and queues it; a shut-down or dead engine
    refuses at once (RuntimeError / EngineDeadError), a live duplicate rid is an InvalidRequestError.
 2. The thread drains the inbox: constrained requests wait in the constraint manager until their FSM
    is compiled and placed; the rest go to the scheduler.
 3. Each step: `plan = scheduler.schedule()` -> `runner.run(plan)` -> `scheduler.on_step_done(plan)`
    -> `_postprocess`: every sampled token goes through `OutputProcessor.append` (finish checks),
    then the constraint's forced continuation (jump-forward) goes through the same path and into
    the penalty history.
 4. A finished request commits its prefix to the cache, releases its constraint, and its final
    event goes to its sink; a live rid is retired exactly once (`_retire`).

Faults: every phase is guarded. An exception while handling one request (admission, constraint
compile or upload, postprocess, jump-forward) fails that request with an abort event naming the
phase; a failed step fails the requests in its plan. The loop then goes on, unless the cache's
invariants no longer hold or steps keep failing (`max_step_failures` in a row): then the engine is
dead -- every live request gets a final abort event, new ones are refused with EngineDeadError, and
`health()` reports it (the server answers 503).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from typing import Callable

from sgl_jax.engine.postprocess import Postprocessor
from sgl_jax.errors import EngineDeadError, InvalidRequestError
from sgl_jax.metrics import cache_tiers
from sgl_jax.scheduler import OutOfPagesError, ReqState, StepPlan

log = logging.getLogger("sgl_jax.engine")


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What one step did, for step listeners (benchmarks, tracing)."""

    plan: StepPlan
    step_seconds: float  # runner.run: packing, the compiled step, device_get
    host_seconds: float  # schedule + postprocess
    schedule_seconds: float = 0.0  # scheduler.schedule() alone (part of host_seconds)
    device_seconds: float = 0.0  # the compiled step + device_get (part of step_seconds; the rest is packing)
    inputs: object = None  # the step's StepInputs (for replaying it in benchmarks)


class EngineLoop:
    """The engine thread (see the module docstring). One class of ~360 lines: the inbox, the step, retiring
    requests, and the failure paths (a failed step, a dead loop, integrity checks) all run under the one state
    lock that `call_now` shares with other threads, and splitting them would spread that lock's protocol over
    several objects."""

    max_step_failures = 3

    def __init__(self, *, scheduler, runner, constraints, output, row_params: Callable, metrics=None,
                 check_integrity_when_idle: bool = False):
        self.scheduler = scheduler
        self.runner = runner
        self.constraints = constraints
        self.output = output
        self.row_params = row_params
        self.check_integrity_when_idle = check_integrity_when_idle
        self.stats = StepStats(metrics)
        self.dead_reason: str | None = None
        self._live: dict[str, object] = {}  # rid -> request, from submit until its final event
        self._lock = threading.Lock()
        # held by the engine thread in its host phases (inbox, schedule, postprocess), not while a step computes
        # or while it waits for work: `call_now` runs short cache operations from other threads under it
        self._state = threading.RLock()
        self._closed = False
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        if getattr(scheduler, "disk", None) is not None:  # a finished disk read wakes the loop to admit its request
            scheduler.disk.notify = self._wakeup.set
        self._step_failures = 0
        self._thread = threading.Thread(target=self._run, name="sgl_jax-engine", daemon=True)
        self.post = Postprocessor(output, constraints, scheduler, lambda req: self._retire(req, finished=True))

    def start(self) -> None:
        self._thread.start()

    # ------------------------------------------------------------------- other threads
    def _check_open(self) -> None:
        if self.dead_reason is not None:
            raise EngineDeadError(f"the engine is dead: {self.dead_reason}")
        if self._closed:
            raise RuntimeError("the engine is shut down")

    def submit(self, reqs: list) -> None:
        """Queue requests (all or none): refused if the engine is closed or dead, or a rid is live."""
        with self._lock:
            self._check_open()
            rids = [r.rid for r in reqs]
            dup = [r for r in rids if r in self._live] or [r for i, r in enumerate(rids) if r in rids[:i]]
            if dup:
                raise InvalidRequestError(f"rid {dup[0]!r} is already in use by a running request", field="rid")
            for r in reqs:
                self._live[r.rid] = r
                self._inbox.put(("add", r))
        self._wakeup.set()

    def abort(self, rid: str) -> bool:
        """Abort a live request (its final event says so); False if no live request has this rid."""
        with self._lock:
            if rid not in self._live or self._closed or self.dead_reason is not None:
                return False
            self._inbox.put(("abort", rid))
        self._wakeup.set()
        return True

    def call(self, fn, timeout: float = 600.0):
        """Run fn() on the engine thread between steps and return its result (or raise its error)."""
        box: queue.SimpleQueue = queue.SimpleQueue()
        with self._lock:
            self._check_open()
            self._inbox.put(("call", fn, box))
        self._wakeup.set()
        deadline = time.monotonic() + timeout
        while True:
            try:
                ok, val = box.get(timeout=0.1)
                break
            except queue.Empty:
                if not self._thread.is_alive() and box.empty():
                    self._check_open()
                    raise RuntimeError("the engine thread has stopped")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the engine thread did not answer within {timeout} s")
        if not ok:
            raise val
        return val

    def call_now(self, fn):
        """Run fn() on the calling thread under the loop's state lock and return its result: at once when the engine
        thread is computing a step or idle, else as soon as its host phase ends -- not at the next step boundary, as
        `call` does (a fork's prefix hold would otherwise wait up to a whole step, and a program forking several
        states in turn would add its branches a step apart). Only for short operations on the cache that the
        step in flight does not depend on (its inputs are already packed): prefix holds, their sibling counts, their
        release."""
        with self._lock:
            self._check_open()
        with self._state:
            return fn()

    def health(self) -> tuple[bool, str]:
        if self.dead_reason is not None:
            return False, f"the engine is dead: {self.dead_reason}"
        if self._closed:
            return False, "the engine is shut down"
        if not self._thread.is_alive():
            return False, "the engine thread is not running"
        return True, "ok"

    @property
    def stopped(self) -> bool:
        """The engine thread is not running (never started, shut down, or dead): no step can run."""
        return not self._thread.is_alive()

    def shutdown(self, timeout: float = 60.0) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._wakeup.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)

    # ------------------------------------------------------------------- the thread
    def _run(self) -> None:
        try:
            while not self._closed:
                self._tick()
        except _Dead:
            return
        except BaseException as e:  # noqa: BLE001 - a fault the per-phase guards could not contain
            log.exception("engine loop failed")
            self._die(f"{type(e).__name__}: {e}")
            return
        self._close_out("the engine is shutting down")

    def _tick(self) -> None:
        if self.dead_reason is not None:  # declared dead from outside (`die`)
            raise _Dead()
        with self._state:
            self._drain_inbox()
            if self.constraints.pending:
                self._admit_constrained()
            idle = not self.scheduler.has_work
            if idle and self.check_integrity_when_idle:
                self._check_integrity()
        if idle:
            self._wakeup.wait(0.05)
            self._wakeup.clear()
            return
        self._step()

    def _check_integrity(self) -> None:
        try:
            self.scheduler.check_integrity()
        except Exception as e:  # noqa: BLE001 - broken invariants: nothing can be trusted any more
            log.exception("cache integrity check failed")
            self._die(f"cache invariants broken: {e}")
            raise _Dead() from e

    def die(self, reason: str) -> None:
        """Declare the engine dead from another thread (a multi-host rank lost while this thread may be blocked in a
        step's collective): every live request fails with `reason`, new ones are refused, health() reports it."""
        log.error("engine declared dead: %s", reason)
        self._die(reason)

    def _die(self, reason: str) -> None:
        with self._lock:
            if self.dead_reason is None:
                self.dead_reason = reason
        self._fail_all(f"the engine is dead: {reason}")

    def _close_out(self, message: str) -> None:
        with self._state:
            self._drain_inbox()
            self._fail_all(message)

    def _fail_all(self, message: str) -> None:
        with self._lock:
            live = list(self._live.values())
        # `die` may come from another thread while the engine thread is blocked in a step's collective, possibly
        # inside a call holding the state lock: wait for it briefly, then fail the requests without it
        held = self._state.acquire(timeout=1.0)
        try:
            for req in live:
                self._fail(req, message, quiet=True)
        finally:
            if held:
                self._state.release()
        while True:  # calls still queued get an answer too
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                break
            if msg[0] == "call":
                msg[2].put((False, RuntimeError(message)))

    # ------------------------------------------------------------------- requests
    def _retire(self, req, *, finished: bool) -> None:
        """The one exit of a live request: free what it holds and send its final event."""
        with self._lock:
            if self._live.pop(req.rid, None) is not req:
                return  # already retired
        try:
            if finished and req.state is ReqState.RUNNING:
                self.scheduler.finish(req)
            elif req.state is not ReqState.FINISHED:
                self.scheduler.abort(req.rid)
            self.constraints.drop_pending(req.rid)
            self.constraints.release(req)
        finally:
            self.output.emit(req, final=True)

    def _fail(self, req, message: str, quiet: bool = False) -> None:
        if not quiet:
            log.warning("request %s failed: %s", req.rid, message)
        if req.data.finish_reason is None or req.data.finish_reason.get("type") != "abort":
            req.data.finish_reason = {"type": "abort", "message": message}
        try:
            self._retire(req, finished=False)
        except Exception:  # noqa: BLE001 - the request is failed either way
            log.exception("while failing request %s", req.rid)

    def _guard(self, req, phase: str, fn, *args) -> bool:
        """Run fn(*args) for one request; on an exception fail that request. True if it ran cleanly."""
        try:
            fn(*args)
            return True
        except _Dead:
            raise
        except Exception as e:  # noqa: BLE001 - the request fails, the engine goes on
            log.exception("engine error in %s of %s", phase, req.rid)
            self._fail(req, f"engine error in {phase}: {type(e).__name__}: {e}")
            return False

    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            kind = msg[0]
            if kind == "add":
                req = msg[1]
                if self._closed:
                    continue  # _close_out fails it
                if req.data.prep.constraint is not None:
                    self._guard(req, "constraint compile", self._submit_constraint, req)
                else:
                    self._guard(req, "admission", self._add, req)
            elif kind == "abort":
                with self._lock:
                    req = self._live.get(msg[1])
                if req is not None:
                    req.data.finish_reason = {"type": "abort", "message": "aborted by the client"}
                    self._retire(req, finished=False)
            elif kind == "call":
                _, fn, box = msg
                try:
                    box.put((True, fn()))
                except BaseException as e:  # noqa: BLE001 - handed back to the caller
                    box.put((False, e))

    def _add(self, req) -> None:
        try:
            self.scheduler.add(req)
        except ValueError as e:
            self._fail(req, str(e), quiet=True)

    def _submit_constraint(self, req) -> None:
        if self.constraints.submit(req):
            self._add(req)

    def _admit_constrained(self) -> None:
        try:
            ready = self.constraints.poll()
        except Exception as e:  # noqa: BLE001 - the pending requests cannot be trusted to progress
            log.exception("constraint poll failed")
            for req in list(self.constraints.pending):
                self._fail(req, f"engine error in constraint placement: {type(e).__name__}: {e}")
            return
        for req, err in ready:
            if err is not None:
                self._fail(req, f"constraint rejected: {err}", quiet=True)
                continue
            self._guard(req, "admission", self._admit_placed, req)

    def _admit_placed(self, req) -> None:
        jump = self.constraints.plan_jump(req)  # a forced start ('{"name":"') joins the prompt's prefill
        if jump is not None:
            self.post.apply_jump(req, jump)
            if req.data.finish_reason is not None:
                self._retire(req, finished=True)
                return
        self._add(req)

    # ------------------------------------------------------------------- the step
    def _step(self) -> None:
        t0 = time.perf_counter()
        with self._state:
            plan, nothing = self._schedule()
        if plan is None:
            if nothing:  # work is waiting on something (pages, a load): nap unless woken
                self._wakeup.wait(0.01)
                self._wakeup.clear()
            return
        t1 = time.perf_counter()
        try:
            batch, out = self.runner.run(plan, self.row_params)  # outside the state lock: see call_now
        except Exception as e:  # noqa: BLE001 - fail this step's requests; keep serving the others
            log.exception("engine step failed")
            with self._state:
                self._step_failures += 1
                # its requests, and those on a prefix it was to compute
                for req in dict.fromkeys([c.req for c in plan.chunks] + self.scheduler.early_users()):
                    if req.data.finish_reason is None:
                        self._fail(req, f"engine error in step: {type(e).__name__}: {e}", quiet=True)
                if not self.scheduler.discard_early(plan):
                    self._die("a failed step left pages it was to compute in the cache, and they are still held")
                    raise _Dead() from e
                self._check_integrity()
                if self._step_failures >= self.max_step_failures:
                    self._die(f"{self._step_failures} steps failed in a row; last: {type(e).__name__}: {e}")
                    raise _Dead() from e
            return
        self._step_failures = 0
        t2 = time.perf_counter()
        with self._state:
            self._after_step(plan, batch, out, t0, t1, t2)

    def _after_step(self, plan, batch, out, t0: float, t1: float, t2: float) -> None:
        try:
            self.scheduler.on_step_done(plan)
        except Exception as e:  # noqa: BLE001 - the cache may be inconsistent: check before going on
            log.exception("on_step_done failed")
            for c in plan.chunks:
                self._fail(c.req, f"engine error after the step: {type(e).__name__}: {e}", quiet=True)
            self._check_integrity()
            return
        self._postprocess(plan, batch, out)
        t3 = time.perf_counter()
        run = getattr(self.runner, "last_run", None)
        self.stats.record(StepInfo(plan, t2 - t1, (t1 - t0) + (t3 - t2), t1 - t0,
                                   run.device_seconds if run is not None else float("nan"),
                                   run.inputs if run is not None else None), self.scheduler)

    def _schedule(self) -> tuple[StepPlan | None, bool]:
        """(the step's plan or None, whether None means the scheduler had nothing it could run now)."""
        try:
            plan = self.scheduler.schedule()
        except OutOfPagesError as e:
            victim = max(self.scheduler.running, key=lambda r: r.num_tokens)
            self._fail(victim, str(e), quiet=True)
            return None, False
        except Exception as e:  # noqa: BLE001 - fail what the scheduler holds, then check its invariants
            log.exception("schedule failed")
            for req in list(self.scheduler.running) + list(self.scheduler.waiting):
                self._fail(req, f"engine error in schedule: {type(e).__name__}: {e}", quiet=True)
            self._check_integrity()
            return None, False
        return plan, plan is None

    # ------------------------------------------------------------------- postprocess
    def _postprocess(self, plan: StepPlan, batch, out) -> None:
        for c, rows in zip(plan.chunks, batch.logits_rows):
            req = c.req
            if req.state is not ReqState.RUNNING or req.data.finish_reason is not None:
                continue
            self._guard(req, "postprocess", self.post.one, c, rows, out)


class StepStats:
    """Per-step timings (bounded lists), the metrics object and the step listeners."""

    def __init__(self, metrics=None):
        self.metrics = metrics
        self.step_times: list[float] = []
        self.host_times: list[float] = []
        self.num_steps = 0
        self.num_decode_steps = 0  # steps with decode rows or run blocks
        self.num_decode_rows = 0  # tokens computed as decode rows or run blocks, over all steps
        self.busy_seconds = 0.0  # step + host seconds over all steps: the wall time the loop spent in steps
        self.listeners: list[Callable[[StepInfo], None]] = []

    def record(self, info: StepInfo, scheduler) -> None:
        plan, step_s, host_s = info.plan, info.step_seconds, info.host_seconds
        self.num_steps += 1
        self.num_decode_steps += bool(plan.decodes)
        self.num_decode_rows += sum(len(c.token_ids) for c in plan.decodes)
        self.busy_seconds += step_s + host_s
        self.step_times.append(step_s)
        self.host_times.append(host_s)
        if len(self.step_times) > 4096:
            del self.step_times[:2048], self.host_times[:2048]
        if self.metrics is not None:
            alloc = scheduler.alloc
            self.metrics.observe_step(step_s, len(plan.chunks))
            self.metrics.set_queue(len(scheduler.waiting), len(scheduler.running),
                                   1 - alloc.num_free / alloc.num_total)
            self.metrics.set_cache(cache_tiers(scheduler))
        for fn in list(self.listeners):
            try:
                fn(info)
            except Exception:  # noqa: BLE001 - a listener's bug must not stop serving
                log.exception("step listener failed")


class _Dead(Exception):
    """Raised inside the loop once the engine has died, to leave `_run`."""
