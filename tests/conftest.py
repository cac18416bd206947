import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Persistent compilation cache: reruns of the suite (and CI on the same machine) skip XLA compiles.
_CACHE = os.path.join(os.path.expanduser(os.environ.get("SGL_JAX_CACHE", "~/.cache/sgl_jax")), "jax_cache_tests")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of the default model's GGUF, fetched into the user cache on first use."""
    from sgl_jax.models.hub import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def server():
    """One real server on the default preset for every end-to-end module (start-up is the slow part).
    tests/test_server_e2e.py's last test (`test_zz_sigterm_drains_then_exits`) stops it: modules that use it
    sort before that one."""
    from e2e_server import _Server

    srv = _Server()
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()
        os.unlink(srv.log.name)
