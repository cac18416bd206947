"""Deployment presets in configs/ and the command line that overrides them (no model is loaded)."""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re

import pytest
import yaml

from sgl_jax.config import ConfigError, EngineConfig, ServerConfig, leaf_fields, load_config
from sgl_jax.serve.__main__ import main, parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def test_the_presets_exist():
    names = {os.path.basename(p) for p in PRESETS}
    assert {"smollm2-135m.yaml", "llama3-8b-tpu-v5e.yaml", "llama3-8b-tpu-v6e.yaml", "llama3-8b-gpu.yaml"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=os.path.basename)
def test_preset_loads_and_is_consistent(path):
    cfg = load_config(path)
    e = cfg.engine
    sh, sc, kv = e.shapes, e.scheduler, e.cache
    assert max(sh.decode_buckets) >= sc.max_running_requests  # the engine refuses otherwise
    assert sc.max_prefill_tokens <= max(sh.prefill_block_buckets) * sh.prefill_block
    if sh.page_width_buckets:
        assert max(sh.page_width_buckets) >= math.ceil(kv.max_context_len / kv.page_size)
    with open(path) as f:
        raw = yaml.safe_load(f)
    assert set(raw) <= {"engine", "server"}
    for key, value in raw["engine"].items():  # every key written in the file is what was loaded
        if isinstance(value, dict):  # a section
            for k, v in value.items():
                got = getattr(getattr(e, key), k)
                assert got == v or (isinstance(got, float) and got == float(v)), (key, k)
        else:
            got = getattr(e, key)
            assert got == value or (isinstance(got, float) and got == float(value)), key


def test_default_preset_is_the_cpu_one():
    cfg = load_config(os.path.join(ROOT, "configs", "smollm2-135m.yaml"))
    assert cfg.engine.model == "smollm2-135m" and cfg.engine.dtype == "float32"
    assert cfg.engine.cache.page_size == 16 and cfg.engine.cache.kv_memory_gb == 1.0
    assert cfg.engine.scheduler.max_running_requests == 64
    assert (cfg.server.host, cfg.server.port) == ("127.0.0.1", 30000)


def test_accelerator_presets_use_bf16():
    for path in PRESETS:
        if "llama3" in path:
            assert load_config(path).engine.dtype == "bfloat16", path


def _write(tmp_path, text: str) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("text,needle", [
    ("engine:\n  page_sise: 16\n", "engine.page_sise"),
    ("engine:\n  cache:\n    page_sise: 16\n", "engine.cache.page_sise"),
    ("engine:\n  cache:\n    max_running_requests: 16\n", "engine.cache.max_running_requests"),
    ("engine:\n  cache: 16\n", "engine.cache"),
    ("server:\n  prot: 1\n", "server.prot"),
    ("engine:\n  page_size: sixteen\n", "engine.cache.page_size"),
    ("engine:\n  cache:\n    page_size: 16.5\n", "engine.cache.page_size"),
    ("engine:\n  disable_radix_cache: 'yes'\n", "engine.cache.disable_radix_cache"),
    ("engine:\n  decode_buckets: [1, two]\n", "engine.shapes.decode_buckets"),
    ("server:\n  port: '30000'\n", "server.port"),
    ("sever:\n  port: 1\n", "sever"),
    ("engine: 5\n", "engine"),
])
def test_bad_keys_are_named(tmp_path, text, needle):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, text))
    assert needle in str(e.value)


