"""Tests for sgl_jax.constrained (regex -> DFA -> token FSM, JSON schema -> regex)."""
from __future__ import annotations

import datetime
import json
import os
import random
import re
import subprocess
import sys
from decimal import Decimal

import numpy as np
import pytest

from sgl_jax.constrained import (BOOL, DIST_UNREACHABLE, EOS_CLASS, FLOAT, INT, NEVER_CLASS, STRING, CompiledFSM,
                                 ConstraintCache, ConstraintError, ConstraintTooLargeError,
                                 RegexError, SchemaError, TokenVocabulary, advance, advance_bytes,
                                 allowed_tokens, choices_to_regex, compile_choices,
                                 compile_json_schema, compile_regex, json_schema_to_regex, may_extend)
from sgl_jax.constrained.json_schema import int_range_regex, number_range_regex
from sgl_jax.constrained.regex import (build_nfa, dfa_to_byte_dfa, minimize_byte_dfa,
                                       minimize_dfa, nfa_to_dfa, parse, regex_to_byte_dfa,
                                       to_pattern)

# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------

ALPH = ["a", "b", "c", "é", "中", "😀", "\n", "1", "x", '"']


def unpack_mask(fsm: CompiledFSM, state: int) -> np.ndarray:
    row = np.ascontiguousarray(fsm.mask[state]).view(np.uint8)
    return np.unpackbits(row, bitorder="little")[: fsm.vocab_size].astype(bool)


def synthetic_vocab(extra=()):
    """Single bytes 0x00-0xFF (byte fallback), multi-char tokens, tokens ending or
    starting mid-UTF-8-character, specials (None) and an EOS (None)."""
    vocab = [None, None]  # 0 = EOS, 1 = another special token
    vocab += [bytes([b]) for b in range(256)]
    words = ["ab", "abc", "ba", "cc", "a1", "xx", "\n1", "aé", "é中", "中😀", "😀a", "1x",
             '"a', 'a"', '""', "bcab", "ccccc"]
    vocab += [w.encode() for w in words]
    zh, em = "中".encode(), "😀".encode()
    vocab += [zh[:2], zh[2:] + b"a", zh[1:], em[:1], em[1:3], em[3:] + b"b", b"\xc3", b"\xa9a"]
    vocab += [e.encode() if isinstance(e, str) else e for e in extra]
    vocab.append(b"")  # empty token: never allowed
    seen, out = set(), []
    for v in vocab:  # keep duplicates out (except None)
        if v is not None and v in seen:
            continue
        if v is not None:
            seen.add(v)
        out.append(v)
    return out, [0]


JSON_TOKENS = ['{"', '"}', '":', '",', ',"', '":"', '"]', "],", "[", "]", "{}", "[]", "true",
               "false", "null", "name", "age", "id", "12", "00", "99", "-1", ".5", "0.", "e+",
               "é", "中", " ", "  ", "\n", "\\n", '\\"', "\\u00", "2024", "-0", "1.", "@", ".com",
               "abc", "xyz", "tag", "val", "ue", "na", "me"]


def naive_walk(fsm: CompiledFSM, state: int, data: bytes) -> int:
    for b in data:
        state = int(fsm.byte_next[state, b])
        if state < 0:
            return -1
    return state


def token_level_live(fsm: CompiledFSM, vocab) -> np.ndarray:
    """Independent liveness: states from which an accepting state is reachable."""
    S = fsm.num_states
    succ = [set() for _ in range(S)]
    for s in range(S):
        for tok in vocab:
            if tok:
                e = naive_walk(fsm, s, tok)
                if e >= 0:
                    succ[s].add(e)
    live = fsm.accepting.copy()
    changed = True
    while changed:
        changed = False
        for s in range(S):
            if not live[s] and any(live[e] for e in succ[s]):
                live[s] = True
                changed = True
    return live


def check_masks_brute_force(fsm: CompiledFSM, vocab, eos, states=None, tokens=None):
    live = token_level_live(fsm, vocab) if tokens is None else None
    V = len(vocab)
    states = range(fsm.num_states) if states is None else states
    for s in states:
        bits = unpack_mask(fsm, s)
        nxt = fsm.next_state[s, fsm.token_class]
        assert np.array_equal(bits, nxt >= 0)
        assert np.array_equal(np.nonzero(bits)[0], allowed_tokens(fsm, s))
        for t in (range(V) if tokens is None else tokens):
            tok = vocab[t]
            if t in eos:
                expect = bool(fsm.accepting[s])
                assert bits[t] == expect, (s, t)
                if expect:
                    assert advance(fsm, s, t) == s
                continue
            if not tok:
                assert not bits[t]
                assert fsm.token_class[t] == NEVER_CLASS
                continue
            e = naive_walk(fsm, s, tok)
            ok = e >= 0 and (live[e] if live is not None else _live_by_fsm(fsm)[e])
            assert bits[t] == ok, (s, t, tok, e)
            if ok:
                assert advance(fsm, s, t) == e
            else:
                assert advance(fsm, s, t) == -1


_live_cache: dict = {}


def _live_by_fsm(fsm: CompiledFSM) -> np.ndarray:
    key = id(fsm)
    if key not in _live_cache:
        ns = fsm.next_state[:, 2:]
        live = fsm.accepting.copy()
        while True:
            tgt = np.where(ns >= 0, ns, 0)
            new = live | np.any((ns >= 0) & live[tgt], axis=1)
            if np.array_equal(new, live):
                break
            live = new
        _live_cache[key] = live
    return _live_cache[key]


def dist_to_accept(fsm: CompiledFSM) -> np.ndarray:
    S = fsm.num_states
    ns = fsm.next_state[:, 2:]
    INF = 10 ** 9
    d = np.where(fsm.accepting, 0, INF).astype(np.int64)
    while True:
        tgt = np.where(ns >= 0, ns, 0)
        cand = np.where(ns >= 0, d[tgt] + 1, INF).min(axis=1) if ns.shape[1] else np.full(S, INF)
        new = np.minimum(d, cand)
        if np.array_equal(new, d):
            return d
        d = new


_dist_cache: dict = {}


