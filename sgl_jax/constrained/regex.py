"""Regular expressions -> minimal UTF-8 byte-level DFA (host code, numpy only).

Pipeline::

    pattern --parse--> AST --Thompson--> NFA over code-point ranges
            --subset construction over a disjoint range partition--> DFA
            --Moore refinement--> minimal code-point DFA
            --UTF-8 expansion (shared suffixes)--> byte DFA --Moore--> minimal byte DFA

Supported syntax (a documented subset of Python ``re``; the *whole* output must
match, i.e. ``re.fullmatch`` semantics):

* literals; escapes ``\\n \\t \\r \\f \\v \\a \\0`` (octal ``\\0oo``), ``\\xHH``,
  ``\\uHHHH``, ``\\UHHHHHHHH``, and a backslash before any non-alphanumeric
  character (``\\. \\\\ \\/ \\- \\{`` ...) which makes it literal;
* character classes ``[...]`` and negated classes ``[^...]`` with ranges and
  escapes inside (``\\b`` inside a class is backspace, as in Python);
* ``.`` = any code point except ``\\n``;
* groups ``(...)``, ``(?:...)``, ``(?P<name>...)`` / ``(?<name>...)`` (capturing
  is irrelevant for matching), alternation ``|``;
* greedy quantifiers ``* + ?``, ``{m}``, ``{m,}``, ``{,n}``, ``{m,n}``; a ``{``
  that does not start a valid quantifier is a literal (as in Python);
* ``^`` as the very first character and ``$`` as the very last character of the
  pattern are accepted as no-ops (the whole output must match anyway); anywhere
  else they are rejected;
* ``\\d \\w \\s \\D \\W \\S`` are **ASCII** classes (like ``re.ASCII``):
  ``\\d=[0-9]``, ``\\w=[A-Za-z0-9_]``, ``\\s=[ \\t\\n\\r\\f\\v]``; their negations are
  the complements over all code points.

Everything else -- lookarounds, backreferences (``\\1``, ``(?P=name)``), lazy
(``*?``) or possessive (``*+``) quantifiers, inline flags ``(?i)``, word
boundaries ``\\b \\B``, ``\\A \\Z``, Unicode properties ``\\p{..}`` -- raises
:class:`RegexError`, whose message contains the pattern and a caret under the
offending position.

Surrogate code points (U+D800..U+DFFF) cannot be encoded in UTF-8; they are
silently dropped from character sets when building the byte DFA.

Size/time limits: every stage is bounded.  ``max_states`` bounds each
*minimized* automaton; the NFA may have ``20 * max_states`` states and the
unminimized DFAs ``4 * max_states``.  ``max_seconds`` bounds the wall time of
the whole pipeline.  Exceeding either raises :class:`ConstraintTooLargeError`.
"""
from __future__ import annotations

import bisect
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

__all__ = [
    "ConstraintError",
    "RegexError",
    "ConstraintTooLargeError",
    "Chars",
    "Seq",
    "Alt",
    "Repeat",
    "parse",
    "to_pattern",
    "escape",
    "NFA",
    "build_nfa",
    "CodepointDFA",
    "ByteDFA",
    "nfa_to_dfa",
    "minimize_dfa",
    "dfa_to_byte_dfa",
    "minimize_byte_dfa",
    "regex_to_byte_dfa",
    "Budget",
    "DEFAULT_MAX_STATES",
    "DEFAULT_MAX_SECONDS",
]

MAX_CP = 0x10FFFF
DEFAULT_MAX_STATES = 10_000
DEFAULT_MAX_SECONDS = 20.0
_MAX_NESTING = 100  # keeps the recursive parser/NFA builder far from the recursion limit


# ----------------------------------------------------------------------------
# errors and budgets
# ----------------------------------------------------------------------------


class ConstraintError(ValueError):
    """Base class of all structured-generation compile errors."""


class ConstraintTooLargeError(ConstraintError):
    """The constraint exceeds ``max_states`` or ``max_seconds``."""


def _display(pattern: str) -> tuple[str, list[int]]:
    """Printable rendering of ``pattern`` and the column of every character."""
    out: list[str] = []
    cols: list[int] = []
    col = 0
    for ch in pattern:
        cols.append(col)
        if ch.isprintable():
            r = ch
        else:
            r = ch.encode("unicode_escape").decode("ascii")
        out.append(r)
        col += len(r)
    cols.append(col)
    return "".join(out), cols


