"""`sgl_jax.batch.pack`'s borrowed rows (`SeqChunk.borrow`) against a hand-built layout: host code, numpy only."""

import numpy as np
import pytest

from sgl_jax.batch import SeqChunk, pack

PS, BQ = 4, 4


def _two_on_one_prefix():
    """A leader computing positions 0-9 (pages 1-3) and a follower sharing pages 1-2 (positions 0-7) whose
    positions 8-9 are the leader's tokens too: it borrows them into its own page 5 and computes 10-11."""
    lead = SeqChunk(list(range(100, 110)), 0, [1, 2, 3], logits_from=7)
    follow = SeqChunk([200, 201], 10, [1, 2, 5], logits_from=8, borrow=(0, 8))
    return lead, follow


@pytest.mark.timeout(30)
def test_a_borrowed_position_is_written_again_into_the_borrowers_own_slot():
    lead, follow = _two_on_one_prefix()
    b = pack([lead, follow], page_size=PS, block_q=BQ, num_dups=8)
    rows = b.token_index[0]
    # positions 8, 9: the leader's rows, a second time into page 5's slots 0, 1; padding to the sink (0)
    assert b.dup_src.tolist() == [rows[8], rows[9], 0, 0, 0, 0, 0, 0]
    assert b.dup_slots.tolist() == [5 * PS + 0, 5 * PS + 1, 0, 0, 0, 0, 0, 0]
    # the follower's own tokens write page 5's slots 2, 3
    assert b.slot_mapping[b.token_index[1]].tolist() == [5 * PS + 2, 5 * PS + 3]


@pytest.mark.timeout(30)
def test_a_borrowers_logits_rows_below_its_start_are_the_leaders():
    lead, follow = _two_on_one_prefix()
    b = pack([lead, follow], page_size=PS, block_q=BQ, num_dups=8, num_logits=16)
    (a0, e0), (a1, e1) = b.logits_rows
    assert b.logits_indices[a0:e0].tolist() == b.token_index[0][7:]  # positions 7-9
    # positions 8, 9 from the leader's rows, then 10, 11 its own
    assert b.logits_indices[a1:e1].tolist() == b.token_index[0][8:10] + b.token_index[1]
    assert (b.logits_indices[e1:] == -1).all()


@pytest.mark.timeout(30)
def test_positions_on_a_shared_page_are_not_written_twice():
    """Borrowed positions whose page the two share (a prefix committed ahead of the step) need no second write."""
    lead = SeqChunk(list(range(100, 110)), 0, [1, 2, 3])
    follow = SeqChunk([200], 9, [1, 2, 3], borrow=(0, 6))  # 6-8 on the same pages: nothing to write again
    b = pack([lead, follow], page_size=PS, block_q=BQ)
    assert b.dup_src.tolist() == [] and b.dup_slots.tolist() == []


@pytest.mark.timeout(30)
@pytest.mark.parametrize("bad, why", [
    ((1, 8), "borrows itself"),
    ((0, 11), "past the leader's chunk"),
    ((5, 8), "no such chunk"),
])
def test_a_borrow_the_batch_does_not_compute_is_refused(bad, why):
    lead, follow = _two_on_one_prefix()
    follow.borrow = bad
    if bad[1] > follow.start_pos:  # starts past what it borrows, on pages of its own
        follow.start_pos, follow.page_table, follow.logits_from = 12, [1, 2, 5, 6], None
    with pytest.raises(ValueError, match="does not compute them in this batch"):
        pack([lead, follow], page_size=PS, block_q=BQ, num_dups=8)


@pytest.mark.timeout(30)
def test_a_chained_borrow_and_too_few_second_writes_are_refused():
    lead, follow = _two_on_one_prefix()
    third = SeqChunk([300], 11, [1, 2, 6], borrow=(1, 10))  # from a borrower: refused
    with pytest.raises(ValueError, match="does not compute them"):
        pack([lead, follow, third], page_size=PS, block_q=BQ, num_dups=8)
    with pytest.raises(ValueError, match="borrowed key/value writes; padding allows 1"):
        pack([lead, follow], page_size=PS, block_q=BQ, num_dups=1)
    follow.logits_from = 7  # below what it borrows
    with pytest.raises(ValueError, match=r"logits_from=7 is outside the chunk's positions \[8, 12\)"):
        pack([lead, follow], page_size=PS, block_q=BQ, num_dups=8)