def random_walk(fsm: CompiledFSM, vocab, eos, rng: random.Random, uniform_steps=60,
                max_steps=3000):
    """Temperature-1 sampling (uniform over allowed tokens), then greedy completion."""
    d = _dist_cache.get(id(fsm))
    if d is None or d[0] is not fsm:
        d = _dist_cache[id(fsm)] = (fsm, dist_to_accept(fsm))
    d = d[1]
    s = fsm.initial_state
    out = bytearray()
    for step in range(max_steps):
        allowed = allowed_tokens(fsm, s)
        assert len(allowed) > 0, "stuck in a state with no allowed token"
        eos_ok = [e for e in eos if advance(fsm, s, e) >= 0]
        assert set(eos_ok) == set(np.intersect1d(allowed, eos).tolist())
        assert bool(eos_ok) == bool(fsm.accepting[s])
        if step < uniform_steps:
            t = int(allowed[rng.randrange(len(allowed))])
        else:
            if eos_ok:
                t = eos_ok[0]
            else:
                nxt = fsm.next_state[s, fsm.token_class[allowed]]
                better = allowed[d[nxt] < d[s]]
                t = int(rng.choice(list(better)))
        if t in eos:
            assert fsm.accepting[s]
            return bytes(out)
        out += vocab[t]
        s2 = advance(fsm, s, t)
        assert s2 >= 0
        assert advance_bytes(fsm, s, vocab[t]) == s2
        s = s2
    raise AssertionError("random walk did not terminate")


# ----------------------------------------------------------------------------
# regex parser
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("pattern,pos,needle", [
    ("a(?=b)", 1, "lookahead"),
    ("a(?!b)", 1, "lookahead"),
    ("(?<=a)b", 0, "lookbehind"),
    ("(?<!a)b", 0, "lookbehind"),
    ("(a)\\1", 3, "backreference"),
    ("(?P<x>a)(?P=x)", 8, "backreference"),
    ("a*?", 2, "lazy"),
    ("a+?b", 2, "lazy"),
    ("a{2,3}?", 6, "lazy"),
    ("a*+", 2, "possessive"),
    ("a**", 2, "multiple repeat"),
    ("*a", 0, "nothing to repeat"),
    ("ab(c", 2, "missing )"),
    ("ab)c", 2, "unbalanced"),
    ("[abc", 0, "unterminated"),
    ("[z-a]", 1, "range"),
    ("[a-\\d]", 1, "range"),
    ("a^b", 1, "'^'"),
    ("a$b", 1, "'$'"),
    ("(a$)", 2, "'$'"),
    ("\\bx", 0, "word boundary"),
    ("x\\Z", 1, "anchor"),
    ("(?i)abc", 0, "group extension"),
    ("\\q", 0, "bad escape"),
    ("\\x4", 0, "hex"),
    ("\\p{L}", 0, "property"),
    ("x{5,2}", 1, "min repeat"),
])
def test_regex_errors_have_caret(pattern, pos, needle):
    with pytest.raises(RegexError) as ei:
        parse(pattern)
    e = ei.value
    assert e.pos == pos, str(e)
    msg = str(e)
    assert needle in msg
    lines = msg.splitlines()
    assert lines[1].strip() == pattern
    assert lines[2].index("^") - lines[1].index(pattern[0]) == pos


def test_regex_accepted_syntax():
    ok = [r"^abc$", r"a{,3}", r"a{2}", r"a{2,}", r"x{", r"{a}", r"[]a]", r"[a-]", r"[-a]", r"[^]]",
          r"\u00e9\x41\U0001F600", r"[\d\s\w\-\]]", r"(?:a|)", r"(?P<n>a)|(?<m>b)", r"\/\.\\",
          r"[\b]", r"\0", "a|b|", r"\D\W\S", r"é+中?😀*"]
    for p in ok:
        parse(p)
    bdfa = regex_to_byte_dfa(r"^\u00e9\x41\U0001F600$")
    assert bdfa.matches("éA😀".encode())
    assert not bdfa.matches("éA".encode())


# ----------------------------------------------------------------------------
# random regexes vs Python re
# ----------------------------------------------------------------------------

_ATOMS = ["a", "b", "c", "é", "中", "😀", "1", "[ab]", "[^a]", "[a-c]", ".", r"\d", "[é中]",
          r"[^\n]", r"\w", r"\S", r"[^ab1]", r"\n", r"\x61", r"\u4e2d", "[😀-😂a]", '"']
_QUANTS = ["*", "+", "?", "{2}", "{1,3}", "{2,}", "{0,2}", "{,2}"]


def random_regex(rng: random.Random, depth: int) -> str:
    r = rng.random()
    if depth <= 0 or r < 0.3:
        return rng.choice(_ATOMS)
    if r < 0.5:
        return "".join(random_regex(rng, depth - 1) for _ in range(rng.randint(2, 3)))
    if r < 0.65:
        return "(?:" + "|".join(random_regex(rng, depth - 1) for _ in range(rng.randint(2, 3))) + ")"
    if r < 0.72:
        return "(" + random_regex(rng, depth - 1) + ")"
    return "(?:" + random_regex(rng, depth - 1) + ")" + rng.choice(_QUANTS)


def sample_from_dfa(dfa, rng: random.Random, max_len=8) -> str:
    """Random string accepted by a code-point DFA (None if the walk fails)."""
    s, out = 0, []
    starts = dfa.atom_starts
    for _ in range(max_len + 1):
        if dfa.accepting[s] and rng.random() < 0.3:
            return "".join(out)
        cols = np.nonzero(dfa.trans[s] >= 0)[0]
        if len(cols) == 0:
            break
        a = int(rng.choice(list(cols)))
        lo = int(starts[a])
        hi = int(starts[a + 1]) - 1 if a + 1 < len(starts) else 0x10FFFF
        cp = rng.randint(lo, min(hi, lo + 50))
        if 0xD800 <= cp <= 0xDFFF:
            return None
        out.append(chr(cp))
        s = int(dfa.trans[s, a])
    return "".join(out) if dfa.accepting[s] else None


def test_random_regexes_agree_with_python_re():
    rng = random.Random(1234)
    n_pos = 0
    for _ in range(250):
        pat = random_regex(rng, 3)
        rx = re.compile(pat, re.ASCII)
        nfa = build_nfa(parse(pat))
        dfa = nfa_to_dfa(nfa)
        mdfa = minimize_dfa(dfa)
        bdfa = minimize_byte_dfa(dfa_to_byte_dfa(mdfa))
        assert mdfa.num_states <= dfa.num_states
        # the serialized AST means the same thing
        rx2 = re.compile(to_pattern(parse(pat)), re.ASCII)
        strings = ["".join(rng.choice(ALPH) for _ in range(rng.randint(0, 6))) for _ in range(60)]
        for _ in range(30):
            w = sample_from_dfa(mdfa, rng)
            if w is not None:
                strings.append(w)
        for w in strings:
            exp = rx.fullmatch(w) is not None
            n_pos += exp
            assert nfa.matches(w) == exp, (pat, w)
            assert dfa.matches(w) == exp, (pat, w)
            assert mdfa.matches(w) == exp, (pat, w)
            assert bdfa.matches(w.encode()) == exp, (pat, w)
            assert (rx2.fullmatch(w) is not None) == exp, (pat, w)
    assert n_pos > 1000  # the positive side was exercised