class RegexError(ConstraintError):
    """Unsupported or malformed regex.  ``pos`` is the offending index."""

    def __init__(self, reason: str, pattern: str, pos: int):
        self.reason = reason
        self.pattern = pattern
        self.pos = pos
        shown, cols = _display(pattern)
        caret = " " * cols[min(max(pos, 0), len(pattern))] + "^"
        super().__init__(f"{reason} at position {pos}\n    {shown}\n    {caret}")


class Budget:
    """Shared state/time limits for one compilation."""

    def __init__(self, max_states: int = DEFAULT_MAX_STATES,
                 max_seconds: float = DEFAULT_MAX_SECONDS, what: str = "constraint"):
        if max_states <= 0 or max_seconds <= 0:
            raise ValueError("max_states and max_seconds must be positive")
        self.max_states = int(max_states)
        self.max_seconds = float(max_seconds)
        self.deadline = time.monotonic() + self.max_seconds
        self.what = what

    def check_time(self, stage: str) -> None:
        if time.monotonic() > self.deadline:
            raise ConstraintTooLargeError(
                f"compiling {self.what} exceeded max_seconds={self.max_seconds:g} "
                f"(during {stage}); simplify the constraint or raise the limit")

    def check_states(self, n: int, stage: str, factor: int = 1) -> None:
        limit = self.max_states * factor
        if n > limit:
            raise ConstraintTooLargeError(
                f"compiling {self.what} exceeded the state limit: {stage} needs more "
                f"than {limit} states (max_states={self.max_states}); simplify the "
                f"constraint or raise max_states")


# ----------------------------------------------------------------------------
# character sets: normalized tuples of inclusive (lo, hi) code-point ranges
# ----------------------------------------------------------------------------


def _norm(ranges) -> tuple:
    rs = sorted((int(a), int(b)) for a, b in ranges if a <= b)
    out: list[list[int]] = []
    for a, b in rs:
        if out and a <= out[-1][1] + 1:
            if b > out[-1][1]:
                out[-1][1] = b
        else:
            out.append([a, b])
    return tuple((a, b) for a, b in out)


def _complement(ranges) -> tuple:
    out = []
    prev = 0
    for a, b in _norm(ranges):
        if a > prev:
            out.append((prev, a - 1))
        prev = b + 1
    if prev <= MAX_CP:
        out.append((prev, MAX_CP))
    return tuple(out)


def _intersect(r1, r2) -> tuple:
    out = []
    i = j = 0
    r1, r2 = _norm(r1), _norm(r2)
    while i < len(r1) and j < len(r2):
        a = max(r1[i][0], r2[j][0])
        b = min(r1[i][1], r2[j][1])
        if a <= b:
            out.append((a, b))
        if r1[i][1] < r2[j][1]:
            i += 1
        else:
            j += 1
    return tuple(out)


_DIGIT = ((0x30, 0x39),)
_WORD = _norm([(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)])
_SPACE = _norm([(0x09, 0x0D), (0x20, 0x20)])
_CLASS_ESCAPES = {
    "d": _DIGIT, "D": _complement(_DIGIT),
    "w": _WORD, "W": _complement(_WORD),
    "s": _SPACE, "S": _complement(_SPACE),
}
_SIMPLE_ESCAPES = {"n": 0x0A, "t": 0x09, "r": 0x0D, "f": 0x0C, "v": 0x0B, "a": 0x07}
_DOT = _complement(((0x0A, 0x0A),))


# ----------------------------------------------------------------------------
# AST
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Chars:
    """One code point from a set of inclusive ranges."""
    ranges: tuple


@dataclass(frozen=True)
class Seq:
    items: tuple


@dataclass(frozen=True)
class Alt:
    items: tuple


@dataclass(frozen=True)
class Repeat:
    item: object
    lo: int
    hi: Optional[int]  # None = unbounded


EMPTY = Seq(())


def _lit(cp: int) -> Chars:
    return Chars(((cp, cp),))


