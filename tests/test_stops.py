"""Incremental stop matching (sgl_jax.engine.stops) against Python's `re` as the reference."""

import random
import re

import pytest

from sgl_jax.engine.stops import StopMatcher, compile_stop_regex
from sgl_jax.errors import InvalidRequestError

PATTERNS = [r"ab+", r"\d{3}", r"(a+)+b", r"x[yz]", r"^he", "é+x", r"[a-c]{2,}\.", r"(ab|ba)x?"]


def reference(pat: str, text: str):
    """(start, end) of the first match to end in text, leftmost start among those; or None."""
    anchored = pat.startswith("^")
    for e in range(1, len(text) + 1):
        starts = [s for s in range(e) if re.fullmatch(pat, text[s:e]) and (not anchored or s == 0)]
        if starts:
            return min(starts), e
    return None


@pytest.mark.timeout(60)
@pytest.mark.parametrize("pat", PATTERNS)
def test_regex_scan_matches_reference_over_random_chunkings(pat):
    rx = compile_stop_regex(pat)
    for trial in range(150):
        rnd = random.Random(trial)
        text = "".join(rnd.choice("abxyzhe1234é.c") for _ in range(rnd.randrange(1, 30)))
        m, t, i, got = StopMatcher((), (rx,)), "", 0, None
        while i < len(text):
            k = rnd.randrange(1, 4)
            new, i = text[i:i + k], i + k
            t += new
            hit = m.feed(t, new)
            if hit is not None:
                got = hit
                break
        ref = reference(pat, text)
        if ref is None:
            assert got is None, (pat, text, got)
        else:
            assert got is not None and got[0] == ref[0], (pat, text, got, ref)
            assert re.fullmatch(pat.lstrip("^"), got[1]), (pat, got)  # the reported text is a match


@pytest.mark.timeout(30)
def test_matched_text_is_greedy_within_the_chunk():
    m = StopMatcher((), (compile_stop_regex(r"ab+"),))
    assert m.feed("xxabbbq", "xxabbbq") == (2, "abbb")


@pytest.mark.timeout(30)
def test_inactive_feed_consumes_but_reports_nothing():
    m = StopMatcher(("zz",), (compile_stop_regex(r"q\d"),))
    assert m.feed("q1", "q1", active=False) is None  # before min_new_tokens
    assert m.feed("q1zz", "zz", active=True) == (2, "zz")
    m = StopMatcher((), (compile_stop_regex(r"q\d"),))
    m.feed("q1", "q1", active=False)
    assert m.feed("q1 q2", " q2") == (3, "q2")


@pytest.mark.timeout(30)
def test_pathological_pattern_is_linear():
    # (a+)+b backtracks exponentially in Python's re on a run of a's; the DFA scan is one state per byte
    m = StopMatcher((), (compile_stop_regex(r"(a+)+b"),))
    text = ""
    for _ in range(2000):
        text += "a"
        assert m.feed(text, "a") is None
    assert m.feed(text + "b", "b") == (0, text + "b")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("pat,words", [("a*", "empty string"), ("(?=x)", "cannot be used"), (r"(a)\1", "cannot be used"),
                                       ("x" * 1001, "at most"), ("", "non-empty")])
def test_bad_stop_regex_is_a_clear_error(pat, words):
    with pytest.raises(InvalidRequestError, match=re.escape(words)):
        compile_stop_regex(pat)


@pytest.mark.timeout(30)
def test_stop_strings_first_occurrence_wins():
    m = StopMatcher(("cd", "b"), ())
    assert m.feed("abcd", "abcd") == (1, "b")
    m = StopMatcher(("ll",), (compile_stop_regex("h.l"),))
    assert m.feed("hello", "hello") == (0, "hel")