def test_minimal_dfa_is_minimal_for_known_cases():
    # (a|b)*a(a|b){3}: the classic 2^(n+1) blow-up, minimal DFA has 16 states
    assert minimize_dfa(nfa_to_dfa(build_nfa(parse("(a|b)*a(a|b){3}")))).num_states == 16
    assert minimize_dfa(nfa_to_dfa(build_nfa(parse("a*|a+|(aa)*")))).num_states == 1
    assert minimize_dfa(nfa_to_dfa(build_nfa(parse("(?:ab|ab)c")))).num_states == 4


def _expected_bytes_match(rx, data: bytes) -> bool:
    try:
        text = data.decode("utf-8")  # strict: rejects overlong forms and surrogates
    except UnicodeDecodeError:
        return False
    return rx.fullmatch(text) is not None


def test_byte_dfa_accepts_exactly_utf8_encodings():
    rng = random.Random(7)
    pats = [r".*", r"[^a]*", r"[é中😀]+", r"(?:é|中|😀|a)*b?", r"[\x80-\U0010ffff]{1,2}",
            r"[^\x00-\x7f]", r"[\u0800-\uffff]", r"[\U00010000-\U0010ffff]", r"[\u07ff-\u0801]+",
            r"[\ud7ff-\ue000]", r"\W\S"]
    bad = [b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80",
           b"\xc3", b"\xa9", b"\xe4\xb8", b"\xf0\x9f\x98", b"\xff"]
    for pat in pats:
        rx = re.compile(pat, re.ASCII)
        bdfa = regex_to_byte_dfa(pat)
        samples = list(bad)
        for _ in range(300):
            w = "".join(chr(rng.choice([0x61, 0x62, 0x7F, 0x80, 0x7FF, 0x800, 0xD7FF, 0xE000, 0xFFFF,
                                        0x10000, 0x10FFFF, 0xE9, 0x4E2D, 0x1F600,
                                        rng.randint(0x80, 0x10FFFF)]))
                        for _ in range(rng.randint(0, 3)))
            w = "".join(c for c in w if not 0xD800 <= ord(c) <= 0xDFFF)
            b = w.encode()
            samples.append(b)
            if b:  # corrupt: truncate / flip a byte / insert a random byte
                i = rng.randrange(len(b))
                samples.append(b[:i])
                samples.append(b[:i] + bytes([rng.randint(0x80, 0xFF)]) + b[i + 1:])
                samples.append(b[:i] + bytes([rng.randint(0, 255)]) + b[i:])
        for b in samples:
            assert bdfa.matches(b) == _expected_bytes_match(rx, b), (pat, b)


# ----------------------------------------------------------------------------
# token FSM
# ----------------------------------------------------------------------------

_FSM_PATTERNS = [r"(?:ab|c)*中?", r"a[^a]*b", r"(?:é|中|😀)+1?", r"\d{2,4}", r'"(?:[^"\\]|\\.)*"',
                 r"(?:a|b)*a(?:a|b){2}", r"x(?:1|😀)*y?", r".{0,3}\n"]


