"""Structured generation in the engine: compile, place on the device, advance, jump forward. Host code.

`ConstraintManager` owns everything about a request's constraint (regex, JSON schema, choices, EBNF):
 - `check(sp)` (caller's thread, from RequestPreparer): syntax and unsupported keywords; EBNF builds
   the llguidance backend on first use (never on the server's event loop).
 - `submit(req)` (engine thread): regex / json / choices start compiling in the compile pool (an LRU
   cache shares results); EBNF gets an llguidance matcher. Returns True when the request can be
   admitted now, False when it waits in `pending` for its FSM and a table slot.
 - `poll()` (engine thread): pending requests whose FSM is ready get a table placement (uploaded to
   the device if new) and are returned for admission, or with the error that failed them.
 - `row(req, samples)`: the sampling row's (fsm_state, fsm_slot, host_mask).
 - `on_sampled(req, tok, next_state)`: advance with a sampled token; returns a finish reason when the
   constraint ends the request (its EOS; a grammar error or stop).
 - `plan_jump(req)`: the forced continuation to append (jump-forward), as (tokens to take back,
   tokens to append, their FSM states); the caller appends them through the output path, so stops and
   penalties see forced tokens like sampled ones.
 - `release(req)`: drop the request's table reference (on finish or abort).
The device table itself is the runner's; this manager only decides what goes where.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
from typing import Any

from sgl_jax.errors import InvalidRequestError, UnsupportedFeatureError


@dataclasses.dataclass(eq=False)
class ConstraintState:
    kind: str
    spec: Any
    future: Any = None  # compile future (regex / json / choices)
    place: Any = None  # constrained.table.Placement while on the device
    hist: list = dataclasses.field(default_factory=list)  # local FSM state after each output token
    matcher: Any = None  # llguidance matcher (ebnf)
    mask_future: Any = None  # the matcher's next mask row, computed off the engine thread


@dataclasses.dataclass
class Jump:
    take_back: int  # output tokens to remove first (re-tokenized together with the forced text)
    tokens: list[int]
    states: list[int]  # FSM state after each token (empty for grammar jumps)


class ConstraintManager:
    def __init__(self, config, tokenizer, vocab_size: int, runner_upload):
        from sgl_jax.constrained import ConstraintCache
        from sgl_jax.constrained.table import ConstraintTable

        self.config = config.constraints
        self.page_size = config.cache.page_size
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.upload = runner_upload  # upload(placement): copy a placed FSM's rows to the device
        self.cache = ConstraintCache(capacity=256, max_workers=1)
        c = self.config
        self.table = ConstraintTable(c.constraint_rows, c.constraint_classes, c.constraint_slots)
        self.pending: list = []  # requests waiting for their FSM / a table slot
        self._vocab = None
        self._grammar = None
        self._mask_pool = None
        self._lock = threading.Lock()  # vocabulary / grammar backend are built lazily from any thread

    # ------------------------------------------------------------------------- validation
    def vocabulary(self):
        with self._lock:
            if self._vocab is None:
                from sgl_jax.constrained import TokenVocabulary

                self._vocab = TokenVocabulary(self.tokenizer.token_bytes_list(),
                                              sorted(self.tokenizer.stop_token_ids))
            return self._vocab

    def grammar_backend(self):
        with self._lock:
            if self._grammar is None:
                from sgl_jax.constrained import grammar

                if not grammar.available():
                    raise UnsupportedFeatureError("sampling param 'ebnf' needs the optional grammar backend: "
                                                  "pip install llguidance", field="ebnf")
                self._grammar = grammar.GrammarBackend(self.tokenizer, self.vocab_size)
            return self._grammar

    def opts(self, kind: str) -> dict:
        c = self.config
        opts = dict(max_states=c.max_constraint_states, max_seconds=c.max_constraint_seconds)
        if kind == "json" and c.json_whitespace:
            opts["whitespace_pattern"] = c.json_whitespace
        return opts

    def check(self, sp) -> None:
        """Validation in the caller's thread (never the engine thread or an event loop): syntax and
        unsupported keywords, then the FSM itself (compiled through the shared cache, which the engine loop
        then reuses) and whether a complete output fits in max_new_tokens. Raises InvalidRequestError."""
        from sgl_jax.constrained import ConstraintError
        from sgl_jax.constrained.regex import parse
        from sgl_jax.engine.prepare import constraint_of

        con = constraint_of(sp)
        if con is None:
            return
        kind, spec = con
        field = {"regex": "regex", "json": "json_schema", "choices": "choices", "ebnf": "ebnf"}[kind]
        try:
            if kind == "regex":
                parse(spec)
            elif kind == "choices":
                if not all(isinstance(c, str) and c for c in spec):
                    raise InvalidRequestError("'choices' must be a list of non-empty strings", field="choices")
            elif kind == "ebnf":
                from sgl_jax.constrained.grammar import GrammarError

                try:
                    self.grammar_backend().matcher(spec)
                except GrammarError as e:
                    raise InvalidRequestError(f"invalid ebnf: {e}", field="ebnf") from None
                return
            fsm = self.cache.get(kind, list(spec) if kind == "choices" else spec, self.vocabulary(),
                                 **self.opts(kind))
        except InvalidRequestError:
            raise
        except ConstraintError as e:
            raise InvalidRequestError(f"invalid {field}: {e}", field=field) from None
        except ValueError as e:  # unsatisfiable with this vocabulary, or too large
            raise InvalidRequestError(f"invalid {field}: {e}", field=field) from None
        if 0 < sp.max_new_tokens < fsm.min_tokens:  # 0 = prefill only: nothing is generated
            raise InvalidRequestError(f"max_new_tokens ({sp.max_new_tokens}) is too small for the {field} "
                                      f"constraint: its shortest complete output takes {fsm.min_tokens} tokens",
                                      field="max_new_tokens")
        try:
            self.table.check_fits(fsm)
        except ValueError as e:
            raise InvalidRequestError(f"{field} too large for this server: {e}", field=field) from None

    # ------------------------------------------------------------------------- admission
    def submit(self, req) -> bool:
        """Start the request's constraint; True if it can be admitted now (EBNF), False if pending."""
        kind, spec = req.data.prep.constraint
        cs = ConstraintState(kind, spec)
        req.data.cons = cs
        if kind == "ebnf":  # no finite table: llguidance computes mask rows on the host
            cs.matcher = self.grammar_backend().matcher(spec)
            self.prefetch_mask(req)
            return True
        cs.future = self.cache.submit(kind, list(spec) if kind == "choices" else spec, self.vocabulary(),
                                      **self.opts(kind))
        self.pending.append(req)
        return False

    def poll(self) -> list[tuple[Any, Exception | None]]:
        """Pending requests now ready: [(req, None)] to admit, [(req, error)] to fail."""
        from sgl_jax.constrained.table import ConstraintTableFullError

        ready = []
        for req in list(self.pending):
            cs: ConstraintState = req.data.cons
            if not cs.future.done():
                continue
            try:
                fsm = cs.future.result()
                place = self.table.acquire(id(fsm), fsm)
            except (ValueError, ConstraintTableFullError) as e:  # too large, unsatisfiable, table too small
                self.pending.remove(req)
                ready.append((req, e))
                continue
            if place is None:
                continue  # every resident constraint is in use: retry when one finishes
            self.pending.remove(req)
            cs.place, cs.hist = place, [fsm.initial_state]
            if not place.uploaded:
                try:
                    self.upload(place)
                except Exception as e:  # noqa: BLE001 - this request fails, the placement is dropped
                    self.release(req)
                    ready.append((req, e))
                    continue
            ready.append((req, None))
        return ready

    def drop_pending(self, rid: str):
        """Remove and return the pending request with this rid, or None."""
        for req in self.pending:
            if req.rid == rid:
                self.pending.remove(req)
                return req
        return None

    def release(self, req) -> None:
        cs: ConstraintState | None = req.data.cons
        if cs is not None and cs.place is not None:
            self.table.release(cs.place.key)
            cs.place = None

    # ------------------------------------------------------------------------- decoding
    def row(self, req, samples: bool):
        """(fsm_state global row, fsm_slot, host mask row) of the request's sampling row."""
        cs: ConstraintState | None = req.data.cons
        if cs is None:
            return -1, -1, None
        if cs.place is not None:
            return cs.place.base + cs.hist[-1], cs.place.slot, None
        if cs.matcher is not None and samples:
            return -1, -1, cs.mask_future.result()
        return -1, -1, None

    @staticmethod
    def budget(req) -> int:
        """New tokens left for the sampling row, the one being sampled included (the device keeps a
        constrained output completable within it)."""
        return req.max_new_tokens - len(req.output_ids)

    def on_sampled(self, req, tok: int, next_state: int) -> dict | None:
        """Advance with a sampled token; a finish reason if the constraint ends the request here."""
        cs: ConstraintState | None = req.data.cons
        if cs is None:
            return None
        if cs.place is not None:
            cs.hist.append(int(next_state) - cs.place.base)
            if tok in cs.place.fsm.eos_token_ids:
                return {"type": "stop", "matched": tok}  # the constraint is complete: EOS ends it (ignore_eos too)
            return None
        if cs.matcher is not None:
            m = cs.matcher
            m.consume_token(tok)
            if m.is_error():
                return {"type": "abort", "message": f"grammar: {m.get_error()}"}
            if m.is_stopped() and tok not in self.tokenizer.stop_token_ids:
                return {"type": "stop", "matched": tok, "grammar_end": True}
            if tok in self.tokenizer.stop_token_ids:
                return {"type": "stop", "matched": tok}
        return None

    def after_forced(self, req, states: list[int]) -> None:
        cs: ConstraintState = req.data.cons
        if cs.place is not None:
            cs.hist.extend(states)

    def take_back(self, req, k: int) -> None:
        cs: ConstraintState = req.data.cons
        if cs.place is not None and k:
            del cs.hist[len(cs.hist) - k:]

    def plan_jump(self, req) -> Jump | None:
        """The forced continuation after the request's last token, or None (see `_plan_fsm_jump`)."""
        if self.config.disable_jump_forward:
            return None
        cs: ConstraintState | None = req.data.cons
        if cs is None:
            return None
        if cs.place is not None:
            return self._plan_fsm_jump(req, cs)
        if cs.matcher is not None:
            ff = list(cs.matcher.compute_ff_tokens())[: req.max_new_tokens - len(req.output_ids)]
            if ff:
                cs.matcher.consume_tokens(ff)
                return Jump(0, ff, [])
        return None

    def _plan_fsm_jump(self, req, cs: ConstraintState) -> Jump | None:
        """The compressed FSM's forced continuation.

        The last few generated tokens and the forced bytes are re-tokenized together, so the text gets the
        tokenizer's own segmentation (not a byte-by-byte one the model never saw); the final token of that
        is held back only if some token allowed at its position is longer (it could merge with what
        follows: the model then re-samples it), otherwise the whole run is appended and the next sampled
        token starts exactly at the end of the run. Tokens the re-tokenization leaves unchanged are not
        taken back (they keep their KV, FSM state and logprob). Effect on the distribution: forced text is
        what the constraint allows anyway; only the tokenization of the boundary is the tokenizer's choice
        instead of the model's, and forced tokens carry no logprob.
        """
        from sgl_jax.constrained import advance, may_extend

        fsm = cs.place.fsm
        forced = fsm.forced[cs.hist[-1]]
        if not forced:
            return None
        out = req.output_ids
        # re-tokenize at most the last 2 tokens, never one whose KV sits in a shared (tree) page
        k = max(min(2, len(out), req.num_tokens - req.n_tree * self.page_size), 0)
        tb = self.tokenizer.token_bytes
        prev = b"".join(tb(t) for t in out[len(out) - k:]) if k > 0 else b""
        try:
            text = (prev + forced).decode("utf-8")
        except UnicodeDecodeError:
            return None  # the boundary is inside a character: let the model emit the next token
        keep = self.tokenizer.encode(text, add_special_tokens=False)
        start = cs.hist[len(cs.hist) - 1 - k]
        states, state = [], start
        for t in keep:
            state = advance(fsm, state, t)
            if state < 0:
                return None  # re-tokenization left the constraint's language: keep the sampled path
            states.append(state)
        if keep and may_extend(fsm, self.vocabulary(), states[-2] if len(keep) > 1 else start, keep[-1]):
            keep, states = keep[:-1], states[:-1]  # a longer allowed token could span the end of the run
        if sum(len(tb(t)) for t in keep) <= len(prev):
            return None  # nothing gained beyond what is already there
        if len(out) - k + len(keep) + int(fsm.dist[states[-1]]) > req.max_new_tokens:
            return None  # this tokenization of the run leaves no completion within budget: sample under the mask
        room = req.max_new_tokens - (len(out) - k)
        keep, states = keep[:room], states[:room]
        j = 0  # tokens the re-tokenization left unchanged are kept as they are
        while j < min(k, len(keep)) and keep[j] == out[len(out) - k + j]:
            j += 1
        if not keep[j:]:
            return None
        return Jump(k - j, keep[j:], states[j:])

    def prefetch_mask(self, req) -> None:
        """Start computing the grammar's next mask row in the worker thread (overlaps host work)."""
        if self._mask_pool is None:
            self._mask_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sgl_jax-grammar")
        cs: ConstraintState = req.data.cons
        cs.mask_future = self._mask_pool.submit(self._grammar.fill_mask, cs.matcher)

    def after_step(self, req) -> None:
        """Once a grammar request's tokens for this step are in, prefetch its next mask row."""
        cs: ConstraintState | None = req.data.cons
        if cs is not None and cs.matcher is not None:
            self.prefetch_mask(req)

    def shutdown(self) -> None:
        self.cache.shutdown(wait=False)
        if self._mask_pool is not None:
            self._mask_pool.shutdown(wait=False)