def test_overrides(tmp_path):
    path = os.path.join(ROOT, "configs", "smollm2-135m.yaml")
    cfg = load_config(path, {"engine.page_size": 32, "port": 1234, "disable_radix_cache": True,
                             "engine.shapes.decode_buckets": [1, 64], "scheduler.max_prefill_tokens": 256})
    e = cfg.engine
    assert e.cache.page_size == 32 and cfg.server.port == 1234 and e.cache.disable_radix_cache
    assert e.shapes.decode_buckets == [1, 64] and e.scheduler.max_prefill_tokens == 256
    assert e.model == "smollm2-135m" and e.cache.max_context_len == 2048  # the rest comes from the preset
    with pytest.raises(ConfigError, match="engine.cache.page_size"):
        load_config(path, {"engine.page_size": "big"})
    with pytest.raises(ConfigError, match="nope"):
        load_config(path, {"engine.nope": 1})
    with pytest.raises(ConfigError, match="engine.shapes.page_size"):
        load_config(path, {"engine.shapes.page_size": 8})  # a field lives in one section only


def test_flat_names_sections_and_instances_agree():
    a = EngineConfig.make(page_size=8, decode_buckets=[1, 8], max_running_requests=8)
    b = EngineConfig.make(cache={"page_size": 8}, shapes={"decode_buckets": [1, 8]},
                          scheduler={"max_running_requests": 8})
    assert a == b and a.cache.page_size == 8
    assert a.replace(page_size=4).cache.page_size == 4 and a.replace(page_size=4).shapes.decode_buckets == [1, 8]
    with pytest.raises(ConfigError, match="unknown config key 'engine.nope'"):
        EngineConfig.make(nope=1)


def test_kv_dtype_takes_the_pool_dtypes_and_float8_by_both_names():
    """`kv_dtype` takes the weight dtypes and the float8 ones, by jnp's names and SGLang's (`fp8_e4m3`,
    `fp8_e5m2`), each standing for its jnp type; `dtype` (weights, activations) refuses float8, and an unknown name
    is refused naming the key and the choices."""
    import jax.numpy as jnp

    from sgl_jax.models.loader import canonical_dtype

    for name, dt in (("float16", jnp.float16), ("float8_e4m3fn", jnp.float8_e4m3fn), ("fp8_e4m3", jnp.float8_e4m3fn),
                     ("float8_e5m2", jnp.float8_e5m2), ("fp8_e5m2", jnp.float8_e5m2)):
        e = EngineConfig.make(kv_dtype=name)
        assert e.effective_kv_dtype == name and canonical_dtype(name, kv=True) == dt
    with pytest.raises(ConfigError, match="engine.kv_dtype.*fp8_e4m3"):
        EngineConfig.make(kv_dtype="int8")
    with pytest.raises(ConfigError, match="engine.dtype"):
        EngineConfig.make(dtype="fp8_e4m3")
    with pytest.raises(ValueError, match="dtype 'fp8_e4m3' is unknown"):
        canonical_dtype("fp8_e4m3")  # weights


def test_cli_flags_and_set():
    path = os.path.join(ROOT, "configs", "smollm2-135m.yaml")
    cfg, _ = parse_config(["--config", path, "--host", "0.0.0.0", "--port", "8080", "--model", "m.gguf",
                           "--api-key", "k", "--disable-radix-cache", "--log-level", "debug",
                           "--set", "engine.dtype=bfloat16", "max_running_requests=8",
                           "--set", "engine.shapes.decode_buckets=1,2,8", "server.drain_timeout_s=2.5",
                           "engine.warmup=false"])
    e, s = cfg.engine, cfg.server
    assert (s.host, s.port, s.api_key, s.log_level, s.drain_timeout_s) == ("0.0.0.0", 8080, "k", "debug", 2.5)
    assert (e.model, e.dtype, e.scheduler.max_running_requests, e.shapes.decode_buckets,
            e.cache.disable_radix_cache, e.warmup) == ("m.gguf", "bfloat16", 8, [1, 2, 8], True, False)
    assert e.cache.page_size == 16  # untouched preset value
    cfg, _ = parse_config([])  # no preset: the dataclass defaults
    assert cfg.engine == EngineConfig() and cfg.server == ServerConfig()


