"""The step-shape grid: the one list of compiled step shapes and what they cost. Host code, no jax.

The runner owns a `ShapeGrid` (it compiles every shape in it at start-up and times the decode shapes);
the scheduler receives the same grid read-only and plans within it, and each `StepPlan` carries the
shape it was planned for (`plan.shape`), which the runner runs as it is. Nobody else decides a shape,
so the scheduler and the runner cannot disagree.

A shape is (decode rows Sd, prefill blocks NB, page-table width P, full logits, run blocks NR): the
ragged layout is Sd decode rows (one query token each), NR run blocks (run_block tokens of one sequence),
then NB prefill blocks (prefill_block tokens each).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

# second key/value writes a step with prefill blocks carries, in pages' worth of tokens: requests that borrow the
# rows another request computes in the same step (batch.SeqChunk.borrow) -- a partial page each, a little more
# with prompt logprobs (a select's choices past a new question: the page their logits rows start in, and the
# question's last tokens); a borrow past them is cut short (Scheduler.schedule's `take`)
DUP_PAGES = 4


@dataclasses.dataclass(frozen=True, order=True)
class StepShape:
    num_decode: int  # Sd
    num_blocks: int  # NB
    page_width: int  # P
    full_logits: bool = False
    num_runs: int = 0  # NR run blocks (of the grid's run_block tokens each)

    def num_tokens(self, block_q: int, run_q: int = 1) -> int:
        return self.num_decode + self.num_runs * run_q + self.num_blocks * block_q

    def num_rows(self, block_q: int, full_rows: int = 0) -> int:
        """Logits rows: one per decode row, run block and prefill block; with full logits every token, at most
        `full_rows` (> 0) of them (the grid's full_logit_rows: the scheduler keeps a step's rows within it)."""
        if self.full_logits:  # never with run blocks
            t = self.num_tokens(block_q)
            return min(t, full_rows) if full_rows > 0 else t
        return self.num_decode + self.num_runs + self.num_blocks


def bucket(n: int, buckets) -> int:
    """The smallest bucket >= n; ValueError naming n and the largest bucket if none fits."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


@dataclasses.dataclass(frozen=True)
class ShapeGrid:
    """Which step shapes exist, and the measured cost of the decode ones (read-only once built)."""

    page_size: int
    prefill_block: int  # query tokens per prefill block
    decode_buckets: tuple[int, ...]
    prefill_block_buckets: tuple[int, ...]
    max_mixed_blocks: int  # prefill blocks that may share a step with decode rows (config limit)
    page_width_buckets: tuple[int, ...]
    run_block: int = 8  # query tokens per run block
    run_block_buckets: tuple[int, ...] = ()
    full_logit_rows: int = 0  # logits rows of a full-logits step (0: all its tokens); see StepShape.num_rows
    # seconds of a decode step by (decode rows, page width, run blocks), timed at warm-up; empty = not timed
    costs: Mapping[tuple[int, int, int], float] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_config(cls, shapes, page_size: int, page_width_buckets) -> "ShapeGrid":
        """The grid of an engine config's `shapes` section (the same names), with the page widths resolved."""
        return cls(page_size=page_size, prefill_block=shapes.prefill_block,
                   decode_buckets=tuple(shapes.decode_buckets), prefill_block_buckets=tuple(shapes.prefill_block_buckets),
                   max_mixed_blocks=shapes.max_mixed_blocks, page_width_buckets=tuple(page_width_buckets),
                   run_block=shapes.run_block, run_block_buckets=tuple(shapes.run_block_buckets),
                   full_logit_rows=shapes.full_logit_rows)

    def __post_init__(self):
        for name in ("decode_buckets", "prefill_block_buckets", "page_width_buckets", "run_block_buckets"):
            object.__setattr__(self, name, tuple(sorted(getattr(self, name))))

    @property
    def mixed_blocks(self) -> int:
        """Prefill blocks a step with decode rows can carry: the largest block bucket within the limit."""
        return max([b for b in self.prefill_block_buckets if b <= self.max_mixed_blocks], default=0)

    @property
    def dup_rows(self) -> int:
        """Borrowed rows' second writes a step with prefill blocks may carry."""
        return DUP_PAGES * self.page_size

    def num_dups(self, shape: StepShape) -> int:
        """Second key/value writes (borrowed rows) `shape`'s step carries: only steps with prefill blocks have them."""
        return self.dup_rows if shape.num_blocks else 0

    @property
    def max_blocks(self) -> int:
        return self.prefill_block_buckets[-1]

    @property
    def max_decode_rows(self) -> int:
        return self.decode_buckets[-1]

    def width_for(self, pages: int) -> int | None:
        return next((w for w in self.page_width_buckets if w >= pages), None)

    def shapes(self) -> list[StepShape]:
        out = []
        mixed = [b for b in self.prefill_block_buckets if b <= self.max_mixed_blocks]
        for p in self.page_width_buckets:
            for sd in self.decode_buckets:
                out.append(StepShape(sd, 0, p))
                out += [StepShape(sd, nb, p) for nb in mixed]
                out += [StepShape(sd, 0, p, False, nr) for nr in self.run_block_buckets]
            for nb in self.prefill_block_buckets:
                out.append(StepShape(0, nb, p))
                out.append(StepShape(0, nb, p, True))
        return sorted(set(out))

    def decode_shapes(self) -> list[StepShape]:
        """The decode-only shapes whose cost is timed (with and without run blocks)."""
        return [StepShape(sd, 0, p, False, nr) for p in self.page_width_buckets for sd in self.decode_buckets
                for nr in (0, *self.run_block_buckets)]

    def shape_for(self, decodes, prefills, full_logits: bool) -> StepShape:
        """The grid shape of a plan's chunks; ValueError if the plan does not fit any compiled shape."""
        sd = sum(len(c.token_ids) for c in decodes if not c.as_run)
        nr = sum(math.ceil(len(c.token_ids) / self.run_block) for c in decodes if c.as_run)
        nb = sum(math.ceil(len(c.token_ids) / self.prefill_block) for c in prefills)
        pages = max(math.ceil(c.end / self.page_size) for c in list(decodes) + list(prefills))
        if nr and (nb or full_logits):
            raise ValueError(f"plan has {nr} run blocks together with prefill blocks or full logits")
        if nr:
            sd = max(sd, 1)  # run shapes are compiled with at least one decode row
        shape = StepShape(bucket(sd, self.decode_buckets) if sd else 0,
                          bucket(nb, self.prefill_block_buckets) if nb else 0,
                          bucket(pages, self.page_width_buckets), full_logits,
                          bucket(nr, self.run_block_buckets) if nr else 0)
        if shape.num_decode and shape.num_blocks > self.max_mixed_blocks:
            raise ValueError(f"plan mixes {sd} decodes with {nb} prefill blocks; at most "
                             f"{self.max_mixed_blocks} blocks ride along with decodes")
        if shape.full_logits and shape.num_decode:
            raise ValueError("a full-logits (prompt logprobs) step cannot carry decodes")
        return shape