@pytest.mark.parametrize("pattern", _FSM_PATTERNS)
def test_token_fsm_masks_and_random_walks(pattern):
    vocab, eos = synthetic_vocab()
    fsm = compile_regex(pattern, vocab, eos)
    rx = re.compile(pattern, re.ASCII)
    assert fsm.mask.dtype == np.int32 and fsm.mask.shape == (fsm.num_states, (len(vocab) + 31) // 32)
    assert fsm.token_class.dtype == np.int32 and fsm.next_state.dtype == np.int32
    assert fsm.token_class[1] == NEVER_CLASS and fsm.token_class[0] == EOS_CLASS
    assert np.all(fsm.next_state[:, NEVER_CLASS] == -1)
    check_masks_brute_force(fsm, vocab, eos)
    # classes: every token of a class behaves identically from every state
    for c in range(fsm.num_classes):
        members = np.nonzero(fsm.token_class == c)[0]
        for s in range(fsm.num_states):
            vals = {advance(fsm, s, int(t)) for t in members}
            assert len(vals) <= 1
    rng = random.Random(hash(pattern) & 0xFFFF)
    for _ in range(40):
        out = random_walk(fsm, vocab, eos, rng, uniform_steps=rng.randint(0, 12))
        assert rx.fullmatch(out.decode("utf-8")), (pattern, out)


def test_forced_bytes():
    vocab, eos = synthetic_vocab()
    fsm = compile_regex(r"abc(?:d|ef)gh?", vocab, eos)
    assert fsm.forced[0] == b"abc"
    s = advance(fsm, 0, vocab.index(b"a"))
    assert fsm.forced[s] == b"bc"
    s = advance_bytes(fsm, 0, b"abce")
    assert fsm.forced[s] == b"fg"
    s = advance_bytes(fsm, 0, b"abcdg")  # accepting: nothing forced
    assert fsm.accepting[s] and fsm.forced[s] == b""
    # forced strings may end mid-character
    fsm = compile_regex("中(?:a|b)", vocab, eos)
    assert fsm.forced[0] == "中".encode()
    assert fsm.forced[advance_bytes(fsm, 0, b"\xe4")] == b"\xb8\xad"
    # forced runs are consistent with the byte DFA: every state reached along them
    # has exactly one outgoing byte
    for s, f in enumerate(fsm.forced):
        cur = s
        for b in f:
            assert np.count_nonzero(fsm.byte_next[cur] >= 0) == 1 and not fsm.accepting[cur]
            cur = int(fsm.byte_next[cur, b])


def test_token_extensions_and_may_extend_against_brute_force():
    """TokenVocabulary.extensions (sorted-index bisection) and may_extend vs a scan of the whole vocabulary."""
    rng = random.Random(4)
    extra = [bytes(rng.choice(b"ab\xff\xfe") for _ in range(rng.randint(1, 4))) for _ in range(60)]
    vocab, eos = synthetic_vocab(extra + [b"\xff\xff", b"\xffa", b"a\xff", b"a\xff\xff"])
    tv = TokenVocabulary(vocab, eos)
    for t, b in enumerate(vocab):
        want = sorted(u for u, c in enumerate(vocab)
                      if b and c and u not in eos and len(c) > len(b) and c.startswith(b))
        assert sorted(tv.extensions(t).tolist()) == want, (t, b)
    for pattern in [r"ab(a|b)*c", r"(a|ab)x", r"xx\d", r"[ab]{2,5}\xff?"]:
        try:
            fsm = compile_regex(pattern, tv)
        except ConstraintError:
            continue
        for s in range(fsm.num_states):
            allowed = set(allowed_tokens(fsm, s).tolist())
            for t, b in enumerate(vocab):
                if t in allowed:
                    want = bool(b) and any(u in allowed and len(c) > len(b) and c.startswith(b)
                               for u, c in enumerate(vocab) if c and u not in eos)
                    assert may_extend(fsm, tv, s, t) == want, (pattern, s, b)


def naive_dist(fsm: CompiledFSM, vocab, eos) -> np.ndarray:
    """Independent reference for fsm.dist: walk every token's bytes through the byte DFA from every state,
    then a forward BFS from each state until an accepting state (the token FSM's tables are not used)."""
    S = fsm.num_states
    succ = [{e for t, tok in enumerate(vocab) if tok and t not in eos for e in [naive_walk(fsm, s, tok)] if e >= 0}
            for s in range(S)]
    out = np.full(S, DIST_UNREACHABLE, np.int64)
    for s in range(S):
        seen, layer, d = {s}, [s], 0
        while layer:
            if any(fsm.accepting[x] for x in layer):
                out[s] = d
                break
            d += 1
            layer = [e for x in layer for e in succ[x] if e not in seen]
            seen.update(layer)
    return out


@pytest.mark.timeout(120)
def test_dist_to_acceptance_against_naive_bfs():
    vocab, eos = synthetic_vocab(JSON_TOKENS)
    fsms = [compile_regex(p, vocab, eos) for p in
            [r"[a-z]+@[a-z]+\.(com|org)", r"(cat|dog)s? [0-9]{2,3}", r"a{3,7}", r"(?:ab|c){0,4}d", r"x*",
             r"(?:é|中|😀)+1?", r"abc(?:d|ef)gh?", r'"(?:[^"\\]|\\.)*"']]
    fsms.append(compile_json_schema({"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 4}, "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["x", "yz"]}, "maxItems": 2}},
        "required": ["name", "ok"]}, vocab, eos))
    for fsm in fsms:
        assert fsm.dist.dtype == np.int32 and fsm.dist.shape == (fsm.num_states,)
        want = naive_dist(fsm, vocab, eos)
        assert np.array_equal(fsm.dist, want), (fsm.dist, want)
        assert np.all((fsm.dist == 0) == fsm.accepting)
        assert fsm.min_tokens == fsm.dist[fsm.initial_state] < DIST_UNREACHABLE
        # every state a token can lead to is live (finite dist), and a live non-accepting state has a
        # successor exactly one token closer: the budget rule never leaves a row without an allowed token
        ns = fsm.next_state[:, EOS_CLASS + 1:]
        assert np.all(fsm.dist[ns[ns >= 0]] < DIST_UNREACHABLE)
        for s in np.nonzero((fsm.dist > 0) & (fsm.dist < DIST_UNREACHABLE))[0]:
            row = ns[s][ns[s] >= 0]
            assert fsm.dist[row].min() == fsm.dist[s] - 1
    # the shortest email: "abc" "@" "abc" ".com" with JSON_TOKENS, one token per byte without them
    assert fsms[0].min_tokens == 4
    assert compile_regex(r"[a-z]+@[a-z]+\.(com|org)", *synthetic_vocab()).min_tokens == len("a@a.com")


def test_unsatisfiable_with_vocab():
    vocab = [None, b"a", b"b"]
    with pytest.raises(ConstraintError):
        compile_regex("c", vocab, [0])
    # tokens that lead into dead ends are masked (only "ab" can finish "abab")
    vocab = [None, b"ab", b"aba"]
    fsm = compile_regex("abab", vocab, [0])
    assert list(allowed_tokens(fsm, 0)) == [1]


@pytest.mark.timeout(60)  # a limit that did not hold would hang here
def test_limits_raise_instead_of_hanging():
    with pytest.raises(ConstraintTooLargeError, match="state limit"):
        regex_to_byte_dfa("(a|b)*a(a|b){20}", max_states=1000)
    with pytest.raises(ConstraintTooLargeError):
        regex_to_byte_dfa("(?:a{1000}){1000}", max_states=5000)
    with pytest.raises(ConstraintTooLargeError, match="max_seconds"):
        regex_to_byte_dfa("(?:[a-z]|é){0,400}x(?:[0-9]{1,30}y){0,40}", max_states=10 ** 7,
                          max_seconds=0.05)
    vocab, eos = synthetic_vocab()
    with pytest.raises(ConstraintTooLargeError):
        compile_json_schema({"type": "string", "maxLength": 5000}, vocab, eos, max_states=2000)


def test_module_does_not_import_jax():
    code = "import sys, sgl_jax.constrained; assert 'jax' not in sys.modules, 'jax imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr


# ----------------------------------------------------------------------------
# numeric ranges
# ----------------------------------------------------------------------------

_CANON_INT = re.compile(r"-?(?:0|[1-9][0-9]*)")


def test_int_range_regex_exact():
    rng = random.Random(3)
    cases = [(-37, 1234), (0, 0), (-5, -5), (None, 10), (-10, None), (None, -3), (7, None),
             (0, None), (None, 0), (-1, 1), (100, 999), (99, 1000), (-1000, -99), (None, None)]
    for _ in range(60):
        a = rng.choice([None, rng.randint(-3000, 3000)])
        b = rng.choice([None, rng.randint(-3000, 3000)])
        if a is not None and b is not None and a > b:
            a, b = b, a
        cases.append((a, b))
    tests = [str(i) for i in range(-3100, 3100)] + ["-0", "00", "01", "-01", "+1", "1.0", ""]
    tests += [str(rng.randint(-10 ** 12, 10 ** 12)) for _ in range(200)]
    for lo, hi in cases:
        rx = re.compile(int_range_regex(lo, hi))
        for w in tests:
            canon = _CANON_INT.fullmatch(w) is not None and w != "-0"
            exp = canon and (lo is None or int(w) >= lo) and (hi is None or int(w) <= hi)
            assert (rx.fullmatch(w) is not None) == exp, (lo, hi, w)
    assert int_range_regex(5, 4) is None


