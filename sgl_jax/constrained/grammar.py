"""Optional grammar backend: EBNF / recursive grammars through `llguidance` (host-computed masks).

A recursive grammar (nested JSON of unbounded depth, tool-call grammars) has no finite FSM table, so it
cannot live in the on-device constraint table. For these, llguidance's matcher computes the allowed-token
bitmask on the host, one row per request per step, in the same packed layout as the table rows
(bit j of word w = token 32w + j); the jitted step applies host rows and table rows through the same
masking code. Masks are computed in a worker thread right after the previous step's postprocess, so they
overlap the engine thread's scheduling and packing; they cannot overlap the forward pass itself because
sampling happens inside the one jitted step. Forced tokens (`compute_ff_tokens`) are appended without
sampling, as jump-forward does for table constraints. Host code: no jax import; llguidance is imported
only when a grammar is used.
"""

from __future__ import annotations

import numpy as np


def available() -> bool:
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return False
    return True


class GrammarError(ValueError):
    """The grammar text is invalid; the message says where."""


class GrammarBackend:
    """One per engine (per tokenizer): builds matchers and fills mask rows."""

    def __init__(self, tokenizer, vocab_size: int):
        import llguidance

        self._ll = llguidance
        self.vocab_size = vocab_size
        self.words = -(-vocab_size // 32)
        self.lltok = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size,
                                            eos_token=tokenizer.eos_token_id)

    def grammar(self, ebnf: str) -> str:
        try:
            return self._ll.grammar_from("ebnf", ebnf)
        except Exception as e:  # llguidance raises ValueError / Exception with the reason
            raise GrammarError(str(e)) from None

    def matcher(self, ebnf: str):
        m = self._ll.LLMatcher(self.lltok, self.grammar(ebnf))
        if m.is_error():
            raise GrammarError(m.get_error())
        return m

    def fill_mask(self, matcher) -> np.ndarray:
        """The allowed-token bitmask row [ceil(V/32)] int32 for the matcher's current state."""
        import llguidance.numpy as lln

        row = np.zeros((1, self.words), np.int32)
        lln.fill_next_token_bitmask(matcher, row, 0)
        return row[0]
