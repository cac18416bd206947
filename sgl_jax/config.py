"""Typed configuration: one frozen dataclass per component, loaded from YAML presets in `configs/`.

`load_config(path, overrides)` reads a YAML file whose top-level sections are `engine:` and `server:`,
applies `key=value` / `section.key=value` overrides, and type-checks every field: an unknown or
ill-typed key fails with an error naming it. Every field has a default and a one-line doc (the
`doc` metadata), which `python -m sgl_jax.serve --help` prints. No jax import here.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A configuration key is unknown, ill-typed or out of range; the message names it."""


def _f(default, doc: str):
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata={"doc": doc})
    return dataclasses.field(default=default, metadata={"doc": doc})


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """The runtime: model, KV pool, scheduler, compiled shapes."""

    model: str = _f("smollm2-135m", "model name (see sgl_jax.models.hub), a .gguf file or a Hugging Face directory")
    dtype: str = _f("float32", "parameter/activation dtype: float32 or bfloat16 (float32 on CPU: no native bf16 math)")
    kv_dtype: str = _f("", "KV pool dtype; empty = same as dtype")
    attention_backend: str = _f("auto", "auto | jnp | pallas_tpu | pallas_gpu (auto: Pallas on TPU/GPU, jnp on CPU)")
    page_size: int = _f(16, "tokens per KV page")
    kv_memory_gb: float = _f(1.0, "memory budget of the KV pool in GiB (the pool size derives from it)")
    max_num_pages: int = _f(0, "if > 0, caps the number of KV pages regardless of the budget")
    max_context_len: int = _f(4096, "longest prompt + output a request may have (capped by the model's limit)")
    max_running_requests: int = _f(64, "largest decode batch")
    max_prefill_tokens: int = _f(512, "token budget per step for prefill chunks (chunked prefill)")
    prefill_block: int = _f(64, "query block size of prefill rows in the attention layout")
    schedule_policy: str = _f("lpm", "lpm (longest prefix match, cache-aware) | dfs-weight | fcfs")
    starvation_limit: int = _f(64, "a waiting request is bypassed at most this many times by cache-aware ordering")
    disable_radix_cache: bool = _f(False, "turn prefix caching off (the ablation baseline)")
    new_token_ratio: float = _f(0.4, "fraction of max_new_tokens reserved in pages when admitting a request")
    decode_buckets: list = _f([1, 2, 4, 8, 16, 32, 64], "decode-row counts the step is compiled for")
    prefill_block_buckets: list = _f([1, 2, 4, 8], "prefill-block counts the step is compiled for")
    max_mixed_blocks: int = _f(2, "prefill blocks that may share a step with decodes (more: a prefill-only step)")
    decode_row_chunk: int = _f(32, "a request at most this many tokens from its end (e.g. after jump-forward) "
                               "computes them as decode rows instead of a padded prefill block")
    run_block: int = _f(8, "query tokens per run block: a multi-token decode run (jump-forward) that gathers its "
                        "pages once instead of once per token")
    run_block_buckets: list = _f([1], "run-block counts a decode step is compiled for ([] = runs go as decode rows)")
    decode_row_fill: str = _f("auto", "auto | fit | pad: whether multi-token decode runs (jump-forward) may grow a step "
                              "to a larger decode bucket. pad: always (a memory-bound step pays little per row); "
                              "fit: never, they fill spare rows only (a compute-bound CPU pays every row); auto: "
                              "per step, the run blocks and decode bucket with the most real tokens per second, by "
                              "step costs timed at warm-up (saved beside the compilation cache)")
    page_width_buckets: list = _f([], "pages-per-row widths compiled for; empty = powers of two up to the context")
    max_top_logprobs: int = _f(20, "largest top_logprobs_num served (compiled as a static size)")
    max_logit_bias: int = _f(64, "most logit_bias entries a request may give (more: a 400, never cut); >= 1, the "
                             "step's static bias width")
    max_stop_token_ids: int = _f(16, "most stop_token_ids a request may give (more: a 400); >= 0. Until "
                                 "min_new_tokens is reached they and the model's EOS ids are masked on the device, "
                                 "in slots of their own (never taking logit_bias slots)")
    compile_cache_dir: str = _f("~/.cache/sgl_jax/jax_cache", "persistent JAX compilation cache directory ('' = off)")
    warmup: bool = _f(True, "compile every step shape at start-up")
    seed: int = _f(0, "default sampling seed for requests that give none")
    check_integrity_when_idle: bool = _f(False, "run the cache integrity check whenever the engine goes idle")
    disable_jump_forward: bool = _f(False, "structured generation: emit forced runs one token at a time")
    constraint_rows: int = _f(4096, "FSM states the on-device constraint table holds (all active constraints)")
    constraint_classes: int = _f(512, "token equivalence classes per constraint the device table holds")
    constraint_slots: int = _f(16, "distinct constraints resident on the device at once")
    max_constraint_states: int = _f(10000, "compile limit: larger regexes/schemas are rejected with an error")
    max_constraint_seconds: float = _f(20.0, "compile limit in seconds per constraint")
    json_whitespace: str = _f("", "JSON schema whitespace regex between tokens; empty = compact (longest forced runs)")

    def __post_init__(self):
        """Range checks, before any weight is loaded; each error names the key and the allowed range."""
        _choice(self, "dtype", ("float32", "bfloat16", "float16"))
        if self.kv_dtype:
            _choice(self, "kv_dtype", ("float32", "bfloat16", "float16"))
        _choice(self, "attention_backend", ("auto", "jnp", "pallas_tpu", "pallas_gpu"))
        _choice(self, "schedule_policy", ("lpm", "dfs-weight", "fcfs"))
        _choice(self, "decode_row_fill", ("auto", "fit", "pad"))
        for key in ("page_size", "max_context_len", "max_running_requests", "max_prefill_tokens", "prefill_block",
                    "max_top_logprobs", "constraint_rows", "constraint_classes", "constraint_slots",
                    "max_constraint_states"):
            _at_least(self, key, 0 if key == "max_top_logprobs" else 1)
        for key in ("max_num_pages", "starvation_limit", "max_mixed_blocks", "decode_row_chunk"):
            _at_least(self, key, 0)
        _at_least(self, "max_context_len", 2)
        if not self.kv_memory_gb > 0:
            raise ConfigError(f"config key 'engine.kv_memory_gb' must be > 0, got {self.kv_memory_gb}")
        if not 0 <= self.new_token_ratio <= 1:
            raise ConfigError(f"config key 'engine.new_token_ratio' must be in [0, 1], got {self.new_token_ratio}")
        if not self.max_constraint_seconds > 0:
            raise ConfigError(f"config key 'engine.max_constraint_seconds' must be > 0, "
                              f"got {self.max_constraint_seconds}")
        for key in ("decode_buckets", "prefill_block_buckets"):
            _buckets(self, key, allow_empty=False)
        _buckets(self, "page_width_buckets", allow_empty=True)
        _buckets(self, "run_block_buckets", allow_empty=True)
        if max(self.decode_buckets) < self.max_running_requests:
            raise ConfigError(f"config key 'engine.decode_buckets' {self.decode_buckets} must reach "
                              f"max_running_requests={self.max_running_requests}")
        if self.run_block_buckets and self.run_block < 2:
            raise ConfigError(f"config key 'engine.run_block' must be >= 2 while run_block_buckets is non-empty, "
                              f"got {self.run_block}")
        if self.constraint_rows % 64:
            raise ConfigError(f"config key 'engine.constraint_rows' must be a multiple of 64 (the upload block), "
                              f"got {self.constraint_rows}")
        _at_least(self, "max_logit_bias", 1)
        _at_least(self, "max_stop_token_ids", 0)


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """The HTTP server."""

    host: str = _f("127.0.0.1", "address to bind; loopback unless told otherwise")
    port: int = _f(30000, "TCP port")
    api_key: str = _f("", "if set, every route but /health requires 'Authorization: Bearer <key>'")
    log_level: str = _f("info", "debug | info | warning | error")
    max_body_bytes: int = _f(8 * 1024 * 1024, "largest accepted request body")
    served_model_name: str = _f("", "model name reported by /v1/models; empty = the model path")
    drain_timeout_s: float = _f(30.0, "on SIGINT/SIGTERM, how long in-flight requests may run before they are aborted")
    health_generate_timeout_s: float = _f(30.0, "/health_generate answers 503 if no token arrives within this time")

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"config key 'server.port' must be in [0, 65535], got {self.port}")
        _choice(self, "log_level", ("debug", "info", "warning", "error", "critical"), "server")
        _at_least(self, "max_body_bytes", 1, "server")
        for key in ("drain_timeout_s", "health_generate_timeout_s"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"config key 'server.{key}' must be > 0, got {getattr(self, key)}")


