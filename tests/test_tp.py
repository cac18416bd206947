"""Tensor parallel on a JAX mesh (sgl_jax/parallel/tp.py): the same model on one device and split over 2, 4 and 8
simulated CPU devices.

The comparisons run in subprocesses (tests/tp_worker.py) started with
XLA_FLAGS=--xla_force_host_platform_device_count=8, because the device count is fixed when jax starts and this
process has one device. The split rules, the KV-head expansion and the presets' memory plans need no devices
(an abstract mesh) and run here.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from sgl_jax.config import ConfigError, load_config
from sgl_jax.models.config import ModelConfig
from sgl_jax.models.testing import TINY_CONFIGS
from sgl_jax.parallel import memory
from sgl_jax.parallel.tp import AXIS, TPLayout, make_mesh

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(HERE)


def _worker(which: str):
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()  # + the suite's
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, os.path.join(HERE, "tp_worker.py"), which], env=env, capture_output=True,
                       text=True, timeout=420)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and lines, f"tp_worker {which} failed (rc {p.returncode}):\n{p.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def model_results():
    return _worker("model")


@pytest.fixture(scope="module")
def engine_results():
    return {int(k): v for k, v in _worker("engine").items()}


# ------------------------------------------------------------------------------ model level
@pytest.mark.timeout(480)
def test_sharded_logits_equal_single_device(model_results):
    """Prefill chunks, mixed decode steps and a run block: float32 logits within 1e-5 of the single-device run
    (relative to the logits' scale: the all-reduce sums in another order), the same argmax everywhere, on every
    split rule (heads split, KV heads stored several times, attention replicated, MLP/vocabulary replicated)."""
    seen = set()
    for r in model_results:
        tol = 1e-5 * max(1.0, r["max_abs_logit"])
        assert r["finite"], r
        assert r["max_abs_diff"] <= tol, r
        assert r["argmax_equal"], r
        seen.add((r["model"], r["tp"], r["shard_attention"], r["kv_copies"] > 1, r["shard_vocab"]))
    assert {tp for _, tp, *_ in seen} == {2, 4, 8}
    assert any(not attn for _, _, attn, _, _ in seen)  # replicated attention ran
    assert any(copies for *_, copies, _ in seen)  # KV heads fewer than tp ran
    assert any(not vocab for *_, vocab in seen)  # replicated vocabulary ran


@pytest.mark.timeout(60)
def test_shards_hold_their_part(model_results):
    """The pool is split by KV heads (one head per device when expanded), q_proj by columns; replicated when
    attention is."""
    for r in model_results:
        N, K, S, D = r["kv_shape"]
        assert r["devices"] == r["tp"]
        if r["shard_attention"]:
            assert K % r["tp"] == 0
            assert r["kv_shard_shape"] == [N, K // r["tp"], S, D], r
            assert r["q_shard_shape"][1] * r["tp"] == r["q_shape"][1], r
        else:
            assert r["kv_shard_shape"] == r["kv_shape"] and r["q_shard_shape"] == r["q_shape"], r


# ----------------------------------------------------------------------------- engine level
@pytest.mark.timeout(480)
def test_engine_tp_outputs_identical(engine_results):
    """The whole engine (scheduler, radix cache, constrained decoding with jump-forward, seeded sampling) on a
    mesh of 2 (heads split) and 8 (attention and vocabulary replicated): greedy texts, top-logprob ids, the constrained and the sampled outputs identical to one device, token
    logprobs within 1e-5, the same prefix-cache hit."""
    ref = engine_results[1]
    assert ref["cached_tokens"] > 0 and ref["layout"] == "none"
    for tp in (2, 8):
        got = engine_results[tp]
        assert got["texts"] == ref["texts"], tp
        assert got["top"] == ref["top"], tp
        assert got["regex"] == ref["regex"] and got["sampled"] == ref["sampled"], tp
        assert got["cached_tokens"] == ref["cached_tokens"], tp
        for a, b in zip(ref["logprobs"], got["logprobs"]):
            assert np.abs(np.array(a) - np.array(b)).max() <= 1e-5, tp
        assert got["kv_devices"] == tp and f"tp={tp}" in got["layout"]
        assert got["round_trip"], tp  # the host tier's save / load on the sharded pool
        assert got["kv_sharding"] == str(P() if tp == 8 else P(None, AXIS, None, None))
    assert ref["round_trip"]
    # what the partitioner added to the decode step: per layer one all-reduce after o_proj and one after down_proj,
    # one for the vocabulary-split embedding lookup, one all-gather of the vocabulary-split logits; nothing else
    L = ref["num_layers"]
    assert ref["collectives"] == {}
    assert engine_results[2]["collectives"] == {"all-reduce": 2 * L + 1, "all-gather": 1}
    assert engine_results[8]["collectives"] == {"all-reduce": L}  # attention and vocabulary replicated: MLP only
    import re

    assert re.fullmatch(r"(yes|no), [0-9]{3}!", ref["regex"]), ref["regex"]
    # the per-device budget: tp=2 splits the 2 KV heads, so each device's pages are half as large: twice as many
    assert abs(engine_results[2]["kv_shard_shape"][0] - 2 * ref["kv_shard_shape"][0]) <= 2


# ------------------------------------------------------------------------------ split rules
def _cfg(**over):
    return ModelConfig.from_hf(dict(TINY_CONFIGS["llama"], **over), "tiny")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tp,heads,kv_heads,attn,copies", [
    (2, 4, 2, True, 1), (4, 4, 2, True, 2), (8, 4, 2, False, 1), (8, 8, 2, True, 4), (4, 4, 1, True, 4),
    (2, 6, 3, False, 1), (3, 6, 3, True, 1), (4, 8, 8, True, 1)])
def test_layout_rules(tp, heads, kv_heads, attn, copies):
    cfg = _cfg(num_attention_heads=heads, num_key_value_heads=kv_heads, hidden_size=16 * heads)
    lay = TPLayout.plan(cfg, AbstractMesh((tp,), (AXIS,)))
    assert (lay.shard_attention, lay.kv_copies) == (attn, copies)
    assert lay.model_config(cfg).num_kv_heads == kv_heads * copies
    col, row = P(None, AXIS), P(AXIS, None)
    expect_attn = {"q_proj": col, "k_proj": col, "v_proj": col, "o_proj": row} if attn else {}
    for mod in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert lay.spec(("layers_0", "self_attn", mod, "kernel")) == expect_attn.get(mod, P())
    assert lay.spec(("layers_1", "self_attn", "q_proj", "bias")) == (P(AXIS) if attn else P())
    assert lay.spec(("layers_1", "self_attn", "o_proj", "scale")) == P()
    assert lay.spec(("layers_0", "mlp", "gate_proj", "kernel")) == (col if 128 % tp == 0 else P())
    assert lay.spec(("layers_0", "mlp", "down_proj", "kernel")) == (row if 128 % tp == 0 else P())
    assert lay.spec(("embed_tokens", "embedding")) == (row if 320 % tp == 0 else P())
    assert lay.spec(("lm_head", "scale")) == (P(AXIS) if 320 % tp == 0 else P())
    for path in (("norm", "weight"), ("layers_0", "input_layernorm", "weight"), ("layers_0", "self_attn", "q_norm",
                                                                                  "weight")):
        assert lay.spec(path) == P()
    assert f"tp={tp}" in lay.describe()


@pytest.mark.timeout(60)
def test_kv_head_expansion_repeats_each_head():
    """K = 2 heads of D = 16 stored 4x each: head j of the result is head j // 4 of the checkpoint, for the kernel
    ([in, out]) and per-column vectors (bias, int8 scale) alike; other tensors untouched."""
    cfg = _cfg(num_attention_heads=8, hidden_size=128)
    lay = TPLayout.plan(cfg, AbstractMesh((8,), (AXIS,)))
    assert lay.kv_copies == 4 and cfg.head_dim == 16
    w = np.arange(128 * 32, dtype=np.float32).reshape(128, 32)
    out = lay.expand(("layers_0", "self_attn", "k_proj", "kernel"), w)
    assert out.shape == (128, 128)
    for j in range(8):
        np.testing.assert_array_equal(out[:, 16 * j:16 * (j + 1)], w[:, 16 * (j // 4):16 * (j // 4 + 1)])
    b = np.arange(32, dtype=np.float32)
    np.testing.assert_array_equal(lay.expand(("layers_0", "self_attn", "v_proj", "bias"), b),
                                  np.concatenate([b[:16]] * 4 + [b[16:]] * 4))
    assert lay.expand(("layers_0", "self_attn", "q_proj", "kernel"), w) is w


@pytest.mark.timeout(60)
def test_too_few_devices_is_a_clear_error():
    with pytest.raises(ValueError, match=r"parallel.tp=64 needs 64 devices; this process sees 1 .*"
                                         r"xla_force_host_platform_device_count"):
        make_mesh(64, jax.devices()[:1])


@pytest.mark.timeout(60)
def test_parallel_config_keys():
    c = load_config(None, {"parallel.tp": 4}).engine
    assert c.parallel.tp == 4
    assert load_config(None, {"engine.parallel.tp": 2}).engine.parallel.tp == 2
    with pytest.raises(ConfigError, match="parallel.tp"):
        load_config(None, {"parallel.tp": 0})
    with pytest.raises(ConfigError, match="dist_init_addr"):
        load_config(None, {"parallel.nnodes": 2})
    with pytest.raises(ConfigError, match="node_rank"):
        load_config(None, {"parallel.nnodes": 2, "parallel.node_rank": 2, "parallel.dist_init_addr": "h:1"})


# -------------------------------------------------------------------------------- presets
PRESETS = [("llama3-8b-tpu-v5e-8", "llama-3-8b", 16), ("llama3-8b-tpu-v6e-8", "llama-3-8b", 32),
           ("llama3-8b-gpu-8", "llama-3-8b", 80), ("llama3-70b-tpu-v5e-8", "llama-3-70b", 16),
           ("llama3-70b-tpu-v6e-8", "llama-3-70b", 32), ("llama3-70b-gpu-8", "llama-3-70b", 80)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("preset,arch,device_gb", PRESETS)
def test_presets_shape_check_and_fit(preset, arch, device_gb):
    """Each 8-device preset traces on an abstract mesh of 8 (jax.eval_shape: nothing allocated) and its weights +
    KV pool per device fit its device; a 70B's weights alone would not fit one such device."""
    c = load_config(os.path.join(ROOT, "configs", f"{preset}.yaml")).engine
    assert c.parallel.tp == 8
    mc = memory.model_config_for(c, arch)
    plan = memory.plan_memory(c, mc, device_gb)
    assert plan.fits, plan.report()
    assert "attention heads split" in plan.layout and "MLP split" in plan.layout
    one = memory.plan_memory(c.replace(parallel={"tp": 1}), mc, device_gb, trace=False)
    assert one.weights_gib > 7 * plan.weights_gib
    assert "70b" not in preset or one.weights_gib > device_gb


@pytest.mark.timeout(120)
def test_memory_cli_names_the_numbers(capsys):
    args = ["--config", os.path.join(ROOT, "configs", "llama3-8b-tpu-v5e-8.yaml"), "--arch", "llama-3-8b"]
    assert memory.main(args + ["--device-gb", "16"]) == 0
    out = capsys.readouterr().out
    assert "weights per device      1.87 GiB" in out and "fits within 90%" in out
    assert memory.main(args + ["--device-gb", "16", "--set", "kv_memory_gb=14"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--arch 'llama-9' is unknown"):
        memory.main(args[:2] + ["--arch", "llama-9"])
