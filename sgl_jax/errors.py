"""Errors a request can cause. The HTTP layer turns them into 400 `{"error": {"message": ...}}`.

Messages name the offending field and the value that was expected, e.g.
``sampling_params.top_p must be in (0, 1], got 1.5``. `field` carries the field's name separately so
that a caller speaking another dialect (the OpenAI routes say `max_tokens` where the engine says
`max_new_tokens`) can re-word the message without parsing it.
"""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """The request is malformed or out of range; the message names the field and the expected value."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field


class UnsupportedFeatureError(InvalidRequestError):
    """The request is well formed but asks for something this server does not do (yet)."""


class EngineDeadError(RuntimeError):
    """The engine loop has stopped for good (the reason is in the message); the server answers 503."""
