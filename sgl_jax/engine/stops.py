"""Stop strings and stop regexes, matched incrementally as output text arrives. Host code, no jax.

A stop regex is compiled (once, when the request is prepared) to a minimal byte DFA with the
project's own regex compiler (`sgl_jax.constrained.regex`), and matched by a forward scan that keeps,
for every DFA state some match attempt is in, the earliest position the attempt started at. Each
output byte costs O(DFA states) -- no backtracking, so no pattern can stall the engine thread, and
nothing already scanned is scanned again (the old approach re-ran Python's `re.search` over the
whole output every token: quadratic, and exponential for patterns such as `(a+)+b`).

Semantics: the first match to *end* wins (the engine stops as early as possible); among matches
ending there the leftmost start is reported, extended greedily over the rest of the bytes that
arrived in the same chunk (as Python's greedy `search` would see them). The supported syntax is the
regex subset documented in `sgl_jax.constrained.regex` (no lookarounds or backreferences); a leading
`^` anchors at the start of the output. Patterns that match the empty string are rejected (they
would stop before the first token).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sgl_jax.errors import InvalidRequestError

MAX_PATTERN_CHARS = 1000
MAX_DFA_STATES = 2000


@dataclasses.dataclass(frozen=True, eq=False)
class StopRegex:
    pattern: str
    trans: np.ndarray  # int32 [S, 256] byte DFA of the pattern (fullmatch), -1 = dead
    accepting: np.ndarray  # bool [S]
    anchored: bool  # a leading '^': only matches starting at output position 0


def compile_stop_regex(pattern) -> StopRegex:
    from sgl_jax.constrained.regex import ConstraintError, regex_to_byte_dfa

    if not isinstance(pattern, str) or not pattern:
        raise InvalidRequestError(f"'stop_regex' entries must be non-empty strings, got {pattern!r}",
                                  field="stop_regex")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise InvalidRequestError(f"'stop_regex' pattern has {len(pattern)} characters; at most "
                                  f"{MAX_PATTERN_CHARS}", field="stop_regex")
    anchored = pattern.startswith("^")
    body = pattern[1:] if anchored else pattern
    try:
        dfa = regex_to_byte_dfa(body, max_states=MAX_DFA_STATES, max_seconds=2.0)
    except ConstraintError as e:
        raise InvalidRequestError(f"'stop_regex' {pattern!r} cannot be used: {e}", field="stop_regex") from None
    if dfa.accepting[0]:
        raise InvalidRequestError(f"'stop_regex' {pattern!r} matches the empty string, so it would stop before "
                                  "any output", field="stop_regex")
    return StopRegex(pattern, np.ascontiguousarray(dfa.trans, np.int32), np.asarray(dfa.accepting, bool), anchored)


class _RegexScan:
    """Incremental leftmost-start search of one StopRegex over a byte stream."""

    def __init__(self, rx: StopRegex):
        self.rx = rx
        self.pos = 0  # bytes consumed so far
        self.live: dict[int, int] = {}  # DFA state -> earliest start position of an attempt in it

    def feed(self, data: bytes) -> tuple[int, int] | None:
        """Consume all of data; return (start, end) byte offsets of the first match to end in it, or None."""
        trans, acc = self.rx.trans, self.rx.accepting
        hit = None
        for i, b in enumerate(data):
            nxt: dict[int, int] = {}
            if not self.rx.anchored or self.pos == 0:
                self.live.setdefault(0, self.pos)  # an attempt may start at every position
            for st, start in self.live.items():
                t = int(trans[st, b])
                if t >= 0 and (t not in nxt or start < nxt[t]):
                    nxt[t] = start
            self.live = nxt
            self.pos += 1
            if hit is None:
                ends = [start for st, start in nxt.items() if acc[st]]
                if ends:
                    hit = (min(ends), self._extend(min(ends), data[i + 1:]))
        return hit

    def _extend(self, start: int, rest: bytes) -> int:
        """Greedy end: the last accepting position of the attempt that started at `start` within `rest`."""
        trans, acc = self.rx.trans, self.rx.accepting
        states = [st for st, s in self.live.items() if s == start]
        end = self.pos
        for j, b in enumerate(rest):
            states = [int(trans[st, b]) for st in states if trans[st, b] >= 0]
            if not states:
                break
            if any(acc[st] for st in states):
                end = self.pos + j + 1
        return end


class StopMatcher:
    """Stop strings and stop regexes of one request over its growing output text.

    `feed(text, new, active)` is called with the whole text after `new` was appended; it returns
    (char position where the stop starts, matched text) for the first stop, or None. While not
    `active` (before min_new_tokens) the regex scans still consume the text but report nothing.
    """

    def __init__(self, stops: tuple[str, ...], regexes: tuple[StopRegex, ...]):
        self.stops = stops
        self.longest = max((len(s) for s in stops), default=0)
        self.scans = [_RegexScan(rx) for rx in regexes]
        self.fed_chars = 0  # characters of text the regex scans have consumed
        self.fed_bytes = 0

    def __bool__(self) -> bool:
        return bool(self.stops or self.scans)

    def feed(self, text: str, new: str, active: bool = True) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        if self.stops and new and active:
            window = text[-(len(new) + self.longest):]
            offset = len(text) - len(window)
            for s in self.stops:
                i = window.find(s)
                if i >= 0 and (best is None or offset + i < best[0]):
                    best = (offset + i, s)
        if self.scans and len(text) > self.fed_chars:
            chunk = text[self.fed_chars:].encode("utf-8", "surrogatepass")
            base_chars, base_bytes = self.fed_chars, self.fed_bytes
            self.fed_chars, self.fed_bytes = len(text), base_bytes + len(chunk)
            for scan in self.scans:
                hit = scan.feed(chunk)
                if hit is None or not active:
                    continue
                b0, b1 = hit[0] - base_bytes, hit[1] - base_bytes
                if b0 < 0:  # the match started in an earlier chunk: count its characters from the text
                    prefix = text[:base_chars].encode("utf-8", "surrogatepass")
                    c0 = len(prefix[:len(prefix) + b0].decode("utf-8", "ignore"))
                else:
                    c0 = base_chars + len(chunk[:b0].decode("utf-8", "ignore"))
                c1 = base_chars + len(chunk[:b1].decode("utf-8", "ignore"))
                if best is None or c0 < best[0]:
                    best = (c0, text[c0:c1])
        return best
