"""Compiled steps saved on disk and read back (sgl_jax/executables.py): a restart loads every shape without
tracing or lowering, produces the same outputs, keeps the KV pool donated, and never serves an entry that is
corrupt, from other code, or from other settings."""

import logging
import os
import shutil
import uuid

import jax
import numpy as np
import pytest

from sgl_jax import executables, runner as runner_mod
from sgl_jax.engine import Engine
from sgl_jax.models.testing import write_tiny_gguf

SMALL = dict(page_size=4, max_context_len=64, max_running_requests=4, max_prefill_tokens=32, prefill_block=8,
             decode_buckets=[4], prefill_block_buckets=[4], max_mixed_blocks=0,  # 3 shapes: saving, not the grid
             page_width_buckets=[16], max_top_logprobs=2, kv_memory_gb=0.01, decode_row_fill="fit")
GREEDY = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}
PROMPTS = [[5, 6, 7, 8, 9], list(range(20, 47)), [100, 3, 3, 3]]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_gguf("llama", str(tmp_path_factory.mktemp("tiny") / "tiny.gguf"))


@pytest.fixture(scope="module")
def saved(tiny_path):
    """An engine's steps compiled and saved once for the module's two store tests: (cache directory, the store's
    directory, the engine's outputs, its shapes). The fingerprint is this module's alone, in the suite's compilation
    cache directory (the engine points jax's process-wide cache at compile_cache_dir, so a fresh temporary one would
    change it for the whole suite); its executables are removed afterwards. The restart test only reads the store;
    the corrupt-entry test, after it, damages two entries."""
    cache = jax.config.jax_compilation_cache_dir
    salt = uuid.uuid4().hex
    real = runner_mod.fingerprint
    fps = []

    def fp(settings, avals):
        fps.append(real([settings, salt], avals))
        return fps[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner_mod, "fingerprint", fp)
        with Engine(model=tiny_path, progress=False, compile_cache_dir=cache, **SMALL) as e1:
            shapes = e1.runner.shapes()
            assert e1.runner.store.saved == len(shapes) and e1.runner.store.loaded == 0
            outputs = run(e1)
        assert len(set(fps)) == 1
        yield cache, os.path.join(os.path.expanduser(cache), "executables", fps[-1]), outputs, shapes
    for f in set(fps):
        shutil.rmtree(os.path.join(os.path.expanduser(cache), "executables", f), ignore_errors=True)


def run(e):
    return [o["output_ids"] for o in e.generate(input_ids=PROMPTS, sampling_params=GREEDY)]


@pytest.mark.timeout(400)
def test_restart_loads_every_shape_and_gives_the_same_outputs(tiny_path, saved):
    cache, d, outputs, shapes = saved
    with Engine(model=tiny_path, progress=False, compile_cache_dir="", **SMALL) as ref:
        want = run(ref)
    assert outputs == want  # the engine that compiled and saved its steps
    assert len([f for f in os.listdir(d) if f.endswith(".exe")]) == len(shapes)

    with Engine(model=tiny_path, progress=False, compile_cache_dir=cache, **SMALL) as e2:
        # every shape read back: the load-or-compile path traced and lowered none of them
        assert e2.runner.store.loaded == len(shapes) and e2.runner.store.saved == 0
        assert e2.get_server_info()["executables_loaded"] == len(shapes)
        old_kv = jax.tree_util.tree_leaves(e2.runner.kv)[0]
        assert run(e2) == want
        assert old_kv.is_deleted()  # the loaded step still donates (updates in place) the KV pool
        e2.check_integrity()


@pytest.mark.timeout(400)
def test_a_corrupt_entry_is_dropped_and_compiled_again(tiny_path, saved, caplog):
    cache, d, want, _ = saved
    names = sorted(os.listdir(d))
    with open(os.path.join(d, names[0]), "r+b") as f:  # truncated
        f.truncate(100)
    with open(os.path.join(d, names[1]), "r+b") as f:  # bytes flipped in the middle
        f.seek(os.path.getsize(os.path.join(d, names[1])) // 2)
        f.write(b"\xff" * 64)
    with caplog.at_level(logging.WARNING, logger="sgl_jax.executables"):
        with Engine(model=tiny_path, progress=False, compile_cache_dir=cache, **SMALL) as e2:
            n = len(e2.runner.shapes())
            assert e2.runner.store.loaded + e2.runner.store.saved == n
            assert e2.runner.store.saved >= 1  # at least the truncated one was compiled again and rewritten
            assert run(e2) == want
    assert "dropping unreadable executable" in caplog.text
    assert sorted(os.listdir(d)) == names  # rewritten, nothing left behind


def test_fingerprint_changes_with_code_settings_and_state():
    avals = (jax.ShapeDtypeStruct((4, 8), np.float32), {"k": jax.ShapeDtypeStruct((2,), np.int32)})
    base = executables.fingerprint(["cfg", 1], avals)
    assert executables.fingerprint(["cfg", 1], avals) == base
    assert executables.fingerprint(["cfg", 2], avals) != base
    assert executables.fingerprint(["cfg", 1], (avals[0], {"k": jax.ShapeDtypeStruct((3,), np.int32)})) != base
    assert executables.fingerprint(["cfg", 1], (jax.ShapeDtypeStruct((4, 8), np.float16), avals[1])) != base
    real = executables.source_digest()
    try:
        executables.source_digest.cache_clear()
        orig = executables.source_digest
        executables.source_digest = lambda: real[::-1]  # as if a module of the step had changed
        assert executables.fingerprint(["cfg", 1], avals) != base
    finally:
        executables.source_digest = orig
    os.environ["XLA_FLAGS"], old = "--xla_dummy_flag_for_test", os.environ.get("XLA_FLAGS")
    try:
        assert executables.fingerprint(["cfg", 1], avals) != base
    finally:
        if old is None:
            del os.environ["XLA_FLAGS"]
        else:
            os.environ["XLA_FLAGS"] = old


def test_an_unwritable_store_turns_itself_off_once(tmp_path, caplog):
    f = jax.jit(lambda a: a * 2)
    compiled = executables.compile_fresh(f.lower(np.ones(3, np.float32)))  # only a fresh one serializes whole
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    store = executables.ExecutableStore(str(blocked), "fp")
    with caplog.at_level(logging.WARNING, logger="sgl_jax.executables"):
        store.save("a", compiled)
        store.save("b", compiled)
    assert not store.enabled and store.saved == 0
    assert caplog.text.count("not saving compiled executables") == 1
    assert store.load("a") is None
    ok = executables.ExecutableStore(str(tmp_path / "ok"), "fp")
    ok.save("a", compiled)
    back = executables.ExecutableStore(str(tmp_path / "ok"), "fp").load("a")
    np.testing.assert_array_equal(np.asarray(back(np.arange(3, dtype=np.float32))), [0, 2, 4])
