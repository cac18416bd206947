"""Whole KV pages moved as a plan asks: `PageTransfers`, the part of `ModelRunner` (sgl_jax/runner.py) that copies
pages inside the pool (a request's partly shared page starts as a copy), reads pages out to the host tier's arena
and writes them back from it, and prices those transfers against a recompute at start-up. Each is one jitted
gather / scatter over every layer, the pool donated: `COPY_WIDTH` pairs a call, and host-tier transfers in calls of
`TRANSFER_WIDTHS` pages (`transfer_chunks`: no padding pages). Device code; the runner provides `kv`, `host_arena`,
`grid`, `num_pages`, `page_size`, `prefill_block`, `_copy`, `_gather`, `_scatter`, `_compile`, `_dummy_inputs` and
`execute`."""

from __future__ import annotations

import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np

from sgl_jax.parallel.multihost import mirrored
from sgl_jax.scheduler import StepPlan
from sgl_jax.shapes import StepShape

COPY_WIDTH = 8  # page copies per call
# pages per host-tier save / load call, one compiled gather and scatter each: a round's demotions and a step's loads
# are mostly a few pages, and a call padded to 16 cost what 16 pages cost (0.5-0.8 ms against 0.12 ms for one
# page here; bench/notes.md, "Host-tier transfers without padding")
TRANSFER_WIDTHS = (1, 2, 4, 8, 16)


def transfer_chunks(n: int) -> list[tuple[int, int]]:
    """(start, width) calls that move `n` pages with widths from TRANSFER_WIDTHS and no padding: whole calls of
    the largest, then the rest by its binary digits (13 -> 8 + 4 + 1)."""
    top = TRANSFER_WIDTHS[-1]
    out, start = [], 0
    while n - start >= top:
        out.append((start, top))
        start += top
    for w in reversed(TRANSFER_WIDTHS[:-1]):
        if (n - start) & w:
            out.append((start, w))
            start += w
    return out


def _copy_pages(kv, src, dst):
    """Every layer's K and V pages `src` written to pages `dst` (all gathered before any is written)."""
    return tuple((k.at[dst].set(k[src]), v.at[dst].set(v[src])) for k, v in kv)


def _gather_pages(kv, idx):
    """Pages `idx` of every layer's K and V: [len(idx), layers, 2, KV, S, D]."""
    return jnp.stack([jnp.stack([k[idx], v[idx]], axis=1) for k, v in kv], axis=1)


def _scatter_pages(kv, idx, data):
    """`data` [len(idx), layers, 2, KV, S, D] written to pages `idx` of every layer."""
    return tuple((k.at[idx].set(data[:, i, 0].astype(k.dtype)), v.at[idx].set(data[:, i, 1].astype(v.dtype)))
                 for i, (k, v) in enumerate(kv))


