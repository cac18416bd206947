"""Token-level FSMs for structured generation (host code, numpy only).

A :class:`CompiledFSM` is the product of a minimal UTF-8 byte DFA (see
:mod:`.regex`) and a model vocabulary.  Its states are the byte-DFA states
(initial state 0).  A token is allowed in state ``s`` iff walking its bytes from
``s`` stays inside the DFA *and* ends in a state from which an accepting state
is reachable by some sequence of tokens of this vocabulary (so a masked
decode can never get stuck).  EOS tokens are allowed exactly in accepting
states; taking EOS keeps the FSM in the same state (``next_state[s, 1] == s``).

Token classes: ``token_class[t]`` groups tokens with identical transitions from
every state.  Class 0 = never allowed (special tokens, empty tokens, tokens
that never fit); class 1 = the EOS tokens; classes >= 2 = the rest.

Tokens are ``bytes`` (the bytes the token contributes to the output, after
byte-fallback/GPT-2 byte decoding) or ``None`` for special tokens, which are
never allowed.  Empty tokens are never allowed either.

Token budget: ``dist[s]`` is the fewest tokens (EOS not counted) that take
``s`` to an accepting state (0 for accepting states, :data:`DIST_UNREACHABLE`
for states that cannot reach one).  With ``r`` new tokens left (counting the one
being sampled), a token is kept only if its next state ``n`` has
``dist[n] <= r - 1``, so an output cut by max_new_tokens still ends in an
accepting state; ``dist[initial_state] > max_new_tokens`` means no valid output
fits.  The rule is applied on the device, see sgl_jax/runner.py.
"""
from __future__ import annotations

import bisect
import hashlib
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from .json_schema import DEFAULT_MAX_RECURSION_DEPTH, choices_to_regex, json_schema_to_regex
from .regex import (DEFAULT_MAX_SECONDS, DEFAULT_MAX_STATES, Budget, ByteDFA, ConstraintError,
                    ConstraintTooLargeError, _mix64, regex_to_byte_dfa)

__all__ = [
    "TokenVocabulary",
    "CompiledFSM",
    "build_token_fsm",
    "compile_regex",
    "compile_json_schema",
    "compile_choices",
    "allowed_tokens",
    "advance",
    "advance_bytes",
    "may_extend",
    "ConstraintCache",
    "NEVER_CLASS",
    "EOS_CLASS",
    "DIST_UNREACHABLE",
]

NEVER_CLASS = 0
EOS_CLASS = 1
DIST_UNREACHABLE = 1 << 30  # dist of a state from which no accepting state is reachable (int32-safe)


