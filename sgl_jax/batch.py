"""Host-side packing of one step's work into the padded arrays the jitted forward reads.

Host code: numpy only, no jax import. The layout is the one `sgl_jax.models.attention` describes:
T = Sd + NR * Br + NB * Bq tokens: decode tokens first, then run chunks (a few tokens of one sequence,
e.g. a jump-forward run) in blocks of Br tokens, then each prefill chunk split into blocks of Bq tokens
(the last block of a chunk padded with position -1). Every array is padded to the bucket sizes the
caller passes, so the jitted step sees a handful of shapes only.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass
class SeqChunk:
    """One sequence's work in a step: compute `token_ids` at positions start_pos, start_pos+1, ...

    `page_table` lists the pages holding positions [0, start_pos + len(token_ids)), in order.
    `logits_from` is the first position (absolute) whose next-token logits the caller wants; by default
    only the last new token's. A short chunk may be laid out as decode rows (`as_decode`): one row per
    token, each seeing keys up to its own position, which is exact because every new token's K/V is
    written before attention; it spares padding a few tokens up to a whole prefill block.
    """

    token_ids: list[int]
    start_pos: int
    page_table: list[int]
    logits_from: int | None = None
    as_decode: bool | None = None  # lay out as one decode row per token (None: only 1-token chunks)
    as_run: bool = False  # lay out as run blocks of `run_q` tokens (one page-table gather per block)
    # (leader, first): positions [first, start_pos) are computed in this very step by chunk `leader` (an index into
    # the chunks packed together), whose tokens match there. Their keys and values are written into this chunk's
    # own slots as well (`dup_src` -> `dup_slots`, only where the two slots differ) and this chunk's logits rows
    # below start_pos (logits_from >= first) are the leader's rows. The leader may not borrow itself.
    borrow: tuple[int, int] | None = None

    @property
    def end_pos(self) -> int:
        return self.start_pos + len(self.token_ids)


@dataclasses.dataclass
class PackedBatch:
    """numpy arrays for one forward call, plus where each chunk's logits rows land."""

    input_ids: np.ndarray  # [T] int32
    positions: np.ndarray  # [T] int32 (-1 = padding)
    slot_mapping: np.ndarray  # [T] int32
    dec_page_table: np.ndarray  # [Sd, P]
    dec_kv_lens: np.ndarray  # [Sd]
    pre_page_table: np.ndarray  # [NB, P]
    pre_kv_lens: np.ndarray  # [NB]
    logits_indices: np.ndarray  # [L] int32, token rows whose logits are computed (padding rows -> -1: not computed)
    block_q: int
    # For chunk i, logits rows logits_rows[i][0] : logits_rows[i][1] predict positions
    # chunk.logits_from+1 ... chunk.end_pos (the last one being the next new token).
    logits_rows: list[tuple[int, int]]
    token_index: list[list[int]]  # for chunk i, the flat token index of each of its tokens
    run_page_table: np.ndarray | None = None  # [NR, P]
    run_kv_lens: np.ndarray | None = None  # [NR]
    run_q: int = 1
    dup_src: np.ndarray | None = None  # [D] int32 token row whose k, v is written a second time; 0 = padding
    dup_slots: np.ndarray | None = None  # [D] int32 the second slot (0 = padding: the sink page)