@pytest.mark.timeout(60)
def test_quantization_key():
    """`quantization` (none | int8) is a top-level engine key: set by preset, flat name, --set and --flag-free
    keyword, refused by name when unknown; the int8 and gguf presets are the CPU preset with this key, kv_dtype
    (float16) and attention_math (bfloat16) changed. `attention_math` is refused by name when unknown."""
    assert EngineConfig().quantization == "none"
    assert EngineConfig.make(quantization="int8").quantization == "int8"
    base = os.path.join(ROOT, "configs", "smollm2-135m.yaml")
    for argv in (["--set", "quantization=int8"], ["--set", "engine.quantization=int8"]):
        cfg, _ = parse_config(["--config", base] + argv)
        assert cfg.engine.quantization == "int8" and cfg.engine.cache.page_size == 16
    assert load_config(base, {"quantization": "int8"}).engine.quantization == "int8"
    with pytest.raises(ConfigError,
                       match=re.escape("'engine.quantization' must be one of none, int8, gguf; got 'fp8'")):
        load_config(base, {"quantization": "fp8"})
    with pytest.raises(ConfigError, match=re.escape("'engine.quantization' must be a string, got 8")):
        EngineConfig.make(quantization=8)
    int8 = load_config(os.path.join(ROOT, "configs", "smollm2-135m-int8.yaml"))
    assert int8.engine.quantization == "int8" and int8.engine.kv_dtype == "float16"
    # the quantized presets are the default one with these keys changed (16-row query blocks: bench/notes.md)
    blocks = {"kv_dtype": "float16", "attention_math": "bfloat16", "prefill_block": 16,
              "prefill_block_buckets": [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]}
    assert int8 == load_config(base, {"quantization": "int8", **blocks})
    gguf = load_config(os.path.join(ROOT, "configs", "smollm2-135m-gguf.yaml"))
    assert gguf == load_config(base, {"quantization": "gguf", **blocks})
    assert load_config(base).engine.attention_math == "float32"
    with pytest.raises(ConfigError,
                       match=re.escape("'engine.attention_math' must be one of float32, bfloat16; got 'fp8'")):
        load_config(base, {"attention_math": "fp8"})
    with pytest.raises(ConfigError, match=r"quantization' gguf .* engine.parallel.tp=2 use int8"):
        EngineConfig.make(quantization="gguf", parallel={"tp": 2})