@dataclasses.dataclass(frozen=True)
class Config:
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    server: ServerConfig = dataclasses.field(default_factory=ServerConfig)


def _choice(obj, key: str, allowed: tuple, section: str = "engine") -> None:
    v = getattr(obj, key)
    if v not in allowed:
        raise ConfigError(f"config key '{section}.{key}' must be one of {', '.join(allowed)}; got {v!r}")


def _at_least(obj, key: str, lo: int, section: str = "engine") -> None:
    v = getattr(obj, key)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v < lo:
        raise ConfigError(f"config key '{section}.{key}' must be >= {lo}, got {v!r}")


def _buckets(obj, key: str, allow_empty: bool) -> None:
    v = getattr(obj, key)
    if not isinstance(v, (list, tuple)) or (not v and not allow_empty) or not all(
            isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in v):
        raise ConfigError(f"config key 'engine.{key}' must be a {'' if allow_empty else 'non-empty '}list of "
                          f"positive ints, got {v!r}")


def _check_type(section: str, name: str, tp, value):
    where = f"{section}.{name}" if section else name
    origin = typing.get_origin(tp)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {where!r} must be a bool, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {where!r} must be an int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {where!r} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {where!r} must be a string, got {value!r}")
        return value
    if tp is list or origin is list:
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"config key {where!r} must be a list of ints, got {value!r}")
        return list(value)
    if origin in (typing.Union, types.UnionType):
        return value
    return value


