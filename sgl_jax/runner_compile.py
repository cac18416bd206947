"""The step's shapes and their executables: `StepCompiler`, the part of `ModelRunner` (sgl_jax/runner.py) that
compiles the jitted step for each `StepShape` once (from the executable store when it holds it), warms it, compiles
the rest in the background while the engine serves (a missing shape runs on a larger compiled stand-in), and
measures the decode steps' costs for the scheduler. Device code; the runner provides the state it reads
(`_step`, `_state_avals`, `store`, `grid`, `_lock`, `_compiled`, `_compiling`, `execute`, `_dummy_inputs`)."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from sgl_jax.executables import compile_fresh, step_compile_options
from sgl_jax.parallel.multihost import mirrored
from sgl_jax.shapes import ShapeGrid, StepShape


class StepCompiler:
    """Mixed into `ModelRunner`: compilation, warm-up, background compilation and decode-cost measurement."""

    def shapes(self) -> list[StepShape]:
        return self.grid.shapes()

    def _compile(self, shape: StepShape):
        """The compiled step for `shape`, compiled once: thread-safe, and a shape that another thread is
        compiling right now is waited for rather than compiled again."""
        with self._lock:
            if self._released:
                raise RuntimeError("the runner was released (its engine is shut down): no step can be compiled")
            done = self._compiled.get(shape)
            if done is not None:
                return done
            fut = self._compiling.get(shape)
            owner = fut is None
            if owner:
                fut = self._compiling[shape] = concurrent.futures.Future()
        if not owner:
            return fut.result()
        try:
            name = "step-{}-{}-{}-{}-{}".format(shape.num_decode, shape.num_blocks, shape.page_width,
                                                int(shape.full_logits), shape.num_runs)
            compiled = self.store.load(name) if self.store is not None else None
            if compiled is None:
                params, kv, pstate, cbuf = self._state_avals
                lowered = self._step.lower(params, kv, pstate, cbuf, self._dummy_inputs(shape))
                options = step_compile_options(shape.num_tokens(self.prefill_block, self.run_block))
                if self.store is not None and self.store.enabled:
                    compiled = compile_fresh(lowered, options)
                    self.store.save(name, compiled)
                else:
                    compiled = lowered.compile(compiler_options=options)
        except BaseException as e:
            with self._lock:
                del self._compiling[shape]
            fut.set_exception(e)
            raise
        with self._lock:
            self._compiled[shape] = compiled
            del self._compiling[shape]
            self.num_compiles += 1
        fut.set_result(compiled)
        return compiled

    def release(self) -> None:
        """Drop the compiled steps and the device state (`Engine.shutdown`); the runner cannot step afterwards.

        Each compiled step holds a few hundred of the process's memory mappings (XLA:CPU maps every kernel's code
        and data sections separately: ~650 a SmolLM2 step) and Linux allows 65,530 by default, so ~100 steps: an
        engine at a long context (72 shapes, ~48,000 mappings) and a second one in the same process ended in
        "LLVM ERROR: Unable to allocate section memory" while the first engine object was still referenced.
        jax's in-process caches hold a freshly compiled step too, so they are cleared (`jax.clear_caches`): other
        jitted functions of the process compile again on their next call; other engines keep their own steps."""
        with self._lock:
            self._released = True
            self._compiled.clear()
        self.kv = self.pstate = self.params = None
        jax.clear_caches()

    def compiled_shapes(self) -> list[StepShape]:
        with self._lock:
            return sorted(self._compiled)

    def first_shapes(self) -> list[StepShape]:
        """The fewest shapes that can serve any request at once (with `stand_in`): the largest prefill and a
        single decode row at the widest page table, plus a one-block prefill and a single decode row at the
        narrowest (a short first request runs at full speed). Batches, other block counts, run blocks and
        prompt-logprob steps come from the background compiler; until then a plan runs on a larger
        compiled shape, or compiles its own."""
        g = self.grid
        lo, hi = g.page_width_buckets[0], g.page_width_buckets[-1]
        d = g.decode_buckets[0]
        want = {StepShape(0, g.prefill_block_buckets[-1], hi), StepShape(d, 0, hi),
                StepShape(0, g.prefill_block_buckets[0], lo), StepShape(d, 0, lo)}
        return sorted(want)

    def stand_in(self, shape: StepShape) -> StepShape:
        """`shape` if it is compiled; else the cheapest compiled shape that can run the same plan (the same
        kinds of segments and prompt-logprob mode, each at least as large: the rest is padding, whose rows
        compute nothing that is read), or `shape` itself when none can (it is then compiled, or waited for).
        Used while the background compiler is still running."""
        with self._lock:
            if shape in self._compiled:
                return shape
            fits = [s for s in self._compiled
                    if s.full_logits == shape.full_logits and s.page_width >= shape.page_width
                    and all((a > 0) == (b > 0) and a >= b for a, b in ((s.num_decode, shape.num_decode),
                                                                       (s.num_blocks, shape.num_blocks),
                                                                       (s.num_runs, shape.num_runs)))]
        if not fits:
            return shape
        return min(fits, key=lambda s: (s.num_tokens(self.prefill_block, self.run_block), s.page_width))

    def warmup(self, progress: bool = True, shapes: list[StepShape] | None = None) -> float:
        """Compile the step shapes (all of them unless `shapes` says which). Returns seconds spent."""
        t0 = time.perf_counter()
        self._warm_constraint_upload()
        self.copy_pages([(0, 0)])  # compiles the page copy (a page onto itself changes nothing)
        self.apply_marks([0], [(0, 0, False)])
        self.apply_marks([0], [])
        shapes = self.shapes() if shapes is None else shapes
        for s in tqdm(shapes, desc="compiling step shapes", unit="shape", disable=not progress, leave=False):
            self._compile(s)
            self.warm(s)
        return time.perf_counter() - t0

    @mirrored
    def warm(self, shape: StepShape) -> None:
        """Run `shape`'s step once on padding (every token writes the sink page, no row is read or sampled): an
        executable's first runs are slower -- ~20-30 ms more here, a prompt-logprob shape's first two ~85 and ~50
        ms more while its large buffers are first mapped (bench/notes.md, "First runs") -- and without this the
        first request of each shape paid it. On the thread that owns the device state (the engine thread once it
        runs: Engine warms background-compiled shapes through `EngineLoop.call`)."""
        inp = self._dummy_inputs(shape)
        run = type(self).execute.__wrapped__  # this call is mirrored already: its step must not be sent again
        for _ in range(2 if shape.full_logits else 1):
            jax.block_until_ready(run(self, shape, inp))

    def compile_in_background(self, then=None, each=None) -> threading.Thread:
        """Compile every shape not compiled yet in a daemon thread (the engine may serve meanwhile: a step
        that needs a shape still missing compiles it, or waits for it, on the engine thread), calling `each(shape)`
        after each one it compiled, then call `then()`. `background_done` is set when the thread ends;
        `background_error` holds a failure."""
        self.background_done.clear()
        self._stop_background = False

        def work():
            try:
                for s in self.shapes():
                    if self._stop_background:
                        return
                    if s in self._compiled:
                        continue
                    self._compile(s)
                    if each is not None:
                        each(s)
                if then is not None:
                    then()
            except BaseException as e:  # noqa: BLE001 - reported through background_error; steps compile lazily
                self.background_error = e
            finally:
                self.background_done.set()

        t = threading.Thread(target=work, name="sgl_jax-compile", daemon=True)
        t.start()
        return t

    def stop_background(self) -> None:
        """Ask the background compiler to stop after the shape it is compiling."""
        self._stop_background = True

    def measure_decode_costs(self, repeats: int = 2) -> dict[tuple[int, int, int], float]:
        """Median seconds of a decode-only step per (decode bucket, page width, run blocks), rows seeing
        full pages.

        The scheduler reads these to decide whether multi-token decode runs (jump-forward) should grow a
        step to a larger decode bucket: worth it where a step's cost is mostly fixed (memory-bound), not
        where every row costs its FLOPs (a CPU). Padding rows write to the reserved page 0 only.
        """
        costs = {}

        def table(rows, p, first=0):  # distinct pages per row, as in a real batch (one page stays in cache)
            return ((np.arange(rows * p).reshape(rows, p) + first) % (self.num_pages - 1) + 1).astype(np.int32)

        for shape in self.grid.decode_shapes():
            sd, p, nr = shape.num_decode, shape.page_width, shape.num_runs
            inp = self._dummy_inputs(shape)
            full = p * self.page_size
            inp = inp.replace(dec_kv_lens=np.full(sd, full, np.int32), dec_page_table=table(sd, p),
                              run_kv_lens=np.full(nr, full, np.int32), run_page_table=table(nr, p, sd * p))
            self._compile(shape)
            times = []
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                jax.block_until_ready(self.execute(shape, inp))
                times.append(time.perf_counter() - t0)
            costs[(sd, p, nr)] = float(np.median(times[1:]))
        return costs

    def time_decode_costs(self, costs: dict | None = None) -> ShapeGrid:
        """The grid with decode step costs (given, e.g. read back from disk, or measured now)."""
        self.grid = dataclasses.replace(self.grid, costs=dict(costs if costs is not None
                                                              else self.measure_decode_costs()))
        return self.grid