class _Parser:
    def __init__(self, pattern: str):
        if not isinstance(pattern, str):
            raise TypeError(f"regex pattern must be str, got {type(pattern).__name__}")
        self.p = pattern
        self.n = len(pattern)
        self.i = 0
        self.depth = 0

    def err(self, reason: str, pos: Optional[int] = None):
        raise RegexError(reason, self.p, self.i if pos is None else pos)

    def parse(self):
        if self.n and self.p[0] == "^":
            self.i = 1
        node = self.alt()
        if self.i < self.n:  # only an unmatched ')' stops alt() early
            self.err("unbalanced parenthesis")
        return node

    def alt(self):
        branches = [self.seq()]
        while self.i < self.n and self.p[self.i] == "|":
            self.i += 1
            branches.append(self.seq())
        return branches[0] if len(branches) == 1 else Alt(tuple(branches))

    def seq(self):
        items = []
        while self.i < self.n and self.p[self.i] not in "|)":
            c = self.p[self.i]
            if c == "$":
                if self.i == self.n - 1:
                    self.i += 1
                    continue
                self.err("'$' anchor is only supported at the end of the pattern")
            items.append(self.quantified(self.atom()))
        return items[0] if len(items) == 1 else Seq(tuple(items))

    # -- quantifiers -------------------------------------------------------
    def brace(self, i: int):
        """Parse ``{m}``, ``{m,}``, ``{,n}``, ``{m,n}`` at i. Returns (lo, hi, end) or None."""
        p, n = self.p, self.n
        if i >= n or p[i] != "{":
            return None
        j = i + 1
        k = j
        while k < n and p[k].isdigit() and p[k].isascii():
            k += 1
        lo_s = p[j:k]
        if k < n and p[k] == "}":
            if not lo_s:
                return None
            return int(lo_s), int(lo_s), k + 1
        if k >= n or p[k] != ",":
            return None
        k += 1
        m = k
        while m < n and p[m].isdigit() and p[m].isascii():
            m += 1
        hi_s = p[k:m]
        if m >= n or p[m] != "}":
            return None
        lo = int(lo_s) if lo_s else 0
        hi = int(hi_s) if hi_s else None
        return lo, hi, m + 1

    def quantifier_at(self, i: int):
        if i >= self.n:
            return None
        c = self.p[i]
        if c == "*":
            return 0, None, i + 1
        if c == "+":
            return 1, None, i + 1
        if c == "?":
            return 0, 1, i + 1
        if c == "{":
            return self.brace(i)
        return None

    def quantified(self, atom):
        q = self.quantifier_at(self.i)
        if q is None:
            return atom
        start = self.i
        lo, hi, end = q
        if hi is not None and lo > hi:
            self.err("min repeat greater than max repeat", start)
        self.i = end
        if self.i < self.n:
            c = self.p[self.i]
            if c == "?":
                self.err("lazy quantifiers are not supported")
            if c == "+":
                self.err("possessive quantifiers are not supported")
            if self.quantifier_at(self.i) is not None:
                self.err("multiple repeat")
        return Repeat(atom, lo, hi)

    # -- atoms ---------------------------------------------------------------
    def atom(self):
        p = self.p
        c = p[self.i]
        if c == "(":
            return self.group()
        if c == "[":
            return self.char_class()
        if c == ".":
            self.i += 1
            return Chars(_DOT)
        if c == "\\":
            r = self.escape(in_class=False)
            return Chars(r) if isinstance(r, tuple) else _lit(r)
        if c in "*+?":
            self.err("nothing to repeat")
        if c == "{" and self.brace(self.i) is not None:
            self.err("nothing to repeat")
        if c == "^":
            self.err("'^' anchor is only supported at the start of the pattern")
        self.i += 1
        return _lit(ord(c))

    def group(self):
        p = self.p
        start = self.i
        self.i += 1
        if p.startswith("?", self.i):
            rest = p[self.i:]
            if rest.startswith("?:"):
                self.i += 2
            elif rest.startswith("?="):
                self.err("lookahead assertions are not supported", start)
            elif rest.startswith("?!"):
                self.err("negative lookahead assertions are not supported", start)
            elif rest.startswith("?<="):
                self.err("lookbehind assertions are not supported", start)
            elif rest.startswith("?<!"):
                self.err("negative lookbehind assertions are not supported", start)
            elif rest.startswith("?P="):
                self.err("backreferences are not supported", start)
            elif rest.startswith("?P<") or rest.startswith("?<"):
                j = self.i + (3 if rest.startswith("?P<") else 2)
                k = p.find(">", j)
                name = p[j:k] if k >= 0 else ""
                if k < 0 or not name.isidentifier():
                    self.err("bad group name", j)
                self.i = k + 1
            else:
                self.err("this group extension (inline flags, conditionals, "
                         "atomic groups, comments) is not supported", start)
        self.depth += 1
        if self.depth > _MAX_NESTING:
            self.err(f"groups nested deeper than {_MAX_NESTING} are not supported", start)
        node = self.alt()
        self.depth -= 1
        if self.i >= self.n or p[self.i] != ")":
            self.err("missing ), unterminated subpattern", start)
        self.i += 1
        return node

    def escape(self, in_class: bool):
        """Parse an escape at self.i (a backslash). Returns a code point or a range tuple."""
        p = self.p
        start = self.i
        if self.i + 1 >= self.n:
            self.err("bad escape (end of pattern)")
        c = p[self.i + 1]
        self.i += 2
        if c in _CLASS_ESCAPES:
            return _CLASS_ESCAPES[c]
        if c in _SIMPLE_ESCAPES:
            return _SIMPLE_ESCAPES[c]
        if c == "b":
            if in_class:
                return 0x08
            self.err("word boundary \\b is not supported", start)
        if c in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[c]
            digits = p[self.i:self.i + width]
            if len(digits) != width or any(d not in "0123456789abcdefABCDEF" for d in digits):
                self.err(f"bad escape \\{c} (expected {width} hex digits)", start)
            self.i += width
            cp = int(digits, 16)
            if cp > MAX_CP:
                self.err("escape out of the Unicode range", start)
            return cp
        if c == "0":
            j = self.i
            while j < self.n and j < self.i + 2 and p[j] in "01234567":
                j += 1
            cp = int("0" + p[self.i:j], 8)
            self.i = j
            return cp
        if c in "123456789":
            self.err("backreferences (and octal escapes) are not supported", start)
        if c in "AZzG":
            self.err(f"anchor \\{c} is not supported", start)
        if c == "B":
            self.err("word boundary \\B is not supported", start)
        if c in "pP":
            self.err("Unicode property escapes are not supported", start)
        if c.isascii() and c.isalnum():
            self.err(f"bad escape \\{c}", start)
        return ord(c)

    def char_class(self):
        p = self.p
        start = self.i
        self.i += 1
        negate = False
        if self.i < self.n and p[self.i] == "^":
            negate = True
            self.i += 1
        ranges: list = []
        first = True
        while True:
            if self.i >= self.n:
                self.err("unterminated character set", start)
            c = p[self.i]
            if c == "]" and not first:
                self.i += 1
                break
            first = False
            item_pos = self.i
            lo = self.class_atom()
            if (isinstance(lo, int) and self.i + 1 < self.n and p[self.i] == "-"
                    and p[self.i + 1] != "]"):
                self.i += 1
                hi = self.class_atom()
                if not isinstance(hi, int):
                    self.err("bad character range", item_pos)
                if hi < lo:
                    self.err("bad character range (reversed)", item_pos)
                ranges.append((lo, hi))
            elif isinstance(lo, int):
                ranges.append((lo, lo))
            else:
                ranges.extend(lo)
        rs = _complement(ranges) if negate else _norm(ranges)
        return Chars(rs)

    def class_atom(self):
        c = self.p[self.i]
        if c == "\\":
            return self.escape(in_class=True)
        self.i += 1
        return ord(c)