class TokenVocabulary:
    """Preprocessed vocabulary (build once per tokenizer and reuse).

    ``vocab[i]`` is the byte string of token ``i`` or ``None`` (special token).
    """

    def __init__(self, vocab: Sequence[Optional[bytes]], eos_token_ids: Iterable[int]):
        V = len(vocab)
        eos = sorted({int(e) for e in eos_token_ids})
        for e in eos:
            if not 0 <= e < V:
                raise ValueError(f"eos token id {e} outside the vocabulary (size {V})")
        self.vocab_size = V
        self.eos_token_ids = tuple(eos)
        eos_set = set(eos)
        lens = np.zeros(V, dtype=np.int64)
        chunks = []
        h = hashlib.sha256()
        h.update(f"V={V};eos={eos};".encode())
        for i, tok in enumerate(vocab):
            if tok is None:
                h.update(b"\x00")
                continue
            if not isinstance(tok, (bytes, bytearray)):
                raise TypeError(f"vocab[{i}] must be bytes or None, got {type(tok).__name__}")
            tok = bytes(tok)
            h.update(b"\x01" + len(tok).to_bytes(4, "little") + tok)
            if i in eos_set or not tok:
                continue
            lens[i] = len(tok)
            chunks.append(tok)
        self.fingerprint = h.hexdigest()
        self.lens = lens  # 0 = never allowed (special / empty / eos)
        self.valid = lens > 0
        self.offsets = np.zeros(V, dtype=np.int64)
        self.offsets[self.valid] = np.concatenate([[0], np.cumsum(lens[self.valid])[:-1]])
        self.flat = np.frombuffer(b"".join(chunks), dtype=np.uint8) if chunks else np.zeros(0, np.uint8)
        valid_ids = np.nonzero(self.valid)[0]
        first = self.flat[self.offsets[valid_ids]] if len(valid_ids) else np.zeros(0, np.uint8)
        self.first_byte = np.zeros(V, dtype=np.int64)
        self.first_byte[valid_ids] = first
        order = np.argsort(first, kind="stable")
        self.by_first_byte = valid_ids[order]
        self.fb_count = np.bincount(first, minlength=256).astype(np.int64)
        self.fb_start = np.concatenate([[0], np.cumsum(self.fb_count)[:-1]]).astype(np.int64)
        self.max_len = int(lens.max()) if V else 0
        # token_bits[t]: the set of bytes occurring in token t (256 bits as 4 uint64 words)
        self.token_bits = np.zeros((V, 4), dtype=np.uint64)
        if len(valid_ids):
            fl = self.flat.astype(np.uint64)
            starts = self.offsets[valid_ids]
            for w in range(4):
                inword = (fl >> np.uint64(6)) == np.uint64(w)
                bits = np.where(inword, np.uint64(1) << (fl & np.uint64(63)), np.uint64(0))
                self.token_bits[valid_ids, w] = np.bitwise_or.reduceat(bits, starts)
        self._sorted = None  # (sorted token bytes, their ids), built by extensions()

    def __len__(self) -> int:
        return self.vocab_size

    def extensions(self, t: int) -> np.ndarray:
        """Ids of the tokens whose bytes strictly extend token ``t``'s bytes (empty for special tokens).

        Tokens sharing a prefix are contiguous in byte-lexicographic order, so this is two bisections over
        an index built on first use.
        """
        if not self.valid[t]:
            return np.zeros(0, dtype=np.int64)
        if self._sorted is None:
            ids = np.nonzero(self.valid)[0]
            keyed = sorted((self.token_bytes(int(i)), int(i)) for i in ids)
            self._sorted = ([k for k, _ in keyed], np.array([i for _, i in keyed], dtype=np.int64))
        keys, order = self._sorted
        b = self.token_bytes(t)
        lo = bisect.bisect_right(keys, b)  # strictly longer strings with prefix b sort after b itself
        stripped = b.rstrip(b"\xff")
        if not stripped:
            hi = len(keys)
        else:
            hi = bisect.bisect_left(keys, stripped[:-1] + bytes([stripped[-1] + 1]))
        return order[lo:hi]

    def token_bytes(self, t: int) -> Optional[bytes]:
        if not self.valid[t]:
            return None
        o = int(self.offsets[t])
        return self.flat[o:o + int(self.lens[t])].tobytes()


VocabLike = Union[TokenVocabulary, Sequence[Optional[bytes]]]


def _as_vocab(vocab: VocabLike, eos_token_ids) -> TokenVocabulary:
    if isinstance(vocab, TokenVocabulary):
        if eos_token_ids is not None and tuple(sorted(set(int(e) for e in eos_token_ids))) != vocab.eos_token_ids:
            raise ValueError("eos_token_ids differ from the ones of the TokenVocabulary")
        return vocab
    if eos_token_ids is None:
        raise ValueError("eos_token_ids is required when vocab is a list")
    return TokenVocabulary(vocab, eos_token_ids)


