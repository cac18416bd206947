"""What a backend must do for the interpreter, and the one value a call carries: the prompt so far.

A backend turns a `Prompt` (the state's text, and where the backend tracks them, the exact token ids of its
already-computed part) and merged sampling values into a completion, a select decision, or a cached prefix.
Three implement it: `EngineBackend` (in-process, token ids, prefix holds), `RuntimeEndpoint` (the native HTTP
API, text like upstream's client) and `OpenAI` (any OpenAI-compatible API, with API speculative execution).
Host code: no jax import.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

from sgl_jax.program.chat_template import DEFAULT, ChatTemplate


@dataclasses.dataclass
class Prompt:
    """The prompt a call sends. `fixed_ids` are the exact ids of `text[:fixed_chars]` (earlier calls' prompts
    and outputs); the rest of `text` is constant text the backend tokenizes. Backends that do not track ids
    get `fixed_ids=None` and send `text`."""

    text: str
    fixed_ids: list[int] | None = None
    fixed_chars: int = 0
    messages: list = dataclasses.field(default_factory=list)
    cur_role: str | None = None
    gather: Any = None  # a fork's prefix hold while this is a branch's first call (in-process: siblings start together)


@dataclasses.dataclass
class Completion:
    """One gen's result: `text` (a list when n > 1), its meta_info, and the ids of `text` where known
    (`ids` exactly decode to `text[:ids_chars]`; the rest of the text is re-tokenized by the next call)."""

    text: Any
    meta_info: Any
    ids: list[int] | None = None
    ids_chars: int = 0


class Backend:
    """Base class; every method a program may reach raises a clear error unless the backend supports it."""

    is_chat_model = False
    tracks_ids = False  # True: the interpreter keeps exact token ids (`Prompt.fixed_ids`)

    def get_chat_template(self) -> ChatTemplate:
        return DEFAULT

    def tokenize(self, text: str) -> list[int]:
        raise NotImplementedError(f"{type(self).__name__} does not tokenize on the client")

    def generate(self, prompt: Prompt, params) -> Completion:
        raise NotImplementedError

    def truncate(self, text: str, max_tokens: int) -> str:
        """The first `max_tokens` tokens of `text` (API speculation cuts a stop-less gen with it). Without a
        tokenizer: characters, as upstream's client does."""
        return text[:max_tokens]

    def generate_stream(self, prompt: Prompt, params) -> Iterator[tuple[str, Any]]:
        """Yields (new text, meta_info); the last item's meta_info is final. Default: one chunk."""
        c = self.generate(prompt, params)
        yield (c.text if isinstance(c.text, str) else c.text[0]), c.meta_info

    def select(self, prompt: Prompt, choices, temperature: float, method) -> tuple[Any, Completion | None]:
        raise NotImplementedError(f"{type(self).__name__} does not support select")

    def prefill(self, prompt: Prompt, hold: bool = False):
        """Compute and cache the prompt (fork and run_batch call this once for a shared prefix). With
        hold=True the handle keeps it cached until `release(handle)`. Returns (handle or None, the prompt's
        exact ids or None)."""
        return None, None

    def gather(self, handle, siblings: int) -> None:
        """A fork of `siblings` branches holds `handle` (from prefill): a backend that can start the branches'
        first calls together (they carry the handle in `Prompt.gather`) prepares for them here."""

    def release(self, handle) -> None:
        pass

    def flush_cache(self) -> bool:
        return False

    def get_server_info(self) -> dict:
        return {}

    def shutdown(self) -> None:
        pass
