"""The HTTP layer: SGLang's native API and the OpenAI-compatible API over one Engine.

`protocol.py` parses requests into engine calls and shapes the answers (no HTTP); `server.py` owns
the routes, the streams, client disconnects and the graceful shutdown; `__main__.py` is the CLI
(`python -m sgl_jax.serve --config configs/smollm2-135m.yaml`).
"""

__all__ = ["create_app", "run", "serve"]


def __getattr__(name):
    # Lazy, so that `from sgl_jax.serve import protocol` (the routers parse requests with it) does not import the
    # web framework: a router that did paid ~0.3 s of imports inside its first request, with its first burst
    # waiting behind it.
    if name in __all__:
        from sgl_jax.serve import server

        return getattr(server, name)
    raise AttributeError(f"module 'sgl_jax.serve' has no attribute {name!r}")