@dataclass(frozen=True, eq=False)
class CompiledFSM:
    """Token-level FSM.  All arrays are read-only.

    mask        int32 [num_states, ceil(V/32)]: bit j of word w <-> token 32*w+j
                (uint32 bit pattern stored as int32); EOS bits set iff accepting.
    token_class int32 [V]; next_state int32 [num_states, num_classes] (-1 = not
                allowed); column EOS_CLASS maps accepting states to themselves.
    accepting   bool [num_states]; initial_state is 0.
    forced      forced[s] = maximal byte string forced from s (byte-DFA chain of
                non-accepting states with a single outgoing byte).
    byte_next   int32 [num_states, 256] the byte DFA (-1 = dead), for replaying
                raw bytes (jump-forward).
    dist        int32 [num_states] fewest tokens from the state to an accepting
                state (0 = accepting; EOS not counted; DIST_UNREACHABLE = never).
    """
    mask: np.ndarray
    token_class: np.ndarray
    next_state: np.ndarray
    accepting: np.ndarray
    initial_state: int
    forced: tuple
    byte_next: np.ndarray
    vocab_size: int
    eos_token_ids: tuple
    dist: np.ndarray

    @property
    def min_tokens(self) -> int:
        """Fewest tokens of a complete output (``dist`` of the initial state; EOS not counted)."""
        return int(self.dist[self.initial_state])

    @property
    def num_states(self) -> int:
        return int(self.next_state.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.next_state.shape[1])


def allowed_tokens(fsm: CompiledFSM, state: int) -> np.ndarray:
    """Sorted token ids allowed in ``state`` (EOS included iff accepting)."""
    return np.nonzero(fsm.next_state[state, fsm.token_class] >= 0)[0]


def advance(fsm: CompiledFSM, state: int, token: int) -> int:
    """Next state after ``token`` (-1 if the token is not allowed)."""
    if state < 0:
        return -1
    return int(fsm.next_state[state, fsm.token_class[token]])


def may_extend(fsm: CompiledFSM, tv: TokenVocabulary, state: int, token: int) -> bool:
    """Whether some token allowed in ``state`` strictly extends ``token``'s bytes.

    Jump-forward uses this at the end of a forced run: if no allowed token is longer than the run's last
    token from the same position, the model could not have spanned that boundary with one token either,
    so the last token is kept instead of being held back for the model to re-sample.
    """
    ext = tv.extensions(token)
    if state < 0 or not len(ext):
        return False
    return bool((fsm.next_state[state, fsm.token_class[ext]] >= 0).any())


def advance_bytes(fsm: CompiledFSM, state: int, data: bytes) -> int:
    """Walk raw bytes through the byte DFA (-1 if they leave it)."""
    t = fsm.byte_next
    for b in data:
        if state < 0:
            return -1
        state = int(t[state, b])
    return state


_BROAD = 24  # states whose dominant target is reached by at least this many bytes
_BROAD_TOKENS = 512  # ... and by the first byte of at least this many tokens