@pytest.mark.parametrize("argv,needle", [
    (["--set", "engine.page_size=abc"], "engine.cache.page_size"),
    (["--set", "quantization=int4"], "engine.quantization"),
    (["--set", "engine.nope=1"], "engine.nope"),
    (["--set", "nope=1"], "nope"),
    (["--set", "page_size"], "section.key=value"),
    (["--set", "engine.warmup=maybe"], "engine.warmup"),
    (["--config", "/does/not/exist.yaml"], "exist.yaml"),
])
def test_cli_errors_name_the_key(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        parse_config(argv)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_help_lists_every_field_with_its_doc(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name, (sec, f, _) in leaf_fields().items():
        assert (f"engine.{sec}.{name} (" if sec else f"engine.{name} (") in out, name
        assert f.metadata["doc"] in out, name
    for f in dataclasses.fields(ServerConfig):
        assert f"server.{f.name} (" in out, f.name
        assert f.metadata["doc"] in out, f.name


def test_print_config_round_trips(capsys, tmp_path):
    main(["--config", os.path.join(ROOT, "configs", "llama3-8b-gpu.yaml"), "--port", "9", "--print-config"])
    dumped = capsys.readouterr().out
    again = load_config(_write(tmp_path, dumped))
    assert again == load_config(os.path.join(ROOT, "configs", "llama3-8b-gpu.yaml"), {"server.port": 9})


@pytest.mark.timeout(60)
@pytest.mark.parametrize("key,value,words", [
    ("max_running_requests", 0, "'engine.scheduler.max_running_requests' must be >= 1"),
    ("page_size", 0, "'engine.cache.page_size' must be >= 1"),
    ("max_prefill_tokens", -5, "'engine.scheduler.max_prefill_tokens' must be >= 1"),
    ("prefill_block", 0, "'engine.shapes.prefill_block' must be >= 1"),
    ("max_context_len", 1, "'engine.cache.max_context_len' must be >= 2"),
    ("kv_memory_gb", 0.0, "'engine.cache.kv_memory_gb' must be > 0"),
    ("new_token_ratio", 1.5, "'engine.scheduler.new_token_ratio' must be in [0, 1]"),
    ("decode_buckets", [], "'engine.shapes.decode_buckets' must be a non-empty list"),
    ("decode_buckets", [1, 0, 4], "'engine.shapes.decode_buckets' must be a non-empty list of positive ints"),
    ("decode_buckets", [1, 2], "must reach engine.scheduler.max_running_requests=64"),
    ("prefill_block_buckets", [], "'engine.shapes.prefill_block_buckets'"),
    ("schedule_policy", "random", "'engine.scheduler.schedule_policy' must be one of lpm, dfs-weight, fcfs"),
    ("decode_row_fill", "more", "'engine.scheduler.decode_row_fill' must be one of"),
    ("dtype", "int8", "'engine.dtype' must be one of"),
    ("quantization", "int4", "'engine.quantization' must be one of none, int8, gguf; got 'int4'"),
    ("attention_backend", "cuda", "'engine.attention_backend' must be one of"),
    ("constraint_rows", 100, "multiple of 64"),
    ("constraint_slots", 0, "'engine.constraints.constraint_slots' must be >= 1"),
    ("max_constraint_seconds", 0.0, "'engine.constraints.max_constraint_seconds' must be > 0"),
    ("run_block", 1, "'engine.shapes.run_block' must be >= 2"),
    ("max_top_logprobs", -1, "'engine.sampling.max_top_logprobs' must be >= 0"),
    ("starvation_limit", -1, "'engine.scheduler.starvation_limit' must be >= 0"),
])
def test_out_of_range_engine_values_are_refused_by_name(key, value, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        EngineConfig.make(**{key: value})
    with pytest.raises(ConfigError, match=re.escape(words)):
        load_config(None, {f"engine.{key}": value})


@pytest.mark.timeout(60)
@pytest.mark.parametrize("key,value,words", [("port", 70000, "'server.port' must be in [0, 65535]"),
                                             ("log_level", "loud", "'server.log_level' must be one of"),
                                             ("max_body_bytes", 0, "'server.max_body_bytes' must be >= 1"),
                                             ("drain_timeout_s", 0.0, "'server.drain_timeout_s' must be > 0")])
def test_out_of_range_server_values_are_refused_by_name(key, value, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        ServerConfig(**{key: value})


@pytest.mark.timeout(60)
def test_engine_refuses_a_bad_config_before_loading_weights(tmp_path):
    from sgl_jax.engine import Engine

    missing = str(tmp_path / "no-such-model.gguf")  # a load would fail differently: the range check comes first
    with pytest.raises(ConfigError, match="max_running_requests"):
        Engine(model=missing, max_running_requests=0, progress=False)


@pytest.mark.timeout(30)
def test_compile_cache_dir_auto_follows_the_cache_root(monkeypatch, tmp_path):
    """`compile_cache_dir: auto` (the default) is jax_cache under the project's cache directory, which
    $SGL_JAX_CACHE and $XDG_CACHE_HOME move as they move the models; "" stays off; a path gets `~` expanded."""
    from sgl_jax.models.hub import compile_cache_path

    assert EngineConfig().compile_cache_dir == "auto"
    monkeypatch.delenv("SGL_JAX_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache_path("auto") == str(tmp_path / "xdg" / "sgl_jax" / "jax_cache")
    monkeypatch.setenv("SGL_JAX_CACHE", str(tmp_path / "root"))
    assert compile_cache_path("auto") == str(tmp_path / "root" / "jax_cache")
    assert compile_cache_path("") == ""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache_path("~/elsewhere") == str(tmp_path / "home" / "elsewhere")
