"""`EngineProtocol`: the engine as the server (and the frontend language) sees it.

Both `sgl_jax.engine.Engine` and the server tests' `FakeEngine` implement it; a test checks that the
fake behaves like the real engine on the shared behaviours (validation errors, abort of an unknown
rid, duplicate rids, health after shutdown). Host code: no jax.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Protocol, runtime_checkable

from sgl_jax.engine.prepare import PreparedRequest


@runtime_checkable
class EngineProtocol(Protocol):
    tokenizer: Any
    model_path: str
    max_context_len: int
    metrics: Any

    def prepare(self, *, text=None, input_ids=None, sampling_params=None, return_logprob=False,
                logprob_start_len=-1, top_logprobs_num=0, return_text_in_logprobs=False,
                rid=None) -> PreparedRequest:
        """Validate and tokenize (raises InvalidRequestError naming the field); may block: not on an event loop."""

    def generate_stream(self, *, prepared: PreparedRequest | None = None, stream: bool = True,
                        **kw) -> AsyncIterator[dict]:
        """Cumulative output events of one sequence; the last has meta_info.finish_reason set.
        Closing it early aborts the request. Raises EngineDeadError once the engine is dead."""

    def abort(self, rid: str) -> bool:
        """Abort a live request; False if no live request has this rid."""

    def flush_cache(self) -> bool:
        """Drop cached prefixes; False while requests run."""

    def health(self) -> tuple[bool, str]:
        """(True, "ok") while serving; (False, reason) when dead or shut down."""

    def get_server_info(self) -> dict: ...

    def check_integrity(self) -> None: ...

    def shutdown(self) -> None: ...