def _token_walk(trans: np.ndarray, tv: TokenVocabulary, budget: Optional[Budget]):
    """All (origin state, token, end state) with the token's bytes staying in the DFA.

    Fast path for "broad" states (e.g. inside a JSON string): let ``B(s)`` be the
    bytes leading from ``s`` to its dominant target ``d(s)``.  Following
    ``c_0 = s, c_{i+1} = d(c_i)``, a token of length ``L`` whose byte set lies in
    ``B(c_0) & ... & B(c_{L-1})`` goes to ``c_L``.  Only the other tokens are
    walked byte by byte (vectorized over all (state, token) pairs).

    A hot loop kept in one piece (kernel-like): splitting it would cost per-token calls.
    """
    S = trans.shape[0]
    okb = trans >= 0
    # dominant target per state and the bytes leading to it
    tgt = np.where(okb, trans, S).astype(np.int64)
    srt = np.sort(tgt, axis=1)
    idx = np.arange(256)
    change = np.ones((S, 256), dtype=bool)
    change[:, 1:] = srt[:, 1:] != srt[:, :-1]
    run = idx - np.maximum.accumulate(np.where(change, idx, 0), axis=1) + 1
    run[srt == S] = 0  # dead transitions do not count
    j = run.argmax(axis=1)
    dom = srt[np.arange(S), j]
    dom_n = run[np.arange(S), j]
    dom = np.where(dom_n > 0, dom, 0)  # states without transitions are never broad
    weights = np.uint64(1) << (np.arange(256, dtype=np.uint64) & np.uint64(63))
    to_dom = trans == dom[:, None]
    # broad: many bytes *and* many tokens start with a byte leading to the dominant target
    broad = (dom_n >= _BROAD) & ((to_dom.astype(np.int64) @ tv.fb_count) >= _BROAD_TOKENS)
    bw = np.where(to_dom, weights[None, :], np.uint64(0))
    bwords = np.stack([np.bitwise_or.reduce(bw[:, 64 * w:64 * w + 64], axis=1) for w in range(4)],
                      axis=1)  # [S, 4]
    bwords[~broad] = 0
    # chains c_i and running intersections of the dominant byte sets, for all broad states
    ML = tv.max_len
    bstates = np.nonzero(broad)[0]
    nb = len(bstates)
    inter = np.zeros((nb, ML + 1, 4), dtype=np.uint64)
    chain = np.full((nb, ML + 1), -1, dtype=np.int64)
    if nb:
        c = bstates.astype(np.int64)
        chain[:, 0] = c
        cur_w = np.full((nb, 4), ~np.uint64(0), dtype=np.uint64)
        for i in range(1, ML + 1):
            cur_w = cur_w & bwords[c]
            if not cur_w.any():
                break
            c = dom[c]
            inter[:, i] = cur_w
            chain[:, i] = c
    res_o: list = []
    res_t: list = []
    res_d: list = []
    f_o: list = []
    f_t: list = []
    f_c: list = []
    # narrow states: expand (state, first byte) pairs into the tokens with that first byte
    ps, pb = np.nonzero(okb & ~broad[:, None])
    counts = tv.fb_count[pb]
    keep = counts > 0
    ps, pb, counts = ps[keep], pb[keep], counts[keep]
    total = int(counts.sum())
    if total:
        f_o.append(np.repeat(ps.astype(np.int64), counts))
        f_c.append(np.repeat(trans[ps, pb].astype(np.int64), counts))
        within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
        f_t.append(tv.by_first_byte[np.repeat(tv.fb_start[pb], counts) + within])
    # broad states
    for k, st in enumerate(bstates):
        if budget is not None:
            budget.check_time("token walk")
        fast = tv.valid & ~np.any(tv.token_bits & ~inter[k][tv.lens], axis=1)
        ft = np.nonzero(fast)[0]
        res_o.append(np.full(len(ft), st, dtype=np.int64))
        res_t.append(ft)
        res_d.append(chain[k][tv.lens[ft]])
        cand = np.nonzero(tv.valid & okb[st][tv.first_byte] & ~fast)[0]
        f_o.append(np.full(len(cand), st, dtype=np.int64))
        f_t.append(cand)
        f_c.append(trans[st, tv.first_byte[cand]].astype(np.int64))
    if f_t:
        origin, tok, cur = np.concatenate(f_o), np.concatenate(f_t), np.concatenate(f_c)
    else:
        origin = tok = cur = np.zeros(0, dtype=np.int64)
    rem = tv.lens[tok] - 1  # bytes still to consume
    j = 1
    while len(tok):
        if budget is not None:
            budget.check_time("token walk")
        done = rem == 0
        if done.any():
            res_o.append(origin[done])
            res_t.append(tok[done])
            res_d.append(cur[done])
            alive = ~done
            tok, origin, cur, rem = tok[alive], origin[alive], cur[alive], rem[alive]
            if not len(tok):
                break
        nxt = trans[cur, tv.flat[tv.offsets[tok] + j]]
        ok = nxt >= 0
        tok, origin, rem = tok[ok], origin[ok], rem[ok] - 1
        cur = nxt[ok].astype(np.int64)
        j += 1
    if not res_o:
        z = np.zeros(0, dtype=np.int64)
        return z, z, z
    return np.concatenate(res_o), np.concatenate(res_t), np.concatenate(res_d)


