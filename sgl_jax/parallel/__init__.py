"""Past one device: tensor parallelism on a JAX mesh (`tp`), per-device memory of a preset (`memory`), and one
model served across hosts (`multihost`). Imports nothing itself (host code may import the package)."""
