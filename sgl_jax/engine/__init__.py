"""The engine: the in-process API (`Engine`) over the engine loop and its per-concern managers.

| module | owns |
|---|---|
| `api.py` | `Engine`: the public API (generate, streams, asyncio, abort, flush, health) |
| `prepare.py` | `PreparedRequest`: validation and tokenization, once, in the caller's thread |
| `loop.py` | `EngineLoop`: the engine thread (inbox, schedule -> run -> postprocess) and fault handling |
| `constraints.py` | `ConstraintManager`: compile, table placement, FSM advance, jump-forward, grammars |
| `output.py` | `OutputProcessor`: detokenization, stops, logprobs, events |
| `stops.py` | linear-time incremental stop-regex matching |
| `build.py` | making the model, runner, page pool, radix cache and scheduler from the config |
| `protocol.py` | `EngineProtocol`: what the server needs of an engine |
"""

from sgl_jax.engine.api import Engine
from sgl_jax.engine.loop import StepInfo
from sgl_jax.engine.prepare import PreparedRequest
from sgl_jax.engine.protocol import EngineProtocol

__all__ = ["Engine", "EngineProtocol", "PreparedRequest", "StepInfo"]