def _co_reachable(S: int, origin: np.ndarray, dest: np.ndarray, accepting: np.ndarray) -> np.ndarray:
    """States from which an accepting state is reachable along the given edges."""
    key = np.unique(origin * S + dest)
    src, dst = key // S, key % S
    order = np.argsort(dst, kind="stable")
    src = src[order]
    indptr = np.searchsorted(dst[order], np.arange(S + 1))
    live = accepting.copy()
    stack = list(np.nonzero(live)[0])
    while stack:
        s = stack.pop()
        preds = src[indptr[s]:indptr[s + 1]]
        new = preds[~live[preds]]
        if len(new):
            new = np.unique(new)
            live[new] = True
            stack.extend(new.tolist())
    return live


def _classes(V: int, S: int, tok: np.ndarray, origin: np.ndarray, dest: np.ndarray,
             eos_ids: tuple):
    """Exact token classes.  Returns (token_class [V], next_state [S, C]).

    Tokens are grouped by a 96-bit hash of their (origin, dest) pair set plus the
    pair count; the grouping is then verified exactly (every pair of every token
    must agree with its class representative), with an exact slow path in the
    (astronomically unlikely) case of a collision."""
    token_class = np.zeros(V, dtype=np.int64)
    cnt = np.bincount(tok, minlength=V)
    has = np.nonzero(cnt)[0]
    if len(has):
        v = origin.astype(np.uint64) * np.uint64(S + 1) + dest.astype(np.uint64) + np.uint64(1)
        m1 = _mix64(v, 0x9E3779B97F4A7C15)
        m2 = _mix64(v, 0x632BE59BD9B4E019)
        lo32 = np.uint64(0xFFFFFFFF)
        cols = [np.bincount(tok, weights=(m & lo32).astype(np.float64), minlength=V)
                for m in (m1, m1 >> np.uint64(32), m2)]  # exact: < S * 2**32 < 2**53
        keys = np.stack([c[has].astype(np.uint64) for c in cols]
                        + [cnt[has].astype(np.uint64)], axis=1)
        _, first_idx, inv = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        inv = inv.reshape(-1)
        n_cls = len(first_idx)
        rank = np.empty(n_cls, dtype=np.int64)
        rank[np.argsort(has[first_idx], kind="stable")] = np.arange(n_cls)
        token_class[has] = rank[inv] + 2
        is_rep = np.zeros(V, dtype=bool)
        is_rep[has[first_idx]] = True
        next_state = np.full((S, n_cls + 2), -1, dtype=np.int32)
        sel = is_rep[tok]
        next_state[origin[sel], token_class[tok[sel]]] = dest[sel]
        if not np.array_equal(next_state[origin, token_class[tok]], dest):
            # hash collision: exact grouping
            order = np.lexsort((origin, tok))
            t_s, o_s, d_s = tok[order], origin[order], dest[order]
            starts = np.searchsorted(t_s, has)
            groups: dict = {}
            reps = []
            for t, a, c in zip(has.tolist(), starts.tolist(), cnt[has].tolist()):
                k = (o_s[a:a + c].tobytes(), d_s[a:a + c].tobytes())
                g = groups.get(k)
                if g is None:
                    g = groups[k] = len(groups)
                    reps.append(t)
                token_class[t] = g + 2
            next_state = np.full((S, len(groups) + 2), -1, dtype=np.int32)
            sel = np.zeros(V, dtype=bool)
            sel[reps] = True
            sel = sel[tok]
            next_state[origin[sel], token_class[tok[sel]]] = dest[sel]
    else:
        next_state = np.full((S, 2), -1, dtype=np.int32)
    token_class[list(eos_ids)] = EOS_CLASS
    return token_class.astype(np.int32), next_state