_CANON_NUM = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?")


def test_number_range_regex_exact():
    rng = random.Random(11)

    def rand_dec():
        return Decimal(rng.randint(-2500, 2500)) / Decimal(rng.choice([1, 10, 100, 1000]))

    tests = ["0", "-0", "0.0", "-0.0", "0.000", "1.", ".5", "01.5", "1e3", "00"]
    for _ in range(2500):
        d = Decimal(rng.randint(-30000, 30000)) / Decimal(10 ** rng.randint(0, 5))
        s = format(d, "f")
        if rng.random() < 0.2 and "." in s:
            s += "0" * rng.randint(1, 3)
        tests.append(s)
    for _ in range(80):
        lo = rng.choice([None, rand_dec()])
        hi = rng.choice([None, rand_dec()])
        if lo is not None and hi is not None and lo > hi:
            lo, hi = hi, lo
        if rng.random() < 0.1 and lo is not None:
            hi = lo
        ls, hs = rng.random() < 0.5, rng.random() < 0.5
        r = number_range_regex(lo, ls, hi, hs)
        nonempty = (lo is None or hi is None or lo < hi or (lo == hi and not ls and not hs))
        assert (r is not None) == nonempty, (lo, ls, hi, hs)
        if r is None:
            continue
        rx = re.compile(r)
        for w in tests:
            canon = _CANON_NUM.fullmatch(w) is not None
            if canon:
                v = Decimal(w)
                if w.startswith("-") and v == 0:
                    canon = False
            exp = canon and (lo is None or (v > lo if ls else v >= lo)) and \
                (hi is None or (v < hi if hs else v <= hi))
            assert (rx.fullmatch(w) is not None) == exp, (lo, ls, hi, hs, w)


# ----------------------------------------------------------------------------
# JSON schema
# ----------------------------------------------------------------------------

import jsonschema  # noqa: E402


def _validate(schema, text: str):
    value = json.loads(text)
    cls = jsonschema.Draft202012Validator
    cls(schema, format_checker=cls.FORMAT_CHECKER).validate(value)
    _check_datetime_formats(schema, value)
    return value


def _check_datetime_formats(schema, value):
    """jsonschema needs an optional package for date-time/time; check them ourselves
    (recursively over the schema/value pair)."""
    if not isinstance(schema, dict):
        return
    if isinstance(value, str) and schema.get("format") in ("date-time", "time"):
        text = value if schema["format"] == "date-time" else "1970-01-01T" + value
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", text)
        datetime.datetime.fromisoformat(text)
    if isinstance(value, dict):
        for k, sub in schema.get("properties", {}).items():
            if k in value:
                _check_datetime_formats(sub, value[k])
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for v in value:
            _check_datetime_formats(schema["items"], v)
    for comb in ("anyOf", "oneOf"):
        if comb in schema:
            ok = False
            for sub in schema[comb]:
                try:
                    cls = jsonschema.Draft202012Validator
                    cls(sub, format_checker=cls.FORMAT_CHECKER).validate(value)
                    _check_datetime_formats(sub, value)
                    ok = True
                except Exception:
                    pass
            assert ok


_PATTERNS = ["[a-z]{2,4}", r"\d{3}-\d{2}", '[a"\\\\]{1,3}', "(?:ab|中)+", r"[^\n]{0,3}x"]


def random_schema(rng: random.Random, depth: int):
    kinds = ["string", "int", "number", "bool", "null", "enum", "const", "nullable", "format",
             "pattern"]
    if depth > 0:
        kinds += ["array", "object", "object", "anyOf"]
    k = rng.choice(kinds)
    if k == "string":
        s = {"type": "string"}
        if rng.random() < 0.5:
            mn = rng.randint(0, 3)
            s["minLength"] = mn
            if rng.random() < 0.7:
                s["maxLength"] = mn + rng.randint(0, 4)
        return s
    if k == "int":
        s = {"type": "integer"}
        lo = rng.choice([None, -37, 0, 5, -1000, rng.randint(-500, 500)])
        hi = rng.choice([None, 1234, 0, 99, rng.randint(-500, 2000)])
        if lo is not None and hi is not None and lo > hi:
            lo, hi = hi, lo
        if lo is not None:
            s["exclusiveMinimum" if rng.random() < 0.3 else "minimum"] = lo
        if hi is not None:
            s["exclusiveMaximum" if rng.random() < 0.3 else "maximum"] = hi
        if s.get("exclusiveMinimum", -10 ** 9) + 1 >= s.get("exclusiveMaximum", 10 ** 9):
            s.pop("exclusiveMaximum")
        return s
    if k == "number":
        s = {"type": "number"}
        if rng.random() < 0.7:
            lo = rng.choice([-1.5, 0, 0.25, -37, 2.75])
            hi = lo + rng.choice([0.5, 1, 10.125, 100])
            s["exclusiveMinimum" if rng.random() < 0.3 else "minimum"] = lo
            s["exclusiveMaximum" if rng.random() < 0.3 else "maximum"] = hi
        return s
    if k == "bool":
        return {"type": "boolean"}
    if k == "null":
        return {"type": "null"}
    if k == "enum":
        return {"enum": rng.sample(["red", "green", 1, 2.5, None, True, {"a": [1, "x"]}, [], 'q"\\',
                                    "中文"], 3)}
    if k == "const":
        return {"const": rng.choice(["fixed", 42, {"k": None}, [1, 2], "é\n"])}
    if k == "nullable":
        return {"type": ["string", "null"], "maxLength": 3}
    if k == "format":
        return {"type": "string", "format": rng.choice(["date", "time", "date-time", "email", "uuid",
                                                        "ipv4"])}
    if k == "pattern":
        return {"type": "string", "pattern": rng.choice(_PATTERNS)}
    if k == "array":
        s = {"type": "array", "items": random_schema(rng, depth - 1)}
        if rng.random() < 0.5:
            s["minItems"] = rng.randint(0, 2)
        if rng.random() < 0.7:
            s["maxItems"] = s.get("minItems", 0) + rng.randint(0, 3)
        return s
    if k == "object":
        n = rng.randint(0, 4)
        names = rng.sample(["name", "age", "id", "tags", "x", "a b", 'q"t', "中"], n)
        props = {nm: random_schema(rng, depth - 1) for nm in names}
        s = {"type": "object", "properties": props,
             "required": [nm for nm in names if rng.random() < 0.5]}
        if rng.random() < 0.5:
            s["additionalProperties"] = False
        return s
    # anyOf with disjoint branches
    return {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "string", "maxLength": 2},
                      {"type": "array", "items": random_schema(rng, depth - 1), "maxItems": 2}]}


