"""Structured generation: regex / JSON schema / choices -> token-level FSMs.

Host-side compiler (numpy only; never imports jax).  See :mod:`.regex` for the
supported regex subset, :mod:`.json_schema` for the JSON-schema subset and
:mod:`.fsm` for the token FSM layout and the compile cache.
"""
from .fsm import (DIST_UNREACHABLE, EOS_CLASS, NEVER_CLASS, CompiledFSM, ConstraintCache, TokenVocabulary,
                  advance, advance_bytes, allowed_tokens, build_token_fsm, compile_choices,
                  compile_json_schema, compile_regex, may_extend)
from .json_schema import (BOOL, FLOAT, INT, STRING, SchemaError, choices_to_regex,
                          json_schema_to_regex)
from .regex import (ByteDFA, ConstraintError, ConstraintTooLargeError, RegexError,
                    regex_to_byte_dfa)

__all__ = [
    "CompiledFSM", "ConstraintCache", "TokenVocabulary", "EOS_CLASS", "NEVER_CLASS", "DIST_UNREACHABLE",
    "advance", "advance_bytes", "allowed_tokens", "may_extend", "build_token_fsm",
    "compile_regex", "compile_json_schema", "compile_choices",
    "json_schema_to_regex", "choices_to_regex", "INT", "FLOAT", "BOOL", "STRING",
    "ConstraintError", "ConstraintTooLargeError", "RegexError", "SchemaError",
    "ByteDFA", "regex_to_byte_dfa",
]