def parse(pattern: str):
    """Parse ``pattern`` into an AST of :class:`Chars`/:class:`Seq`/:class:`Alt`/:class:`Repeat`."""
    return _Parser(pattern).parse()


# ----------------------------------------------------------------------------
# AST -> pattern string (used by the JSON-schema compiler)
# ----------------------------------------------------------------------------

_META = set(".^$*+?()[]{}|\\/-")


def _esc_cp(cp: int, in_class: bool = False) -> str:
    ch = chr(cp)
    if ch in _META or (in_class and ch in "]^-"):
        return "\\" + ch
    if cp < 0x20 or cp == 0x7F or (0xD800 <= cp <= 0xDFFF) or not ch.isprintable():
        if cp <= 0xFF:
            return f"\\x{cp:02x}"
        if cp <= 0xFFFF:
            return f"\\u{cp:04x}"
        return f"\\U{cp:08x}"
    return ch


def escape(s: str) -> str:
    """Escape ``s`` so that it matches literally (accepted by this parser and by ``re``)."""
    return "".join(_esc_cp(ord(ch)) for ch in s)


def _chars_pattern(ranges) -> str:
    if not ranges:
        return "[^\\x00-\\U0010ffff]"  # empty set (never matches)
    if len(ranges) == 1 and ranges[0][0] == ranges[0][1]:
        return _esc_cp(ranges[0][0])
    if ranges == _DOT:
        return "."
    parts = []
    for a, b in ranges:
        if a == b:
            parts.append(_esc_cp(a, True))
        elif b == a + 1:
            parts.append(_esc_cp(a, True) + _esc_cp(b, True))
        else:
            parts.append(_esc_cp(a, True) + "-" + _esc_cp(b, True))
    return "[" + "".join(parts) + "]"