def test_random_schemas_validate():
    rng = random.Random(2024)
    vocab, eos = synthetic_vocab(JSON_TOKENS)
    n_ok = 0
    for i in range(100):
        schema = random_schema(rng, 2)
        ws = rng.choice([None, None, r"[ \n]{0,2}", "flexible"])
        fsm = compile_json_schema(schema, vocab, eos, whitespace_pattern=ws)
        rx = re.compile(json_schema_to_regex(schema, whitespace_pattern=ws), re.ASCII)
        for _ in range(6):
            out = random_walk(fsm, vocab, eos, rng, uniform_steps=rng.randint(0, 40))
            text = out.decode("utf-8")
            assert rx.fullmatch(text), (schema, text)
            try:
                _validate(schema, text)
            except Exception as e:  # pragma: no cover - diagnostic
                raise AssertionError(f"{schema}\n{text!r}\n{e}") from None
            n_ok += 1
    assert n_ok == 100 * 6


def test_json_fsm_masks_brute_force():
    vocab, eos = synthetic_vocab(JSON_TOKENS)
    schema = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 4}, "age": {"type": "integer", "minimum": -37,
                                                             "maximum": 1234},
        "ok": {"type": ["boolean", "null"]}, "v": {"type": "number", "exclusiveMinimum": -1.5,
                                                   "maximum": 2.25}},
        "required": ["name", "v"]}
    fsm = compile_json_schema(schema, vocab, eos, whitespace_pattern=r" ?")
    check_masks_brute_force(fsm, vocab, eos)


def test_integer_ranges_via_fsm():
    vocab, eos = synthetic_vocab(JSON_TOKENS)
    rng = random.Random(5)
    for schema in [{"type": "integer", "minimum": -37, "maximum": 1234},
                   {"type": "integer", "exclusiveMinimum": -37, "exclusiveMaximum": 1234},
                   {"type": "integer", "minimum": 1.5, "maximum": 7.5},
                   {"type": "integer", "minimum": -100, "exclusiveMaximum": -98},
                   {"type": "integer", "minimum": 5, "exclusiveMinimum": True},  # draft-4 style
                   {"type": "number", "exclusiveMinimum": 0, "maximum": 0.5}]:
        fsm = compile_json_schema(schema, vocab, eos)
        values = set()
        for _ in range(150):
            text = random_walk(fsm, vocab, eos, rng, uniform_steps=rng.randint(0, 6)).decode()
            v = json.loads(text)
            if schema.get("exclusiveMinimum") is True:
                assert v > 5
            else:
                _validate(schema, text)
            values.add(v)
        assert len(values) >= 2
    # exhaustively: which integers does the FSM accept?
    fsm = compile_json_schema({"type": "integer", "minimum": -37, "maximum": 1234}, vocab, eos)
    for i in range(-1300, 1300):
        s = advance_bytes(fsm, 0, str(i).encode())
        assert (s >= 0 and bool(fsm.accepting[s])) == (-37 <= i <= 1234), i


def test_schema_structure_and_forced_keys():
    schema = {"type": "object",
              "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                             "nick": {"type": "string"}, "ok": {"type": "boolean"}},
              "required": ["name", "age"], "additionalProperties": False}
    r = re.compile(json_schema_to_regex(schema))
    assert r.fullmatch('{"name":"x","age":3}')
    assert r.fullmatch('{"name":"x","age":3,"nick":"y","ok":true}')
    assert r.fullmatch('{"name":"x","age":3,"ok":false}')
    assert not r.fullmatch('{"name":"x","age":3,}')
    assert not r.fullmatch('{"age":3,"name":"x"}')
    assert not r.fullmatch('{"name":"x"}')
    # all optional: empty object allowed, commas correct
    r = re.compile(json_schema_to_regex({"type": "object", "properties": {
        "a": {"type": "integer"}, "b": {"type": "integer"}, "c": {"type": "integer"}}}))
    for ok in ["{}", '{"a":1}', '{"b":1}', '{"c":1}', '{"a":1,"c":2}', '{"a":1,"b":2,"c":3}']:
        assert r.fullmatch(ok), ok
    for bad in ['{,"b":1}', '{"a":1,}', '{"a":1"b":2}', '{"b":1,"a":2}']:
        assert not r.fullmatch(bad), bad
    vocab, eos = synthetic_vocab(JSON_TOKENS)
    fsm = compile_json_schema(schema, vocab, eos)
    assert fsm.forced[0] == b'{"name":"'
    s = advance(fsm, 0, vocab.index(b"{"))
    assert fsm.forced[s] == b'"name":"'
    s = advance_bytes(fsm, 0, b'{"name":"bob"')
    assert fsm.forced[s] == b',"age":'
    # whitespace pattern
    r = re.compile(json_schema_to_regex(schema, whitespace_pattern=r"[ \n]{0,2}"))
    assert r.fullmatch('{ "name" : "x" ,\n"age": 3 }')
    r = re.compile(json_schema_to_regex(schema, whitespace_pattern="flexible"))
    assert r.fullmatch('{\n\t"name":    "x",\r\n  "age": 3\n}')


def test_string_escaping_and_lengths():
    r = re.compile(json_schema_to_regex({"type": "string", "minLength": 2, "maxLength": 3}))
    for ok in ['"ab"', '"a\\nb"', '"\\u00e9x"', '"中文字"', '"\\"\\\\"']:
        assert r.fullmatch(ok), ok
        assert 2 <= len(json.loads(ok)) <= 3
    for bad in ['"a"', '"abcd"', '"a\nb"', '"a"b"', '"\\ud83dx"', '"\\x"']:
        assert not r.fullmatch(bad), bad
    # pattern characters that must be escaped in JSON
    r = re.compile(json_schema_to_regex({"type": "string", "pattern": '^a"\\\\\\n$'}))
    assert r.fullmatch('"a\\"\\\\\\n"')
    assert json.loads('"a\\"\\\\\\n"') == 'a"\\\n'