class PageTransfers:
    """Mixed into `ModelRunner`: page copies, host-tier saves and loads, and their measured costs."""

    def _transfers(self, plan: StepPlan) -> None:
        """The plan's page copies and host loads, in the order the scheduler made them (`StepPlan.copy_after`),
        consecutive ones of a kind in one call."""
        done = 0
        after = plan.copy_after or [0] * len(plan.copies)
        for k, group in itertools.groupby(zip(after, plan.copies), key=lambda t: t[0]):
            self.load_pages(plan.loads[done:k])  # (empty: nothing)
            done = max(done, k)
            self.copy_pages([pair for _, pair in group])
        self.load_pages(plan.loads[done:])

    @mirrored
    def copy_pages(self, pairs) -> None:
        """Copy whole KV pages src -> dst, all layers, before the step that reads them (partial-page reuse:
        a request's own page starts as a copy of a cached page it shares a few tokens with). Runs
        `COPY_WIDTH` pairs per call, padded by repeating the last pair (equal writes to one page)."""
        W = COPY_WIDTH
        for start in range(0, len(pairs), W):
            part = list(pairs[start:start + W])
            part += [part[-1]] * (W - len(part))
            arr = np.asarray(part, np.int32)
            self.kv = self._copy(self.kv, arr[:, 0], arr[:, 1])

    @property
    def page_bytes(self) -> int:
        """Bytes of one page over all layers' K and V (a host-tier slot)."""
        k = self.kv[0][0]
        return 2 * len(self.kv) * (k.size // k.shape[0]) * k.dtype.itemsize

    def save_pages(self, pages) -> np.ndarray:
        """Device -> host: pages' K/V for every layer as raw bytes, uint8 [len(pages), page_bytes] (the host tier's
        `save`); waits for the copy."""
        out = np.empty((len(pages), self.page_bytes), np.uint8)
        self.save_pages_into(pages, out, range(len(pages)))
        return out

    def save_pages_into(self, pages, arena: np.ndarray, rows) -> None:
        """`save_pages` written straight into `arena[rows]` (the host tier's `save_into`: one copy from the
        gathered pages into their slots), in `transfer_chunks` calls."""
        rows, pages = list(rows), list(pages)
        for start, width in transfer_chunks(len(pages)):
            part = pages[start:start + width]
            data = np.asarray(self._gather(self.kv, np.asarray(part, np.int32)))
            data = np.ascontiguousarray(data).reshape(len(part), -1).view(np.uint8)
            at = rows[start:start + len(part)]
            if at == list(range(at[0], at[0] + len(at))):  # consecutive rows: a slice, no index array
                arena[at[0]:at[0] + len(at)] = data
            else:
                arena[np.asarray(at, np.int64)] = data

    @mirrored
    def load_pages(self, loads) -> None:
        """Host -> device: (slot, page) pairs from the host arena into the pool (donated), in `transfer_chunks`
        calls. The copy from host memory is dispatched asynchronously, ahead of the step that reads it."""
        k = self.kv[0][0]
        L, shape = len(self.kv), k.shape[1:]
        loads = list(loads)
        for start, width in transfer_chunks(len(loads)):
            part = loads[start:start + width]
            idx = np.asarray([p for _, p in part], np.int32)
            rows = self.host_arena[np.asarray([s for s, _ in part], np.int64)]  # a copy: the slots may be reused
            data = rows.view(np.dtype(k.dtype)).reshape(width, L, 2, *shape)
            self.kv = self._scatter(self.kv, idx, data)

    def warm_transfers(self) -> None:
        """Compile the host tier's save and load for every width in TRANSFER_WIDTHS now (each writes page 0, the
        sink, onto itself), so that no request pays a compile."""
        for w in TRANSFER_WIDTHS:
            sink = np.zeros(w, np.int32)
            self.kv = self._scatter(self.kv, sink, self._gather(self.kv, sink))
        jax.block_until_ready(self.kv)

    def measure_transfer_costs(self, pages: int = 2 * 16):
        """This machine's prices for the host tier's load-or-recompute choice (sgl_jax/cache/costs.py): a
        prefill step of the largest compiled block count on dummy inputs (its matmuls are the recompute cost;
        padding rows compute like real ones), and saves / loads of 1 and `pages` pages (fixed cost and per
        page). Runs steps on the device state: call before serving or on the engine thread. Returns
        `TransferCosts`."""
        from sgl_jax.cache.costs import TransferCosts

        g = self.grid
        shape = StepShape(0, g.prefill_block_buckets[-1], g.page_width_buckets[-1])  # one of first_shapes()
        self._compile(shape)
        inp = self._dummy_inputs(shape)

        def prefill():
            jax.block_until_ready(self.execute(shape, inp))

        def best(fn, n=3):
            fn()
            ts = []
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            return min(ts)

        prefill_s = best(prefill) / (g.prefill_block_buckets[-1] * self.prefill_block)
        self.warm_transfers()
        arena, self.host_arena = self.host_arena, np.zeros((pages, self.page_bytes), np.uint8)
        try:
            few = [1 + i % (self.num_pages - 1) for i in range(pages)]
            save1, saven = best(lambda: self.save_pages(few[:1])), best(lambda: self.save_pages(few))

            def load(n):
                def run():
                    self.load_pages([(i, p) for i, p in enumerate(few[:n])])
                    jax.block_until_ready(self.kv)
                return run
            load1, loadn = best(load(1)), best(load(pages))
        finally:
            self.host_arena = arena
        ps = self.page_size
        per_page = max(loadn - load1, 0.0) / (pages - 1)
        return TransferCosts(prefill_s, max(load1 - per_page, 0.0), per_page / ps,
                             max(saven - save1, 0.0) / (pages - 1) / ps)
