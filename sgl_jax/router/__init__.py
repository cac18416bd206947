"""Routing across replicas: the policy (`policy.py`: cost by cache match and load, late binding) and the HTTP
router in front of sgl_jax workers (`server.py`, `python -m sgl_jax.router`). Host code: no jax."""