def test_enum_const_and_choices():
    r = re.compile(json_schema_to_regex({"enum": ["a", 1, None, {"x": [True]}, "q\"\n"]}))
    for ok in ['"a"', "1", "null", '{"x":[true]}', '"q\\"\\n"']:
        assert r.fullmatch(ok), ok
    r = re.compile(json_schema_to_regex({"type": "string", "enum": ["a", 1, "b"]}))
    assert r.fullmatch('"b"') and not r.fullmatch("1")
    pat = choices_to_regex(["yes", "no", "a.b", "(x)", "中", "-"])
    rr = re.compile(pat)
    for c in ["yes", "no", "a.b", "(x)", "中", "-"]:
        assert rr.fullmatch(c)
    assert not rr.fullmatch("aXb")
    vocab, eos = synthetic_vocab(["yes", "no"])
    fsm = compile_choices(["yes", "no", "maybe"], vocab, eos)
    rng = random.Random(0)
    outs = {random_walk(fsm, vocab, eos, rng, uniform_steps=5).decode() for _ in range(60)}
    assert outs == {"yes", "no", "maybe"}
    for const in (INT, FLOAT, BOOL, STRING):
        compile_regex(const, vocab, eos)
    assert re.fullmatch(INT, "-12 ") and re.fullmatch(FLOAT, "3.5") and re.fullmatch(BOOL, "True")
    assert re.fullmatch(STRING, '"ab c1"')


def test_refs_and_recursion():
    tree = {"$defs": {"node": {"type": "object", "properties": {
        "v": {"type": "integer", "minimum": 0, "maximum": 9},
        "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}},
        "required": ["v"]}}, "$ref": "#/$defs/node"}
    vocab, eos = synthetic_vocab(JSON_TOKENS + ['{"v":', ',"kids":['])
    fsm = compile_json_schema(tree, vocab, eos, max_recursion_depth=2)
    rng = random.Random(9)

    def depth(x):
        return 1 + max((depth(k) for k in x.get("kids", [])), default=0)

    depths = set()
    for _ in range(60):
        text = random_walk(fsm, vocab, eos, rng, uniform_steps=rng.randint(0, 80)).decode()
        v = _validate(tree, text)
        depths.add(depth(v))
    assert max(depths) <= 3  # root + 2 recursive expansions
    linked = {"definitions": {"n": {"type": "object", "properties": {
        "next": {"anyOf": [{"$ref": "#/definitions/n"}, {"type": "null"}]}}, "required": ["next"]}},
        "$ref": "#/definitions/n"}
    r = re.compile(json_schema_to_regex(linked, max_recursion_depth=3))
    assert r.fullmatch('{"next":{"next":null}}')
    assert r.fullmatch('{"next":{"next":{"next":{"next":null}}}}')
    assert not r.fullmatch('{"next":{"next":{"next":{"next":{"next":null}}}}}')
    endless = {"$defs": {"a": {"type": "object", "properties": {"x": {"$ref": "#/$defs/a"}},
                               "required": ["x"]}}, "$ref": "#/$defs/a"}
    with pytest.raises(SchemaError, match="max_recursion_depth"):
        json_schema_to_regex(endless)
    with pytest.raises(SchemaError) as ei:
        json_schema_to_regex({"$ref": "#/$defs/missing"})
    assert ei.value.keyword == "$ref"


@pytest.mark.parametrize("schema,keyword,path", [
    ({"type": "integer", "multipleOf": 3}, "multipleOf", "#/multipleOf"),
    ({"type": "object", "properties": {"a": {"not": {"type": "null"}}}}, "not", "#/properties/a/not"),
    ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "uniqueItems", "#/uniqueItems"),
    ({"type": "object", "patternProperties": {"^x": {}}}, "patternProperties", "#/patternProperties"),
    ({"type": "object", "properties": {"a": {"type": "string", "format": "hostname"}}}, "format",
     "#/properties/a/format"),
    ({"type": "object", "properties": {}, "required": ["zz"]}, "required", "#/required"),
    ({"allOf": [{"type": "string"}, {"maxLength": 3}]}, "allOf", "#/allOf"),
    ({"if": {"type": "string"}, "then": {}}, "if", "#/if"),
    ({"type": "string", "pattern": "a(?=b)"}, "pattern", "#/pattern"),
    ({"type": "string", "pattern": "ab", "maxLength": 3}, "maxLength", "#/maxLength"),
    ({"type": "object", "minProperties": 1}, "minProperties", "#/minProperties"),
    ({"$defs": {"d": {"type": "array", "contains": {}}}, "$ref": "#/$defs/d"}, "contains",
     "#/$defs/d/contains"),
    ({"type": "object", "properties": {"a/b": {"type": "integer", "bogus": 1}}}, "bogus",
     "#/properties/a~1b/bogus"),
])
def test_schema_errors_name_keyword(schema, keyword, path):
    with pytest.raises(SchemaError) as ei:
        json_schema_to_regex(schema)
    assert ei.value.keyword == keyword
    assert ei.value.path == path
    assert keyword in str(ei.value) and path in str(ei.value)


def test_descriptive_keywords_are_fine():
    s = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "x", "title": "T",
         "description": "d", "type": "object", "properties": {"a": {"type": "integer", "default": 1,
                                                                   "examples": [1], "x-foo": 2}},
         "required": ["a"]}
    assert re.fullmatch(json_schema_to_regex(s), '{"a":12}')


# ----------------------------------------------------------------------------
# cache
# ----------------------------------------------------------------------------


