import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of the default model's GGUF, fetched into the user cache on first use."""
    from sgl_jax.models.hub import resolve_model

    return resolve_model("smollm2-135m")