def to_pattern(node) -> str:
    """Serialize an AST back to a pattern string (non-capturing groups only)."""
    if isinstance(node, Chars):
        return _chars_pattern(node.ranges)
    if isinstance(node, Seq):
        return "".join(
            ("(?:" + to_pattern(x) + ")") if isinstance(x, Alt) else to_pattern(x)
            for x in node.items)
    if isinstance(node, Alt):
        return "|".join(to_pattern(x) for x in node.items)
    if isinstance(node, Repeat):
        inner = to_pattern(node.item)
        if not isinstance(node.item, Chars):  # a Chars always serializes to one atom
            inner = "(?:" + inner + ")"
        lo, hi = node.lo, node.hi
        if (lo, hi) == (0, None):
            q = "*"
        elif (lo, hi) == (1, None):
            q = "+"
        elif (lo, hi) == (0, 1):
            q = "?"
        elif hi is None:
            q = "{%d,}" % lo
        elif lo == hi:
            q = "{%d}" % lo
        else:
            q = "{%d,%d}" % (lo, hi)
        return inner + q
    raise TypeError(f"not a regex AST node: {node!r}")


# ----------------------------------------------------------------------------
# Thompson NFA
# ----------------------------------------------------------------------------


class NFA:
    """Thompson NFA: ``eps[s]`` epsilon targets, ``edges[s]`` list of (ranges, target)."""

    def __init__(self, budget: Optional[Budget] = None):
        self.eps: list[list[int]] = []
        self.edges: list[list[tuple]] = []
        self.start = 0
        self.accept = 0
        self._budget = budget

    def new(self) -> int:
        self.eps.append([])
        self.edges.append([])
        n = len(self.eps)
        if self._budget is not None and (n & 1023) == 0:
            self._budget.check_states(n, "the NFA", factor=20)
            self._budget.check_time("NFA construction")
        return n - 1

    @property
    def num_states(self) -> int:
        return len(self.eps)

    def closure(self, states) -> frozenset:
        seen = set(states)
        stack = list(states)
        eps = self.eps
        while stack:
            s = stack.pop()
            for t in eps[s]:
                if t not in seen:
                    seen.add(t)
                    stack.append(t)
        return frozenset(seen)

    def matches(self, text: str) -> bool:
        cur = self.closure([self.start])
        for ch in text:
            cp = ord(ch)
            nxt = set()
            for s in cur:
                for ranges, t in self.edges[s]:
                    for a, b in ranges:
                        if a <= cp <= b:
                            nxt.add(t)
                            break
            if not nxt:
                return False
            cur = self.closure(nxt)
        return self.accept in cur


def build_nfa(node, budget: Optional[Budget] = None) -> NFA:
    nfa = NFA(budget)

    def frag(nd) -> tuple[int, int]:
        if isinstance(nd, Chars):
            s, e = nfa.new(), nfa.new()
            if nd.ranges:
                nfa.edges[s].append((nd.ranges, e))
            return s, e
        if isinstance(nd, Seq):
            s = e = nfa.new()
            for it in nd.items:
                a, b = frag(it)
                nfa.eps[e].append(a)
                e = b
            return s, e
        if isinstance(nd, Alt):
            s, e = nfa.new(), nfa.new()
            for it in nd.items:
                a, b = frag(it)
                nfa.eps[s].append(a)
                nfa.eps[b].append(e)
            return s, e
        if isinstance(nd, Repeat):
            s = cur = nfa.new()
            for _ in range(nd.lo):
                a, b = frag(nd.item)
                nfa.eps[cur].append(a)
                cur = b
            e = nfa.new()
            if nd.hi is None:
                a, b = frag(nd.item)
                nfa.eps[cur].append(a)
                nfa.eps[cur].append(e)
                nfa.eps[b].append(cur)
            else:
                for _ in range(nd.hi - nd.lo):  # nested optionals: (x(x(x)?)?)?
                    a, b = frag(nd.item)
                    nfa.eps[cur].append(a)
                    nfa.eps[cur].append(e)
                    cur = b
                nfa.eps[cur].append(e)
            return s, e
        raise TypeError(f"not a regex AST node: {nd!r}")

    nfa.start, nfa.accept = frag(node)
    if budget is not None:
        budget.check_states(nfa.num_states, "the NFA", factor=20)
    return nfa