def test_constraint_cache():
    vocab, eos = synthetic_vocab(JSON_TOKENS)
    cache = ConstraintCache(capacity=2, max_workers=1)
    try:
        f1 = cache.submit("regex", "ab+", vocab, eos)
        f2 = cache.submit("regex", "ab+", vocab, eos)
        assert f1 is f2
        fsm = f1.result(timeout=30)
        assert isinstance(fsm, CompiledFSM)
        assert cache.peek("regex", "ab+", vocab, eos) is fsm
        schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
        j1 = cache.get("json", schema, vocab, eos)
        j2 = cache.get("json", json.dumps(schema), vocab, eos)  # same key for dict and text
        assert j1 is j2
        cache.get("choices", ["x", "y"], vocab, eos)  # evicts the regex (capacity 2)
        assert cache.peek("regex", "ab+", vocab, eos) is None
        assert len(cache) == 2
        bad = cache.submit("regex", "a(?=b)", vocab, eos)
        with pytest.raises(RegexError):
            bad.result(timeout=30)
        # failures are not cached: a new submission recompiles
        assert cache.submit("regex", "a(?=b)", vocab, eos) is not bad
        with pytest.raises(RegexError):
            cache.submit("regex", "a(?=b)", vocab, eos).result(timeout=30)
        assert len(cache) <= 2
        # a different tokenizer is a different key
        tv2 = TokenVocabulary(vocab + [b"zz"], eos)
        assert cache.get("json", schema, tv2) is not j1
        # options are part of the key
        assert cache.get("json", schema, vocab, eos, whitespace_pattern=" ?") is not j1
    finally:
        cache.shutdown()


# ----------------------------------------------------------------------------
# outlines-core reference (optional)
# ----------------------------------------------------------------------------


def _pair_bfs(ours, ref, eos_id, exact):
    todo = [(0, ref.get_initial_state())]
    seen = set(todo)
    while todo:
        s, r = todo.pop()
        mine = set(allowed_tokens(ours, s).tolist())
        theirs = set(ref.get_allowed_tokens(r))
        if exact:
            assert mine == theirs, (s, mine, theirs)
        else:
            assert theirs <= mine, (s, mine, theirs)
        assert (eos_id in mine) == ref.is_final_state(r)
        for t in sorted(theirs - {eos_id}):
            nxt = (advance(ours, s, t), ref.get_next_state(r, t))
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return len(seen)


def test_against_outlines_core():
    r"""Allowed-token sets agree with outlines-core on regexes where its semantics match.

    outlines-core 0.2.14 omits some valid tokens, e.g. for ``(ab|c)*`` it does not
    allow ``a`` in the initial state, and for ``-?[12]+(\.[12]+)?`` it does not allow
    ``1.``; for such regexes we only check that its sets are subsets of ours (our
    sets are verified exactly by the brute-force tests above)."""
    import outlines_core as oc
    tokens = ["a", "b", "c", "1", "2", "-", ".", "ab", "ba", "abc", "12", "1.", "-1", "cc", "bca"]
    eos_id = len(tokens)
    ocv = oc.Vocabulary(eos_id, {t: [i] for i, t in enumerate(tokens)})
    vocab = [t.encode() for t in tokens] + [None]
    for pat, exact in [(r"a[bc]{1,3}", True), (r"abc|ab|a", True), (r"[12]+", True),
                       (r"-?(1|2)\.[12]{2}", True), (r"a(b|c)*", True), (r"ab|c", True),
                       (r"(ab|c)*", False), (r"-?[12]+(\.[12]+)?", False),
                       (r"(a|b)*a(a|b)", False), (r"(abc|bca|cc)+", False)]:
        ours = compile_regex(pat, vocab, [eos_id])
        ref = oc.Index(pat, ocv)
        assert _pair_bfs(ours, ref, eos_id, exact) >= 1, pat


# ----------------------------------------------------------------------------
# real vocabulary (SmolLM2 GGUF)
# ----------------------------------------------------------------------------



def _gpt2_byte_decoder() -> dict:
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def load_gguf_vocab(path: str):
    import gguf
    reader = gguf.GGUFReader(path)
    f = reader.fields["tokenizer.ggml.tokens"]
    toks = [bytes(f.parts[i]).decode("utf-8") for i in f.data]
    tf = reader.fields.get("tokenizer.ggml.token_type")
    types = [int(tf.parts[i][0]) for i in tf.data] if tf is not None else [1] * len(toks)
    dec = _gpt2_byte_decoder()
    vocab = []
    for t, ty in zip(toks, types):
        if ty != 1:  # control / user-defined specials
            vocab.append(None)
            continue
        try:
            vocab.append(bytes(dec[c] for c in t))
        except KeyError:
            vocab.append(None)
    eos = int(reader.fields["tokenizer.ggml.eos_token_id"].parts[-1][0])
    return vocab, [eos]


TEN_FIELDS = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": -37, "maximum": 1234},
        "score": {"type": "number", "minimum": 0, "exclusiveMaximum": 100},
        "active": {"type": "boolean"},
        "email": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "color": {"enum": ["red", "green", "blue"]},
        "birthday": {"type": "string", "format": "date"},
        "nickname": {"type": ["string", "null"], "maxLength": 10},
        "pos": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                "required": ["x", "y"]},
    },
    "required": ["name", "age", "score", "active", "email", "tags", "color"],
}


@pytest.fixture(scope="module")
def smollm_vocab(smollm2_gguf):
    vocab, eos = load_gguf_vocab(smollm2_gguf)
    return vocab, eos, TokenVocabulary(vocab, eos)


def test_real_vocab_json_schema(smollm_vocab):
    vocab, eos, tv = smollm_vocab
    assert len(vocab) > 40000
    fsm = compile_json_schema(TEN_FIELDS, tv)  # its compile time is measured in bench/bench_structured.py
    assert fsm.mask.shape == (fsm.num_states, (len(vocab) + 31) // 32)
    rng = random.Random(42)
    for _ in range(12):
        out = random_walk(fsm, vocab, eos, rng, uniform_steps=rng.randint(0, 60))
        _validate(TEN_FIELDS, out.decode("utf-8"))
    # brute force on a sample of states x tokens
    sample_tokens = rng.sample(range(len(vocab)), 600) + eos
    states = rng.sample(range(fsm.num_states), min(25, fsm.num_states)) + [0]
    check_masks_brute_force(fsm, vocab, eos, states=states, tokens=sample_tokens)
    assert fsm.forced[0] == b'{"name":"'


def test_real_vocab_regex_and_choices(smollm_vocab):
    vocab, eos, tv = smollm_vocab
    ipv4 = r"((25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
    fsm = compile_regex(ipv4, tv)
    rng = random.Random(1)
    for _ in range(20):
        out = random_walk(fsm, vocab, eos, rng, uniform_steps=rng.randint(0, 10)).decode()
        assert re.fullmatch(ipv4, out)
    choices = [f"option {i}: {w}" for i, w in enumerate(["alpha", "beta", "中文", "é"] * 10)]
    fsm = compile_choices(choices, tv)
    for _ in range(20):
        out = random_walk(fsm, vocab, eos, rng, uniform_steps=rng.randint(0, 10)).decode()
        assert out in choices