def bucket(n: int, buckets: list[int] | tuple[int, ...]) -> int:
    """The smallest bucket >= n; ValueError naming n and the largest bucket if none fits."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


def pack(chunks: list[SeqChunk], *, page_size: int, block_q: int, num_decode: int | None = None,
         num_blocks: int | None = None, page_width: int | None = None, num_logits: int | None = None,
         run_q: int = 1, num_runs: int | None = None, num_dups: int | None = None) -> PackedBatch:
    """Pack chunks into padded arrays. Single-token chunks become decode rows, `as_run` chunks run blocks,
    the rest prefill blocks.

    Padding targets (None = exact fit): num_decode rows, num_runs run blocks, num_blocks prefill blocks,
    page_width pages per row, num_logits logits rows, num_dups second writes of borrowed keys and values.

    Longer than ~80 lines because the ragged layout's three segments (decode rows, run blocks, prefill blocks)
    are filled in one pass over the same index arrays.
    """
    def is_dec(c):
        return not c.as_run and (len(c.token_ids) == 1 if c.as_decode is None else c.as_decode)

    dec = [i for i, c in enumerate(chunks) if is_dec(c)]
    run = [i for i, c in enumerate(chunks) if c.as_run]
    pre = [i for i, c in enumerate(chunks) if not is_dec(c) and not c.as_run]
    if any(len(c.token_ids) == 0 for c in chunks):
        raise ValueError("a chunk has no tokens")
    nblk = sum(math.ceil(len(chunks[i].token_ids) / block_q) for i in pre)
    nrun = sum(math.ceil(len(chunks[i].token_ids) / run_q) for i in run)
    ndec = sum(len(chunks[i].token_ids) for i in dec)
    Sd = ndec if num_decode is None else num_decode
    NB = nblk if num_blocks is None else num_blocks
    NR = nrun if num_runs is None else num_runs
    if ndec > Sd or nblk > NB or nrun > NR:
        raise ValueError(f"batch needs {ndec} decode rows, {nrun} run blocks and {nblk} prefill blocks; "
                         f"padding allows {Sd}, {NR} and {NB}")
    need_p = max([math.ceil(c.end_pos / page_size) for c in chunks] + [1])
    P = need_p if page_width is None else page_width
    if need_p > P:
        raise ValueError(f"a sequence needs {need_p} pages; page_width is {P}")
    T = Sd + NR * run_q + NB * block_q

    input_ids = np.zeros(T, np.int32)
    positions = np.full(T, -1, np.int32)
    slots = np.zeros(T, np.int32)
    dec_pt = np.zeros((Sd, P), np.int32)
    dec_len = np.zeros(Sd, np.int32)
    pre_pt = np.zeros((NB, P), np.int32)
    pre_len = np.zeros(NB, np.int32)
    run_pt = np.zeros((NR, P), np.int32)
    run_len = np.zeros(NR, np.int32)
    token_index: list[list[int]] = [[] for _ in chunks]

    def place(c: SeqChunk, t0: int, n: int, start: int):
        idx = np.arange(t0, t0 + n)
        pos = np.arange(start, start + n)
        table = np.asarray(c.page_table, np.int64)
        input_ids[idx] = c.token_ids[start - c.start_pos: start - c.start_pos + n]
        positions[idx] = pos
        slots[idx] = table[pos // page_size] * page_size + pos % page_size
        return idx.tolist()

    def fill_blocks(which: list[int], base: int, size: int, pt: np.ndarray, lens: np.ndarray):
        """Lay chunks out as blocks of `size` query tokens from flat index `base` (decode rows: size 1)."""
        blk = 0
        for i in which:
            c = chunks[i]
            for start in range(c.start_pos, c.end_pos, size):
                n = min(size, c.end_pos - start)
                token_index[i] += place(c, base + blk * size, n, start)
                pt[blk, :len(c.page_table)] = c.page_table[:P]
                lens[blk] = c.end_pos  # the causal mask limits each query to keys <= its own position
                blk += 1

    fill_blocks(dec, 0, 1, dec_pt, dec_len)
    fill_blocks(run, Sd, run_q, run_pt, run_len)
    fill_blocks(pre, Sd + NR * run_q, block_q, pre_pt, pre_len)

    dup_src, dup_slots = _borrowed(chunks, token_index, page_size)
    D = len(dup_src) if num_dups is None else num_dups
    if len(dup_src) > D:
        raise ValueError(f"batch needs {len(dup_src)} borrowed key/value writes; padding allows {D}")
    rows: list[int] = []
    logits_rows = []
    for i, c in enumerate(chunks):
        first = c.end_pos - 1 if c.logits_from is None else c.logits_from
        lo = c.start_pos if c.borrow is None else c.borrow[1]
        if not lo <= first < c.end_pos:
            raise ValueError(f"logits_from={first} is outside the chunk's positions "
                             f"[{lo}, {c.end_pos})")
        sel = token_index[i][max(first - c.start_pos, 0):]
        if first < c.start_pos:  # the borrowed rows first: the leader's, at the same positions
            lead = chunks[c.borrow[0]]
            sel = token_index[c.borrow[0]][first - lead.start_pos:c.start_pos - lead.start_pos] + sel
        logits_rows.append((len(rows), len(rows) + len(sel)))
        rows += sel
    L = len(rows) if num_logits is None else num_logits
    if len(rows) > L:
        raise ValueError(f"batch needs {len(rows)} logits rows; padding allows {L}")
    logits_indices = np.full(L, -1, np.int32)
    logits_indices[:len(rows)] = rows
    dsrc, dslot = np.zeros(D, np.int32), np.zeros(D, np.int32)
    dsrc[:len(dup_src)], dslot[:len(dup_slots)] = dup_src, dup_slots
    return PackedBatch(input_ids, positions, slots, dec_pt, dec_len, pre_pt, pre_len, logits_indices,
                       block_q, logits_rows, token_index, run_pt, run_len, run_q, dsrc, dslot)


def _borrowed(chunks: list[SeqChunk], token_index: list[list[int]], page_size: int) -> tuple[list[int], list[int]]:
    """The second writes of borrowing chunks (`SeqChunk.borrow`): (token row, slot) for every borrowed position
    whose slot in the borrower's page table differs from the leader's. ValueError when a leader does not compute
    the borrowed positions in this batch or borrows itself."""
    src: list[int] = []
    dst: list[int] = []
    for i, c in enumerate(chunks):
        if c.borrow is None:
            continue
        li, first = c.borrow
        lead = chunks[li] if 0 <= li < len(chunks) and li != i else None
        if lead is None or lead.borrow is not None or not lead.start_pos <= first <= c.start_pos <= lead.end_pos:
            raise ValueError(f"chunk {i} borrows positions [{first}, {c.start_pos}) from chunk {li}, which does not "
                             f"compute them in this batch")
        for pos in range(first, c.start_pos):
            mine = c.page_table[pos // page_size] * page_size + pos % page_size
            if mine != lead.page_table[pos // page_size] * page_size + pos % page_size:
                src.append(token_index[li][pos - lead.start_pos])
                dst.append(mine)
    return src, dst
