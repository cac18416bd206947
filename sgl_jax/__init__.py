"""sgl_jax: SGLang rebuilt JAX-first.

`sgl_jax.Engine` is the in-process entry point (imported lazily so host-only modules stay jax-free).
"""

__version__ = "0.1.0"


def __getattr__(name):
    if name == "Engine":
        from sgl_jax.engine import Engine

        return Engine
    raise AttributeError(f"module 'sgl_jax' has no attribute {name!r}")