# ----------------------------------------------------------------------------
# DFAs
# ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class CodepointDFA:
    """DFA over code points.  Column ``a`` of ``trans`` is the atom
    ``[atom_starts[a], atom_starts[a+1]-1]`` (the last atom ends at U+10FFFF).
    ``-1`` = no transition.  The initial state is 0."""
    trans: np.ndarray  # int32 [n, A]
    atom_starts: np.ndarray  # int64 [A]
    accepting: np.ndarray  # bool [n]

    @property
    def num_states(self) -> int:
        return int(self.trans.shape[0])

    def step(self, state: int, cp: int) -> int:
        a = int(np.searchsorted(self.atom_starts, cp, side="right")) - 1
        return int(self.trans[state, a])

    def matches(self, text: str) -> bool:
        s = 0
        for ch in text:
            s = self.step(s, ord(ch))
            if s < 0:
                return False
        return bool(self.accepting[s])


@dataclass(frozen=True, eq=False)
class ByteDFA:
    """DFA over bytes; ``trans[s, b]`` (``-1`` = no transition); initial state 0."""
    trans: np.ndarray  # int32 [n, 256]
    accepting: np.ndarray  # bool [n]

    @property
    def num_states(self) -> int:
        return int(self.trans.shape[0])

    def walk(self, data: bytes, state: int = 0) -> int:
        t = self.trans
        for b in data:
            state = int(t[state, b])
            if state < 0:
                return -1
        return state

    def matches(self, data: bytes) -> bool:
        s = self.walk(data)
        return s >= 0 and bool(self.accepting[s])


def nfa_to_dfa(nfa: NFA, budget: Optional[Budget] = None) -> CodepointDFA:
    """Subset construction over the disjoint partition of all range boundaries."""
    bounds = {0, MAX_CP + 1}
    for es in nfa.edges:
        for ranges, _ in es:
            for a, b in ranges:
                bounds.add(a)
                bounds.add(b + 1)
    starts = sorted(bounds)
    atom_starts = starts[:-1]
    n_atoms = len(atom_starts)
    # edges as atom-index intervals [alo, ahi)
    aedges: list[list[tuple[int, int, int]]] = []
    for es in nfa.edges:
        lst = []
        for ranges, t in es:
            for a, b in ranges:
                alo = bisect.bisect_left(atom_starts, a)
                ahi = bisect.bisect_left(atom_starts, b + 1) if b < MAX_CP else n_atoms
                lst.append((alo, ahi, t))
        aedges.append(lst)

    closure_memo: dict = {}

    def closure(targets: frozenset) -> frozenset:
        r = closure_memo.get(targets)
        if r is None:
            r = nfa.closure(targets)
            closure_memo[targets] = r
        return r

    start = nfa.closure([nfa.start])
    ids = {start: 0}
    order = [start]
    rows: list[list[tuple[int, int, int]]] = []
    k = 0
    while k < len(order):
        if budget is not None and (k & 255) == 0:
            budget.check_time("DFA subset construction")
        cur = order[k]
        k += 1
        evs = []
        for s in cur:
            evs.extend(aedges[s])
        row = []
        if evs:
            pts = sorted({x for a, b, _ in evs for x in (a, b)})
            for j in range(len(pts) - 1):
                lo, hi = pts[j], pts[j + 1]
                tg = frozenset(t for a, b, t in evs if a <= lo and hi <= b)
                if not tg:
                    continue
                st = closure(tg)
                sid = ids.get(st)
                if sid is None:
                    sid = len(order)
                    ids[st] = sid
                    order.append(st)
                    if budget is not None:
                        budget.check_states(sid + 1, "the unminimized DFA", factor=4)
                if row and row[-1][1] == lo and row[-1][2] == sid:
                    row[-1] = (row[-1][0], hi, sid)
                else:
                    row.append((lo, hi, sid))
        rows.append(row)
    n = len(order)
    trans = np.full((n, n_atoms), -1, dtype=np.int32)
    for s, row in enumerate(rows):
        for lo, hi, t in row:
            trans[s, lo:hi] = t
    accepting = np.array([nfa.accept in st for st in order], dtype=bool)
    return CodepointDFA(trans, np.asarray(atom_starts, dtype=np.int64), accepting)