def _dist_to_accept(next_state: np.ndarray, accepting: np.ndarray) -> np.ndarray:
    """Fewest tokens from each state to an accepting one: BFS backwards from the accepting states over
    the token transitions (every class but NEVER and EOS; EOS only loops on accepting states)."""
    S = next_state.shape[0]
    ns = next_state[:, EOS_CLASS + 1:]
    src, col = np.nonzero(ns >= 0)
    dst = ns[src, col].astype(np.int64)
    key = np.unique(src.astype(np.int64) * S + dst)  # distinct (origin, dest) edges
    src, dst = key // S, key % S
    order = np.argsort(dst, kind="stable")
    src = src[order]
    indptr = np.searchsorted(dst[order], np.arange(S + 1))  # predecessors of s: src[indptr[s]:indptr[s+1]]
    dist = np.full(S, DIST_UNREACHABLE, dtype=np.int32)
    frontier = np.nonzero(accepting)[0]
    dist[frontier] = 0
    d = 0
    while len(frontier):
        d += 1
        starts, counts = indptr[frontier], indptr[frontier + 1] - indptr[frontier]
        total = int(counts.sum())
        if not total:
            break
        idx = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts) + np.repeat(starts, counts)
        preds = src[idx]
        frontier = np.unique(preds[dist[preds] == DIST_UNREACHABLE])
        dist[frontier] = d
    return dist


def _forced(trans: np.ndarray, accepting: np.ndarray) -> tuple:
    S = trans.shape[0]
    ok = trans >= 0
    deg = ok.sum(axis=1)
    single = (deg == 1) & ~accepting
    nb = np.argmax(ok, axis=1)
    out: list = [None] * S
    for s0 in range(S):
        if out[s0] is not None:
            continue
        chain = []
        s = s0
        seen = set()
        while out[s] is None and single[s] and s not in seen:
            seen.add(s)
            chain.append(s)
            s = int(trans[s, nb[s]])
        tail = out[s] if out[s] is not None else b""
        if out[s] is None and s not in seen:
            out[s] = b""  # branching/accepting state: nothing forced
            tail = b""
        for c in reversed(chain):
            tail = bytes([int(nb[c])]) + tail
            out[c] = tail
    return tuple(out)


