"""sgl_jax: SGLang rebuilt JAX-first."""

__version__ = "0.1.0"
