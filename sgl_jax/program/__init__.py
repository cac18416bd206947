"""sgl_jax.program: SGLang's frontend language, JAX-free, on three backends.

    import sgl_jax.program as sgl

    @sgl.function
    def qa(s, question):
        s += sgl.user(question)
        s += sgl.assistant(sgl.gen("answer", max_tokens=64))

    sgl.set_default_backend(sgl.EngineBackend("configs/smollm2-135m.yaml"))   # or RuntimeEndpoint(url), OpenAI(...)
    print(qa.run(question="What is the capital of France?", temperature=0)["answer"])

A program written for `import sglang as sgl` runs unchanged after `import sgl_jax.program as sgl`. The package
map: `api.py` (the primitives), `ir.py` (the expressions they build), `sglfunction.py` (run / run_batch / trace),
`state.py` (the state a program writes to, fork/join), `executor.py` (the interpreter), `speculative.py`
(API speculative execution), `choices.py` (select's methods), `chat_template.py` (role markup from the model's
own template), `backends/` (engine in-process, native HTTP, OpenAI-compatible).
"""

from sgl_jax.program.api import (assistant, assistant_begin, assistant_end, flush_cache, function, gen, gen_int,
                                 gen_string, get_default_backend, get_server_info, image, select,
                                 set_default_backend, system, system_begin, system_end, user, user_begin, user_end)
from sgl_jax.program.backends.base import Backend
from sgl_jax.program.backends.engine import EngineBackend
from sgl_jax.program.backends.http import RuntimeEndpoint
from sgl_jax.program.backends.openai import OpenAI
from sgl_jax.program.chat_template import ChatTemplate, get_chat_template
from sgl_jax.program.choices import (ChoicesDecision, greedy_token_selection, token_length_normalized,
                                     unconditional_likelihood_normalized)
from sgl_jax.program.sglfunction import SglFunction
from sgl_jax.program.ir import ProgramError
from sgl_jax.program.state import ProgramState, StateGroup

__all__ = [
    "assistant", "assistant_begin", "assistant_end", "flush_cache", "function", "gen", "gen_int", "gen_string",
    "get_default_backend", "get_server_info", "image", "select", "set_default_backend", "system", "system_begin",
    "system_end", "user", "user_begin", "user_end", "Backend", "EngineBackend", "RuntimeEndpoint", "OpenAI",
    "ChatTemplate", "get_chat_template", "ChoicesDecision", "greedy_token_selection", "token_length_normalized",
    "unconditional_likelihood_normalized", "SglFunction", "ProgramError", "ProgramState", "StateGroup",
]
