"""The prompt a request will prefill, as token ids, for routing: what the worker's own parsing would give.

The worker tokenizes with the same tokenizer and the same rules (sgl_jax/serve/protocol.py), so the ids here
hash to the same blocks as the worker's radix cache reports (sgl_jax/cache/events.py). A body the worker would
refuse, a batch, or a route without a prompt gives no ids: the request is routed by load alone, and the worker
answers the error itself.
"""

from __future__ import annotations

from typing import Any

ROUTED_PATHS = ("/generate", "/v1/completions", "/v1/chat/completions")


def routing_prompt(path: str, body: Any, tokenizer, max_context: int = 1 << 30) -> tuple[list[int], int]:
    """(prompt token ids, max new tokens) of a request to `path`; ([], 128) when it has no single prompt."""
    from sgl_jax.errors import InvalidRequestError
    from sgl_jax.serve import protocol

    if path not in ROUTED_PATHS or not isinstance(body, dict):
        return [], 128
    if path == "/generate" and isinstance(body.get("text"), str) and body.get("input_ids") is None:
        # the common body, without the full parse (the worker validates it; this is the ids its parse gives)
        sp = body.get("sampling_params")
        max_new = sp.get("max_new_tokens") if isinstance(sp, dict) else None
        return tokenizer.encode(body["text"]), max_new if type(max_new) is int and max_new > 0 else 128
    try:
        if path == "/generate":
            req = protocol.parse_generate(body, vocab_size=int(tokenizer.vocab_size), max_context=max_context)
        elif path == "/v1/completions":
            req = protocol.parse_completion(body, tokenizer, max_context=max_context)
        else:
            req = protocol.parse_chat(body, tokenizer, max_context=max_context)
    except (InvalidRequestError, ValueError, TypeError, KeyError):
        return [], 128
    subs = req.subs
    if not subs or any(s.input_ids != subs[0].input_ids or s.text != subs[0].text for s in subs):
        return [], 128  # a batch of different prompts: no single prefix to route by
    s = subs[0]
    ids = s.input_ids if s.input_ids is not None else tokenizer.encode(s.text or "")
    sp = s.sampling_params or {}
    max_new = sp.get("max_new_tokens") if isinstance(sp, dict) else None
    return list(ids), int(max_new) if isinstance(max_new, int) and max_new > 0 else 128


def warm_up(tokenizer) -> None:
    """Run every routed path's parsing once, so the imports and the tokenizer's first-use work happen at start-up
    and not inside the first requests (which an event loop would otherwise hold up behind them)."""
    from sgl_jax.cache.events import sequence_hashes

    text = "warm up the router"
    ids, _ = routing_prompt("/generate", {"text": text, "sampling_params": {"max_new_tokens": 1}}, tokenizer)
    sequence_hashes(ids, 1)  # the block hashes a request is routed by
    routing_prompt("/generate", {"input_ids": ids, "sampling_params": {"max_new_tokens": 1}}, tokenizer)
    routing_prompt("/v1/completions", {"model": "m", "prompt": text, "max_tokens": 1}, tokenizer)
    routing_prompt("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": text}],
                                            "max_tokens": 1}, tokenizer)
