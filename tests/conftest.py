import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# On CPU the suite compiles at XLA's lowest backend optimisation level. XLA builds the same optimised HLO (the same
# fusions and layouts: the tiny engine's step compared line by line) and LLVM compiles its kernels without optimising
# them, which shortens the compiles that are half the suite's time (test_engine and test_host_tier, cold: 168.8 ->
# 126.1 s; bench/notes.md, session 39). The native C++ kernels are built as always. Subprocesses inherit it (test_tp's
# and test_multihost's XLA_FLAGS add to this one), the end-to-end modules' server too, so that it and their in-process
# engine load each other's steps from the executable store. The default model's numeric checks (tests/test_smollm2.py
# against Hugging Face's values, test_quant's SmolLM2 error bounds) compile at XLA's default level, as a user's
# compile does (helpers.SHIPPED_LEVEL): last-bit differences of the unoptimised kernels moved an int8 bound.
SUITE_XLA_FLAG = "--xla_backend_optimization_level=0"
if os.environ["JAX_PLATFORMS"] == "cpu" and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {SUITE_XLA_FLAG}".strip()

import jax  # noqa: E402

from helpers import SUITE_CACHE  # noqa: E402

# Persistent compilation cache: reruns of the suite (and CI on the same machine) skip XLA compiles.
jax.config.update("jax_compilation_cache_dir", SUITE_CACHE)
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


# `make test` runs the suite on two workers (pytest-xdist, -n 2). A worker takes whole modules, so a module's
# engine fixture is built once; the modules that share the session's server take one worker between them (one
# server start, not two) and go first, as they are the longest unit of work. (xdist's own `--dist loadgroup`
# does not group under pytest 9: the group suffix it writes to the node id is not read back.)
_SERVER_MODULES = ("test_program_e2e.py", "test_server_e2e.py")  # in this order: the last test stops the server


def pytest_collection_modifyitems(config, items):
    def key(item):
        name = item.nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
        return _SERVER_MODULES.index(name) if name in _SERVER_MODULES else len(_SERVER_MODULES)

    items.sort(key=key)  # stable: every module keeps its own order


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            module = nodeid.split("::", 1)[0]
            return "server" if module.rsplit("/", 1)[-1] in _SERVER_MODULES else module

    return ModuleScheduling(config, log)