def _mix64(x: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 finalizer (vectorized, wrapping uint64 arithmetic)."""
    z = x + np.uint64(seed)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _minimize_table(trans: np.ndarray, accepting: np.ndarray,
                    budget: Optional[Budget], stage: str):
    """Moore partition refinement on a (partial) DFA with initial state 0.

    Returns (trans, accepting) of the minimal DFA restricted to states that are
    reachable from the initial state and co-reachable to an accepting state, with
    the initial state renumbered to 0 and the others in BFS order.  An empty
    language gives a single non-accepting state with no transitions."""
    n, k = trans.shape
    sink = n
    T = np.where(trans < 0, sink, trans).astype(np.int64)
    T = np.vstack([T, np.full((1, k), sink, dtype=np.int64)])
    acc = np.append(np.asarray(accepting, dtype=bool), False)
    # compress the alphabet: identical columns behave identically
    if k > 1:
        _, col_idx = np.unique(T.T, axis=0, return_index=True)
        Tc = T[:, np.sort(col_idx)]
    else:
        Tc = T
    cls = acc.astype(np.int64)
    num = len(np.unique(cls))
    # per-column salts for the signature hash
    salts = _mix64(np.arange(1, Tc.shape[1] + 1, dtype=np.uint64), 0x5851F42D4C957F2D)
    it = 0
    while True:
        it += 1
        if budget is not None and (it & 7) == 0:
            budget.check_time(stage)
        succ = cls[Tc]  # [n+1, k]
        # signature (cls[s], cls[succ(s, c)] for all c), hashed to 64 bits ...
        h = _mix64(cls.astype(np.uint64), 0x2545F4914F6CDD1D)
        h = h + _mix64(succ.astype(np.uint64) ^ salts, 0x9E3779B97F4A7C15).sum(axis=1)
        _, first, new = np.unique(h, return_index=True, return_inverse=True)
        new = new.reshape(-1).astype(np.int64)
        rep = first[new]
        # ... and verified exactly; on a collision use the exact row-unique
        if not (np.array_equal(cls[rep], cls) and np.array_equal(succ[rep], succ)):
            sig = np.concatenate([cls[:, None], succ], axis=1)
            _, new = np.unique(sig, axis=0, return_inverse=True)
            new = new.reshape(-1).astype(np.int64)
        new_num = int(new.max()) + 1
        if new_num == num:
            break
        cls, num = new, new_num
    # class-level table
    _, rep = np.unique(cls, return_index=True)  # first member of each class
    ctrans = cls[T[rep]]  # [num, k]
    cacc = acc[rep]
    dead_cls = int(cls[sink])
    # co-reachability at class level: classes from which an accepting class is reachable.
    # (Moore already merged all dead states into the sink's class.)
    init = int(cls[0])
    if init == dead_cls:
        return np.full((1, k), -1, dtype=np.int32), np.zeros(1, dtype=bool)
    # BFS renumbering from the initial class
    newid = np.full(num, -1, dtype=np.int64)
    newid[init] = 0
    order = [init]
    j = 0
    while j < len(order):
        c = order[j]
        j += 1
        for t in np.unique(ctrans[c]):
            t = int(t)
            if t != dead_cls and newid[t] < 0:
                newid[t] = len(order)
                order.append(t)
    order_a = np.asarray(order, dtype=np.int64)
    sub = ctrans[order_a]
    out = np.where(sub == dead_cls, -1, newid[sub]).astype(np.int32)
    return out, cacc[order_a].copy()


def minimize_dfa(dfa: CodepointDFA, budget: Optional[Budget] = None) -> CodepointDFA:
    trans, acc = _minimize_table(dfa.trans, dfa.accepting, budget, "DFA minimization")
    # merge adjacent atoms with identical columns
    starts = dfa.atom_starts
    if trans.shape[1] > 1:
        diff = np.any(trans[:, 1:] != trans[:, :-1], axis=0)
        keep = np.concatenate([[True], diff])
        trans = np.ascontiguousarray(trans[:, keep])
        starts = starts[keep]
    if budget is not None:
        budget.check_states(trans.shape[0], "the minimal DFA")
    return CodepointDFA(trans, starts.copy(), acc)


# -- UTF-8 expansion ----------------------------------------------------------

_SURR_LO, _SURR_HI = 0xD800, 0xDFFF


def _state_pieces(row: np.ndarray, starts: np.ndarray) -> list[tuple[int, int, int]]:
    """Piecewise function code point -> target for one DFA row (no surrogates)."""
    pieces = []
    A = len(starts)
    for a in range(A):
        t = int(row[a])
        if t < 0:
            continue
        lo = int(starts[a])
        hi = int(starts[a + 1]) - 1 if a + 1 < A else MAX_CP
        for x, y in ((lo, min(hi, _SURR_LO - 1)), (max(lo, _SURR_HI + 1), hi)):
            if x > y:
                continue
            if pieces and pieces[-1][2] == t and pieces[-1][1] + 1 == x:
                pieces[-1] = (pieces[-1][0], y, t)
            else:
                pieces.append((x, y, t))
    return pieces


def _clip(pieces, lo, hi, piece_starts):
    """Pieces intersected with [lo, hi]."""
    j = bisect.bisect_right(piece_starts, lo) - 1
    if j < 0:
        j = 0
    out = []
    while j < len(pieces):
        a, b, t = pieces[j]
        if a > hi:
            break
        if b >= lo:
            out.append((max(a, lo), min(b, hi), t))
        j += 1
    return out


def dfa_to_byte_dfa(dfa: CodepointDFA, budget: Optional[Budget] = None) -> ByteDFA:
    """Expand code-point transitions into UTF-8 byte paths.

    Intermediate states are keyed by (remaining continuation bytes, the target
    function on the aligned code-point block relative to its base), so identical
    suffixes (e.g. "any 2 continuation bytes then state t") are shared."""
    n = dfa.num_states
    rows: list[dict[int, int]] = [dict() for _ in range(n)]
    memo: dict = {}

    def new_state() -> int:
        rows.append({})
        m = len(rows)
        if budget is not None and (m & 1023) == 0:
            budget.check_states(m, "the unminimized byte DFA", factor=4)
            budget.check_time("UTF-8 expansion")
        return m - 1

    def node(k: int, base: int, pcs: list) -> int:
        """State consuming k continuation bytes for code points [base, base+64**k)."""
        if k == 0:
            return pcs[0][2]
        size = 1 << (6 * k)
        if len(pcs) == 1 and pcs[0][0] == base and pcs[0][1] == base + size - 1:
            key = (k, pcs[0][2])
        else:
            key = (k, tuple((a - base, b - base, t) for a, b, t in pcs))
        r = memo.get(key)
        if r is not None:
            return r
        s = new_state()
        memo[key] = s
        sub = size >> 6
        row = rows[s]
        ps = [p[0] for p in pcs]
        for c in range(64):
            lo = base + c * sub
            hi = lo + sub - 1
            cp = _clip(pcs, lo, hi, ps)
            if cp:
                row[0x80 + c] = node(k - 1, lo, cp)
        return s

    starts = dfa.atom_starts
    for s in range(n):
        pcs = _state_pieces(dfa.trans[s], starts)
        if not pcs:
            continue
        ps = [p[0] for p in pcs]
        row = rows[s]
        for a, b, t in _clip(pcs, 0, 0x7F, ps):
            for cp in range(a, b + 1):
                row[cp] = t
        # (lead byte range, continuation count, valid code point range)
        for lead_lo, lead_hi, k, vlo, vhi, mask in (
                (0xC2, 0xDF, 1, 0x80, 0x7FF, 0x1F),
                (0xE0, 0xEF, 2, 0x800, 0xFFFF, 0x0F),
                (0xF0, 0xF4, 3, 0x10000, MAX_CP, 0x07)):
            if not _clip(pcs, vlo, vhi, ps):
                continue
            for lead in range(lead_lo, lead_hi + 1):
                base = (lead & mask) << (6 * k)
                top = base + (1 << (6 * k)) - 1
                cp = _clip(pcs, max(base, vlo), min(top, vhi), ps)
                if cp:
                    row[lead] = node(k, base, cp)
    m = len(rows)
    if budget is not None:
        budget.check_states(m, "the unminimized byte DFA", factor=4)
    trans = np.full((m, 256), -1, dtype=np.int32)
    for s, row in enumerate(rows):
        if row:
            trans[s, list(row.keys())] = list(row.values())
    acc = np.zeros(m, dtype=bool)
    acc[:n] = dfa.accepting
    return ByteDFA(trans, acc)


def minimize_byte_dfa(bdfa: ByteDFA, budget: Optional[Budget] = None) -> ByteDFA:
    trans, acc = _minimize_table(bdfa.trans, bdfa.accepting, budget, "byte DFA minimization")
    if budget is not None:
        budget.check_states(trans.shape[0], "the minimal byte DFA")
    return ByteDFA(np.ascontiguousarray(trans), acc)


def regex_to_byte_dfa(pattern: str, *, max_states: int = DEFAULT_MAX_STATES,
                      max_seconds: float = DEFAULT_MAX_SECONDS,
                      budget: Optional[Budget] = None) -> ByteDFA:
    """Full pipeline: pattern -> minimal UTF-8 byte DFA (initial state 0)."""
    if budget is None:
        budget = Budget(max_states, max_seconds, "regex")
    ast = parse(pattern)
    nfa = build_nfa(ast, budget)
    dfa = minimize_dfa(nfa_to_dfa(nfa, budget), budget)
    return minimize_byte_dfa(dfa_to_byte_dfa(dfa, budget), budget)