def build(cls, values: dict[str, Any], section: str = ""):
    """Instantiate dataclass `cls` from a dict, rejecting unknown or ill-typed keys by name."""
    if not isinstance(values, dict):
        raise ConfigError(f"config section {section or cls.__name__!r} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    for k in values:
        if k not in fields:
            where = f"{section}.{k}" if section else k
            raise ConfigError(f"unknown config key {where!r}; known keys: {', '.join(sorted(fields))}")
    return cls(**{k: _check_type(section, k, hints[k], v) for k, v in values.items()})


def parse_value(text: str, tp):
    """Parse a command-line override string into the field's type."""
    if tp is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"expected a bool, got {text!r}")
    if tp is int:
        return int(text)
    if tp is float:
        return float(text)
    if tp is list or typing.get_origin(tp) is list:
        return [int(x) for x in text.split(",") if x.strip()]
    return text


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Config from a YAML preset (sections `engine:` and `server:`) plus overrides.

    Override keys are `section.key` or a bare key that exists in exactly one section.
    """
    import yaml

    raw: dict[str, Any] = {}
    if path:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping with 'engine' and 'server' sections")
    for k in raw:
        if k not in ("engine", "server"):
            raise ConfigError(f"{path}: unknown config section {k!r}; expected 'engine' or 'server'")
    for section in ("engine", "server"):
        if not isinstance(raw.get(section) or {}, dict):
            raise ConfigError(f"{path}: config section {section!r} must be a mapping of keys to values, "
                              f"got {raw[section]!r}")
    eng = dict(raw.get("engine") or {})
    srv = dict(raw.get("server") or {})
    e_fields = {f.name for f in dataclasses.fields(EngineConfig)}
    s_fields = {f.name for f in dataclasses.fields(ServerConfig)}
    for key, value in (overrides or {}).items():
        section, _, name = key.rpartition(".")
        if not section:
            section = "engine" if name in e_fields else "server" if name in s_fields else ""
        target = {"engine": eng, "server": srv}.get(section)
        if target is None:
            raise ConfigError(f"unknown config key {key!r}")
        target[name] = value
    return Config(build(EngineConfig, eng, "engine"), build(ServerConfig, srv, "server"))