def _ro(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


def build_token_fsm(bdfa: ByteDFA, vocab: VocabLike, eos_token_ids=None, *,
                    budget: Optional[Budget] = None) -> CompiledFSM:
    """Product of a byte DFA (initial state 0) and a vocabulary."""
    tv = _as_vocab(vocab, eos_token_ids)
    trans = np.ascontiguousarray(bdfa.trans, dtype=np.int32)
    accepting = np.asarray(bdfa.accepting, dtype=bool)
    S = trans.shape[0]
    V = tv.vocab_size
    if S >= 1 << 20:
        raise ConstraintTooLargeError(f"byte DFA with {S} states is too large for a token FSM")
    origin, tok, dest = _token_walk(trans, tv, budget)
    live = _co_reachable(S, origin, dest, accepting)
    if not live[0]:
        raise ConstraintError("the constraint cannot be satisfied with this vocabulary "
                              "(no token sequence reaches an accepting state)")
    keep = live[dest]
    origin, tok, dest = origin[keep], tok[keep], dest[keep]
    if budget is not None:
        budget.check_time("token classes")
    token_class, next_state = _classes(V, S, tok, origin, dest, tv.eos_token_ids)
    acc_idx = np.nonzero(accepting)[0]
    next_state[acc_idx, EOS_CLASS] = acc_idx
    # packed mask: states with the same allowed classes share a row, so only distinct rows are expanded to
    # the vocabulary and packed (a 10-field JSON schema: 1,935 states, 290 distinct rows), in chunks of
    # rows to bound memory
    W = (V + 31) // 32
    allowed_cls = next_state >= 0
    key = np.ascontiguousarray(np.packbits(allowed_cls, axis=1))  # >= 1 byte: classes 0 and 1 always exist
    key = key.view(np.dtype((np.void, key.shape[1]))).ravel()
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    distinct = allowed_cls[first]
    umask = np.zeros((len(first), W), dtype=np.int32)
    chunk = max(1, (1 << 24) // max(V, 1))
    pad = W * 32 - V
    for a in range(0, len(first), chunk):
        al = distinct[a:a + chunk][:, token_class]
        if pad:
            al = np.concatenate([al, np.zeros((al.shape[0], pad), dtype=bool)], axis=1)
        packed = np.packbits(al, axis=1, bitorder="little")
        umask[a:a + chunk] = np.ascontiguousarray(packed).view("<u4").astype(np.uint32).view(np.int32)
    mask = umask[inverse.ravel()]
    forced = _forced(trans, accepting)
    dist = _dist_to_accept(next_state, accepting)
    return CompiledFSM(mask=_ro(mask), token_class=_ro(token_class), next_state=_ro(next_state),
                       accepting=_ro(accepting.copy()), initial_state=0, forced=forced,
                       byte_next=_ro(trans.copy()), vocab_size=V,
                       eos_token_ids=tv.eos_token_ids, dist=_ro(dist))


# ----------------------------------------------------------------------------
# public compile functions
# ----------------------------------------------------------------------------


def _short(s: str, n: int = 60) -> str:
    return s if len(s) <= n else s[:n] + "..."


def compile_regex(pattern: str, vocab: VocabLike, eos_token_ids=None, *,
                  max_states: int = DEFAULT_MAX_STATES,
                  max_seconds: float = DEFAULT_MAX_SECONDS) -> CompiledFSM:
    budget = Budget(max_states, max_seconds, f"regex {_short(pattern)!r}")
    tv = _as_vocab(vocab, eos_token_ids)
    bdfa = regex_to_byte_dfa(pattern, budget=budget)
    return build_token_fsm(bdfa, tv, budget=budget)


def compile_json_schema(schema, vocab: VocabLike, eos_token_ids=None, *,
                        whitespace_pattern: Optional[str] = None,
                        max_recursion_depth: int = DEFAULT_MAX_RECURSION_DEPTH,
                        max_states: int = DEFAULT_MAX_STATES,
                        max_seconds: float = DEFAULT_MAX_SECONDS) -> CompiledFSM:
    pattern = json_schema_to_regex(schema, whitespace_pattern=whitespace_pattern,
                                   max_recursion_depth=max_recursion_depth)
    budget = Budget(max_states, max_seconds, "JSON schema")
    tv = _as_vocab(vocab, eos_token_ids)
    bdfa = regex_to_byte_dfa(pattern, budget=budget)
    return build_token_fsm(bdfa, tv, budget=budget)


def compile_choices(choices, vocab: VocabLike, eos_token_ids=None, *,
                    max_states: int = DEFAULT_MAX_STATES,
                    max_seconds: float = DEFAULT_MAX_SECONDS) -> CompiledFSM:
    return compile_regex(choices_to_regex(choices), vocab, eos_token_ids,
                         max_states=max_states, max_seconds=max_seconds)


# ----------------------------------------------------------------------------
# cache
# ----------------------------------------------------------------------------

_KINDS = ("regex", "json", "choices")


def _normalize_spec(kind: str, spec):
    import json as _json
    if kind == "regex":
        if not isinstance(spec, str):
            raise TypeError("regex spec must be a str")
        return spec
    if kind == "json":
        if isinstance(spec, (str, bytes)):
            spec = _json.loads(spec)
        return _json.dumps(spec, separators=(",", ":"), ensure_ascii=False)  # keeps key order
    if kind == "choices":
        return tuple(spec)
    raise ValueError(f"unknown constraint kind {kind!r}; expected one of {_KINDS}")


class ConstraintCache:
    """Thread-safe LRU cache of compiled FSMs keyed by
    (kind, normalized spec, options, tokenizer fingerprint).

    ``submit`` compiles in a background thread pool and returns a
    ``concurrent.futures.Future``; concurrent requests for the same key share one
    future.  Failed compilations are not cached (the future still carries the
    exception).  ``kind`` is ``"regex"``, ``"json"`` (schema dict or JSON text;
    options whitespace_pattern / max_recursion_depth) or ``"choices"``; all kinds
    accept max_states / max_seconds.
    """

    def __init__(self, capacity: int = 256, max_workers: int = 2):
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self._lock = threading.Lock()
        self._entries: "OrderedDict[tuple, Future]" = OrderedDict()
        self._pool = ThreadPoolExecutor(max_workers=max_workers,
                                        thread_name_prefix="sgl-jax-constrained")
        self._vocabs: "OrderedDict[int, tuple]" = OrderedDict()  # id -> (vocab obj, eos, TokenVocabulary)
        self.hits = 0
        self.misses = 0

    def vocabulary(self, vocab: VocabLike, eos_token_ids=None) -> TokenVocabulary:
        """TokenVocabulary for ``vocab`` (memoized by object identity; do not mutate it)."""
        if isinstance(vocab, TokenVocabulary):
            return _as_vocab(vocab, eos_token_ids)
        eos = tuple(sorted(set(int(e) for e in (eos_token_ids or ()))))
        with self._lock:
            hit = self._vocabs.get(id(vocab))
            if hit is not None and hit[0] is vocab and hit[1] == eos:
                return hit[2]
        tv = _as_vocab(vocab, eos_token_ids)
        with self._lock:
            self._vocabs[id(vocab)] = (vocab, eos, tv)
            while len(self._vocabs) > 4:
                self._vocabs.popitem(last=False)
        return tv

    def _key(self, kind, spec, tv: TokenVocabulary, opts: dict) -> tuple:
        return (kind, _normalize_spec(kind, spec), tuple(sorted(opts.items())), tv.fingerprint)

    @staticmethod
    def _compile(kind, spec, tv, opts) -> CompiledFSM:
        if kind == "regex":
            return compile_regex(spec, tv, **opts)
        if kind == "json":
            return compile_json_schema(spec, tv, **opts)
        return compile_choices(list(spec), tv, **opts)

    def _lookup_or_create(self, kind, spec, vocab, eos_token_ids, opts, run_inline: bool):
        tv = self.vocabulary(vocab, eos_token_ids)
        key = self._key(kind, spec, tv, opts)
        with self._lock:
            fut = self._entries.get(key)
            if fut is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return fut, None
            self.misses += 1
            fut = Future()
            self._entries[key] = fut
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

        def job():
            if not fut.set_running_or_notify_cancel():
                return
            try:
                res = self._compile(kind, spec, tv, opts)
            except BaseException as e:  # noqa: BLE001 - delivered through the future
                with self._lock:
                    if self._entries.get(key) is fut:
                        del self._entries[key]
                fut.set_exception(e)
            else:
                fut.set_result(res)
        return fut, job

    def submit(self, kind: str, spec, vocab: VocabLike, eos_token_ids=None, **opts) -> Future:
        """Compile in the background; returns a Future[CompiledFSM]."""
        fut, job = self._lookup_or_create(kind, spec, vocab, eos_token_ids, opts, False)
        if job is not None:
            self._pool.submit(job)
        return fut

    def get(self, kind: str, spec, vocab: VocabLike, eos_token_ids=None, **opts) -> CompiledFSM:
        """Compile synchronously in the calling thread (or reuse the cached result)."""
        fut, job = self._lookup_or_create(kind, spec, vocab, eos_token_ids, opts, True)
        if job is not None:
            job()
        return fut.result()

    def peek(self, kind: str, spec, vocab: VocabLike, eos_token_ids=None, **opts) -> Optional[CompiledFSM]:
        """The cached FSM if it is already compiled, else None (never compiles)."""
        tv = self.vocabulary(vocab, eos_token_ids)
        key = self._key(kind, spec, tv, opts)
        with self._lock:
            fut = self._entries.get(key)
        if fut is not None and fut.done() and fut.exception() is None:
            return fut.result()
        return None

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def shutdown(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait)
