"""The HTTP layer: SGLang's native API and the OpenAI-compatible API over one Engine.

`protocol.py` parses requests into engine calls and shapes the answers (no HTTP); `server.py` owns
the routes, the streams, client disconnects and the graceful shutdown; `__main__.py` is the CLI
(`python -m sgl_jax.serve --config configs/smollm2-135m.yaml`).
"""

from sgl_jax.serve.server import create_app, run, serve

__all__ = ["create_app", "run", "serve"]
