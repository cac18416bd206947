"""Typed configuration: nested frozen dataclasses, one per component, loaded from YAML presets in `configs/`.

    Config
      engine: EngineConfig          model, dtype, quantization, attention backend, seed, warm-up, compilation cache
        cache: CacheConfig          the KV page pool and the radix cache over it
        scheduler: SchedulerConfig  admission, batching, chunked prefill, decode-run sizing
        shapes: ShapeConfig         the compiled step shapes (the runner's ShapeGrid is built from it)
        sampling: SamplingConfig    static per-request limits of the sampling step
        constraints: ConstraintConfig  structured generation: device table sizes, compile limits
        parallel: ParallelConfig    tensor parallelism on a device mesh, one model across hosts
      server: ServerConfig          the HTTP server

Each field keeps one name from the YAML preset to the component that reads it (`prefill_block` is
`prefill_block` in the runner's grid, `max_running_requests` in the scheduler). Field names are unique
across the engine's sections, so `engine.page_size` is accepted as short for `engine.cache.page_size`
in presets, `--set` overrides and `Engine(page_size=...)` keyword arguments.

`load_config(path, overrides)` reads a YAML preset and type-checks every field: an unknown or ill-typed
key fails with an error naming it, and each section range-checks its values in `__post_init__` (before
any weight is loaded). Every field has a default and a one-line doc (the `doc` metadata), which
`python -m sgl_jax.serve --help` prints. No jax import here.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from sgl_jax.models.quant import QUANTIZATIONS  # numpy only, no jax


class ConfigError(ValueError):
    """A configuration key is unknown, ill-typed or out of range; the message names it."""


def _f(default, doc: str):
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata={"doc": doc})
    return dataclasses.field(default=default, metadata={"doc": doc})


def _section(cls, doc: str):
    return dataclasses.field(default_factory=cls, metadata={"doc": doc, "section": True})


def _choice(obj, key: str, allowed: tuple) -> None:
    v = getattr(obj, key)
    if v not in allowed:
        raise ConfigError(f"config key '{obj.WHERE}.{key}' must be one of {', '.join(allowed)}; got {v!r}")


def _at_least(obj, key: str, lo) -> None:
    v = getattr(obj, key)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v < lo:
        raise ConfigError(f"config key '{obj.WHERE}.{key}' must be >= {lo}, got {v!r}")


def _positive(obj, key: str) -> None:
    v = getattr(obj, key)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
        raise ConfigError(f"config key '{obj.WHERE}.{key}' must be > 0, got {v!r}")


def _buckets(obj, key: str, allow_empty: bool) -> None:
    v = getattr(obj, key)
    if not isinstance(v, (list, tuple)) or (not v and not allow_empty) or not all(
            isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in v):
        raise ConfigError(f"config key '{obj.WHERE}.{key}' must be a {'' if allow_empty else 'non-empty '}list of "
                          f"positive ints, got {v!r}")


DTYPES = ("float32", "bfloat16", "float16")
# the KV pool's: DTYPES and float8 (OCP e4m3fn / e5m2, unscaled; SGLang's and vLLM's spellings fp8_e4m3 / fp8_e5m2
# accepted): a quarter of float32's bytes a token, read by the CPU kernel as they are (pallas_kernels/cpu_attention.py)
KV_DTYPES = DTYPES + ("float8_e4m3fn", "float8_e5m2", "fp8_e4m3", "fp8_e5m2")


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """The KV page pool and the radix (prefix) cache over it."""

    WHERE: typing.ClassVar[str] = "engine.cache"
    page_size: int = _f(16, "tokens per KV page")
    kv_memory_gb: float = _f(1.0, "memory budget of the KV pool in GiB per device (the pool size derives from it; "
                             "with parallel.tp each device holds its KV heads' share)")
    max_num_pages: int = _f(0, "if > 0, caps the number of KV pages regardless of the budget")
    max_context_len: int = _f(4096, "longest prompt + output a request may have (capped by the model's limit)")
    disable_radix_cache: bool = _f(False, "turn prefix caching off (the ablation baseline)")
    host_memory_gb: float = _f(4.0, "host-memory tier of the prefix cache in GiB: pages evicted from the device "
                               "pool move there and are loaded back on a hit (0: off; reserved lazily, memory is "
                               "touched only as pages arrive)")
    disable_hierarchical_cache: bool = _f(False, "keep the cache in the device pool only (the ablation baseline)")
    disk_dir: str = _f("", "disk tier of the prefix cache: a directory (kept across restarts; '' = off; needs the "
                       "host tier): cached pages are written there (write_policy), and a miss reads runs of pages "
                       "back while the request waits in a loading state")
    write_policy: str = _f("write_through", "when the disk tier is written: write_through (every page once, the "
                           "step after it is computed: survives a crash, costs a write per new page) or write_back "
                           "(only pages leaving the host tier, and all of them at a clean shutdown: no writes while "
                           "the working set fits in memory, a crash loses what was only in memory)")
    disk_gb: float = _f(16.0, "byte budget of the disk tier in GiB (least recently used files go first)")
    kv_events_endpoint: str = _f("", "ZMQ endpoint publishing the cache's KV events (BlockStored / BlockRemoved, as "
                                 "vLLM and SGLang do; e.g. tcp://*:5557; '' = off; needs pyzmq, msgspec)")
    kv_events_topic: str = _f("kv-events", "topic frame of every KV event message")
    kv_events_replay_endpoint: str = _f("", "ZMQ ROUTER endpoint answering replay requests for missed KV event "
                                        "batches ('' = off)")

    def __post_init__(self):
        for key in ("page_size", "max_context_len"):
            _at_least(self, key, 1)
        _at_least(self, "max_context_len", 2)
        _at_least(self, "max_num_pages", 0)
        _positive(self, "kv_memory_gb")
        _at_least(self, "host_memory_gb", 0)
        _positive(self, "disk_gb")
        _choice(self, "write_policy", ("write_through", "write_back"))


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Admission, batching, chunked prefill and the sizing of multi-token decode runs."""

    WHERE: typing.ClassVar[str] = "engine.scheduler"
    max_running_requests: int = _f(64, "largest decode batch")
    max_prefill_tokens: int = _f(512, "token budget per step for prefill chunks (chunked prefill)")
    schedule_policy: str = _f("lpm", "lpm (longest prefix match, cache-aware) | dfs-weight | fcfs")
    starvation_limit: int = _f(64, "a waiting request is bypassed at most this many times by cache-aware ordering")
    new_token_ratio: float = _f(0.4, "fraction of max_new_tokens reserved in pages when admitting a request")
    decode_row_chunk: int = _f(32, "a request at most this many tokens from its end (after jump-forward, or admitted "
                               "with a cached prefix: a fork branch's suffix) computes them as decode rows "
                               "instead of a padded prefill block")
    suffix_row_chunk: int = _f(-1, "the same limit for prompt tokens only (a fork branch's or a chat turn's suffix "
                               "after a cached prefix), where a padded prefill block may be the cheaper layout "
                               "for fewer tokens than jump-forward runs; -1: decode_row_chunk")
    decode_row_fill: str = _f("auto", "auto | fit | pad: whether multi-token decode runs (jump-forward) may grow a step "
                              "to a larger decode bucket. pad: always (a memory-bound step pays little per row); "
                              "fit: never, they fill spare rows only (a compute-bound CPU pays every row); auto: "
                              "per step, the run blocks and decode bucket with the most real tokens per second, by "
                              "step costs timed at warm-up (saved beside the compilation cache)")
    check_integrity_when_idle: bool = _f(False, "run the cache integrity check whenever the engine goes idle")

    def __post_init__(self):
        for key in ("max_running_requests", "max_prefill_tokens"):
            _at_least(self, key, 1)
        for key in ("starvation_limit", "decode_row_chunk"):
            _at_least(self, key, 0)
        _at_least(self, "suffix_row_chunk", -1)
        _choice(self, "schedule_policy", ("lpm", "dfs-weight", "fcfs"))
        _choice(self, "decode_row_fill", ("auto", "fit", "pad"))
        if not 0 <= self.new_token_ratio <= 1:
            raise ConfigError(f"config key '{self.WHERE}.new_token_ratio' must be in [0, 1], got {self.new_token_ratio}")


@dataclasses.dataclass(frozen=True)
class ShapeConfig:
    """The step shapes compiled at start-up; the runner's ShapeGrid is built from these (same names)."""

    WHERE: typing.ClassVar[str] = "engine.shapes"
    prefill_block: int = _f(64, "query block size of prefill rows in the attention layout")
    prefill_block_buckets: list = _f([1, 2, 4, 8], "prefill-block counts the step is compiled for")
    decode_buckets: list = _f([1, 2, 4, 8, 16, 32, 64], "decode-row counts the step is compiled for")
    max_mixed_blocks: int = _f(2, "prefill blocks that may share a step with decodes (more: a prefill-only step)")
    run_block: int = _f(8, "query tokens per run block: a multi-token decode run (jump-forward) that gathers its "
                        "pages once instead of once per token")
    run_block_buckets: list = _f([1], "run-block counts a decode step is compiled for ([] = runs go as decode rows)")
    page_width_buckets: list = _f([], "pages-per-row widths compiled for; empty = powers of two up to the context")
    background_compile: bool = _f(False, "at start-up compile only the shapes a first request needs (prefills and one "
                                  "decode row, every width), serve, and compile the rest in a background thread")
    full_logit_rows: int = _f(128, "logits rows of a prompt-logprob step (a request's prompt logprobs past them "
                              "continue in the next step; 0 = every token of the step): rows no chunk asks for "
                              "are not computed, and at SmolLM2's 49k vocabulary 128 rows of float32 logits stay "
                              "under glibc's 32 MB mmap threshold (larger arrays are faulted in afresh each step)")

    def __post_init__(self):
        _at_least(self, "prefill_block", 1)
        _at_least(self, "max_mixed_blocks", 0)
        for key in ("decode_buckets", "prefill_block_buckets"):
            _buckets(self, key, allow_empty=False)
        if self.full_logit_rows and self.full_logit_rows < max(self.prefill_block_buckets):
            raise ConfigError(f"config key '{self.WHERE}.full_logit_rows' must be 0 or >= the largest prefill block "
                              f"bucket ({max(self.prefill_block_buckets)}: one row per chunk), got "
                              f"{self.full_logit_rows}")
        for key in ("page_width_buckets", "run_block_buckets"):
            _buckets(self, key, allow_empty=True)
        if self.run_block_buckets and self.run_block < 2:
            raise ConfigError(f"config key '{self.WHERE}.run_block' must be >= 2 while run_block_buckets is "
                              f"non-empty, got {self.run_block}")

    @property
    def max_prefill_blocks(self) -> int:
        return max(self.prefill_block_buckets)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Static per-request limits of the compiled sampling step (requests beyond them get a 400)."""

    WHERE: typing.ClassVar[str] = "engine.sampling"
    max_top_logprobs: int = _f(20, "largest top_logprobs_num served (compiled as a static size)")
    max_logit_bias: int = _f(64, "most logit_bias entries a request may give (more: a 400, never cut); >= 1, the "
                             "step's static bias width")
    max_stop_token_ids: int = _f(16, "most stop_token_ids a request may give (more: a 400); >= 0. Until "
                                 "min_new_tokens is reached they and the model's EOS ids are masked on the device, "
                                 "in slots of their own (never taking logit_bias slots)")

    def __post_init__(self):
        _at_least(self, "max_top_logprobs", 0)
        _at_least(self, "max_logit_bias", 1)
        _at_least(self, "max_stop_token_ids", 0)


@dataclasses.dataclass(frozen=True)
class ConstraintConfig:
    """Structured generation: the on-device constraint table and the compile limits."""

    WHERE: typing.ClassVar[str] = "engine.constraints"
    disable_jump_forward: bool = _f(False, "structured generation: emit forced runs one token at a time")
    constraint_rows: int = _f(4096, "FSM states the on-device constraint table holds (all active constraints)")
    constraint_classes: int = _f(512, "token equivalence classes per constraint the device table holds")
    constraint_slots: int = _f(16, "distinct constraints resident on the device at once")
    max_constraint_states: int = _f(10000, "compile limit: larger regexes/schemas are rejected with an error")
    max_constraint_seconds: float = _f(20.0, "compile limit in seconds per constraint")
    json_whitespace: str = _f("", "JSON schema whitespace regex between tokens; empty = compact (longest forced runs)")

    def __post_init__(self):
        for key in ("constraint_rows", "constraint_classes", "constraint_slots", "max_constraint_states"):
            _at_least(self, key, 1)
        _positive(self, "max_constraint_seconds")
        if self.constraint_rows % 64:
            raise ConfigError(f"config key '{self.WHERE}.constraint_rows' must be a multiple of 64 (the upload "
                              f"block), got {self.constraint_rows}")


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """Tensor parallelism over a device mesh (sgl_jax/parallel/tp.py) and one model across hosts
    (sgl_jax/parallel/multihost.py)."""

    WHERE: typing.ClassVar[str] = "engine.parallel"
    tp: int = _f(1, "tensor-parallel degree: devices the model is sharded over (attention heads, MLP hidden, vocabulary, "
                 "KV pool by KV heads; see BUILD.md); 1 = one device. On CPU, simulated devices: "
                 "XLA_FLAGS=--xla_force_host_platform_device_count=N")
    dist_init_addr: str = _f("", "multi-host: host:port of rank 0's jax.distributed coordinator ('' = one host)")
    nnodes: int = _f(1, "multi-host: number of processes (hosts) serving the one model")
    node_rank: int = _f(0, "multi-host: this process's rank; rank 0 owns the scheduler, the radix cache and HTTP")
    dist_timeout_s: float = _f(10.0, "multi-host: a rank silent this long (no step acknowledged) is declared failed")

    def __post_init__(self):
        for key in ("tp", "nnodes"):
            _at_least(self, key, 1)
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"config key '{self.WHERE}.node_rank' must be in [0, nnodes={self.nnodes}), "
                              f"got {self.node_rank}")
        if self.nnodes > 1 and not self.dist_init_addr:
            raise ConfigError(f"config key '{self.WHERE}.dist_init_addr' (host:port of rank 0) is required when "
                              f"nnodes={self.nnodes} > 1")
        _positive(self, "dist_timeout_s")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """The runtime: model and dtypes at the top, one section per component."""

    WHERE: typing.ClassVar[str] = "engine"
    model: str = _f("smollm2-135m", "model name (see sgl_jax.models.hub), a .gguf file or a Hugging Face directory")
    dtype: str = _f("float32", "parameter/activation dtype: float32 or bfloat16 (float32 on CPU: no native bf16 math)")
    kv_dtype: str = _f("", "KV pool dtype; empty = same as dtype. float16 / bfloat16 halve its bytes (SmolLM2's "
                       "logits move by up to 0.02 / 0.27); float8_e4m3fn (fp8_e4m3) / float8_e5m2 (fp8_e5m2) quarter "
                       "them, unscaled, the model's writes clamped to the format's range: logits move by up to 3.6 / "
                       "6.1, mean 0.42 / 0.65, greedy tokens differ at ~6 % of positions (tests/test_quant.py). "
                       "float8 pools run on the CPU (native kernel or jnp); the Pallas kernels take float32 / "
                       "bfloat16")
    quantization: str = _f("none", "none | int8: int8 weight-only, one f32 scale per output channel, for every "
                           "linear, the LM head and a tied embedding (sgl_jax/models/quant.py): 1/4 of the "
                           "float32 weight bytes; logits move (SmolLM2: by up to ~1.4) | gguf: a GGUF's Q4_1 "
                           "linears kept in the file's blocks (the CPU's native kernel), the rest as int8; one "
                           "device only")
    attention_backend: str = _f("auto", "auto | jnp | cpu_native | pallas_tpu | pallas_gpu (auto: Pallas on TPU/GPU, the native kernel on CPU, else jnp)")
    attention_math: str = _f("float32", "float32 | bfloat16: the native CPU attention's prefill-chunk dot products "
                             "(q.k, p.v), and those over pages read by many queries at once (a cached prefix, a fork's "
                             "branches' prompt) in bfloat16 pairs with float32 sums where the CPU has AVX512-BF16, "
                             "~1.7x / ~1.2-2x faster; SmolLM2's logits move by up to ~0.35 "
                             "(pallas_kernels/cpu_attention.py). No effect elsewhere")
    pack_weights: bool = _f(True, "CPU, float32 compute: weight matrices stored panel-packed [out/16, in, 16] for the "
                            "native matmul (sgl_jax/models/packing.py), every step's linears and LM head through "
                            "it; no effect on TPU/GPU or without a C++ compiler")
    retain_freed_memory: bool = _f(True, "CPU: glibc keeps the memory a step frees in the process (no trim, blocks "
                                   "up to 1 GiB from its heaps, per-thread heaps kept) so each step reuses its "
                                   "buffers' pages instead of faulting fresh ones (sgl_jax/engine/host_memory.py); "
                                   "resident memory stays at its peak. Process-wide once set; no effect off glibc "
                                   "or on TPU/GPU")
    seed: int = _f(0, "default sampling seed for requests that give none")
    warmup: bool = _f(True, "compile every step shape at start-up")
    compile_cache_dir: str = _f("auto", "persistent JAX compilation cache and compiled-step store directory: 'auto' "
                                "= jax_cache under the project's cache directory ($SGL_JAX_CACHE, else "
                                "$XDG_CACHE_HOME/sgl_jax, else ~/.cache/sgl_jax); '' = off")
    cache: CacheConfig = _section(CacheConfig, "the KV page pool and the radix cache")
    scheduler: SchedulerConfig = _section(SchedulerConfig, "admission, batching, chunked prefill")
    shapes: ShapeConfig = _section(ShapeConfig, "compiled step shapes")
    sampling: SamplingConfig = _section(SamplingConfig, "static sampling limits")
    constraints: ConstraintConfig = _section(ConstraintConfig, "structured generation")
    parallel: ParallelConfig = _section(ParallelConfig, "tensor parallelism and multi-host")

    def __post_init__(self):
        """Range checks across sections (each section checks its own), before any weight is loaded."""
        _choice(self, "dtype", DTYPES)
        if self.kv_dtype:
            _choice(self, "kv_dtype", KV_DTYPES)
        _choice(self, "quantization", QUANTIZATIONS)
        if self.quantization == "gguf" and self.parallel.tp > 1:
            raise ConfigError("config key 'engine.quantization' gguf keeps Q4_1 blocks, which run on one device; "
                              f"with engine.parallel.tp={self.parallel.tp} use int8")
        _choice(self, "attention_backend", ("auto", "jnp", "cpu_native", "pallas_tpu", "pallas_gpu"))
        _choice(self, "attention_math", ("float32", "bfloat16"))  # sgl_jax.models.attention.ATTENTION_MATH
        if max(self.shapes.decode_buckets) < self.scheduler.max_running_requests:
            raise ConfigError(f"config key 'engine.shapes.decode_buckets' {self.shapes.decode_buckets} must reach "
                              f"engine.scheduler.max_running_requests={self.scheduler.max_running_requests}")

    @classmethod
    def make(cls, **values) -> "EngineConfig":
        """From keyword arguments: flat field names (`page_size=4`) or section mappings (`cache={...}`)."""
        return build(cls, values, "engine")

    def replace(self, **values) -> "EngineConfig":
        """A copy with some fields changed (flat names or section mappings, as in `make`)."""
        return build(EngineConfig, _merge(dataclasses.asdict(self), _nest(EngineConfig, values, "engine")), "engine")

    @property
    def effective_kv_dtype(self) -> str:
        return self.kv_dtype or self.dtype


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """The HTTP server."""

    WHERE: typing.ClassVar[str] = "server"

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
        _choice(self, "log_level", ("debug", "info", "warning", "error", "critical"))
        _at_least(self, "max_body_bytes", 1)
        for key in ("drain_timeout_s", "health_generate_timeout_s"):
            _positive(self, key)


@dataclasses.dataclass(frozen=True)
class Config:
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    server: ServerConfig = dataclasses.field(default_factory=ServerConfig)


def _sections(cls) -> dict[str, type]:
    return {f.name: f.default_factory for f in dataclasses.fields(cls) if f.metadata.get("section")}


def leaf_fields(cls=None) -> dict[str, tuple[str, dataclasses.Field, Any]]:
    """Every engine field by its (unique) name -> (section name or '', the field, its type)."""
    cls = cls or EngineConfig
    out = {}
    for sec, sub in [("", cls)] + list(_sections(cls).items()):
        hints = typing.get_type_hints(sub)
        for f in dataclasses.fields(sub):
            if not f.metadata.get("section"):
                assert f.name not in out, f"config field {f.name} is not unique"
                out[f.name] = (sec, f, hints[f.name])
    return out


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _nest(cls, values: dict, where: str) -> dict:
    """values with flat keys moved into their sections (flat keys win over the same key in a section)."""
    if not isinstance(values, dict):
        raise ConfigError(f"config section {where!r} must be a mapping, got {values!r}")
    sections = _sections(cls)
    if not sections:
        known = [f.name for f in dataclasses.fields(cls)]
        for k in values:
            if k not in known:
                raise ConfigError(f"unknown config key '{where}.{k}'; known keys: {', '.join(sorted(known))}")
        return dict(values)
    leaves = leaf_fields(cls)
    nested: dict = {}
    flat = []
    for k, v in values.items():
        if k in sections:
            if dataclasses.is_dataclass(v):
                v = dataclasses.asdict(v)
            if not isinstance(v, dict):
                raise ConfigError(f"config section '{where}.{k}' must be a mapping of keys to values, got {v!r}")
            for name in v:
                if name not in {f.name for f in dataclasses.fields(sections[k])}:
                    raise ConfigError(f"unknown config key '{where}.{k}.{name}'; known keys: "
                                      f"{', '.join(f.name for f in dataclasses.fields(sections[k]))}")
            nested[k] = _merge(nested.get(k, {}), v)
        elif k in leaves:
            flat.append((k, v))
        else:
            raise ConfigError(f"unknown config key '{where}.{k}'; known keys: {', '.join(sorted(leaves))} "
                              f"(or within sections: {', '.join(sections)})")
    for k, v in flat:
        sec = leaves[k][0]
        if sec:
            nested.setdefault(sec, {})[k] = v
        else:
            nested[k] = v
    return nested


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
    """Instantiate dataclass `cls` from a dict, rejecting unknown or ill-typed keys by name.

    Sections may be given as mappings or, for the engine, by their fields' flat names."""
    where = section or cls.__name__
    values = _nest(cls, values, where)
    hints = typing.get_type_hints(cls)
    sections = _sections(cls)
    kwargs = {}
    for k, v in values.items():
        if k in sections:
            kwargs[k] = build(sections[k], v, f"{where}.{k}")
        else:
            kwargs[k] = _check_type(where, k, hints[k], v)
    return cls(**kwargs)


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

    Override keys are `engine.section.key`, `engine.key` (a unique field name), `server.key`, or a bare
    key that exists in exactly one of engine and server.
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
    eng = _nest(EngineConfig, dict(raw.get("engine") or {}), "engine")
    srv = dict(raw.get("server") or {})
    for key, value in (overrides or {}).items():
        section, path_ = resolve_key(key)
        if section == "server":
            srv[path_[-1]] = value
        else:
            eng = _merge(eng, _nest(EngineConfig, {path_[-1]: value}, "engine"))
    return Config(build(EngineConfig, eng, "engine"), build(ServerConfig, srv, "server"))


def resolve_key(key: str) -> tuple[str, tuple[str, ...]]:
    """'engine.cache.page_size' | 'engine.page_size' | 'page_size' | 'server.port' | 'port' ->
    ('engine', ('cache', 'page_size')) / ('server', ('port',)); ConfigError if unknown or ambiguous."""
    parts = key.split(".")
    leaves = leaf_fields()
    server = {f.name for f in dataclasses.fields(ServerConfig)}
    if parts[0] in ("engine", "server"):
        section, rest = parts[0], parts[1:]
    elif parts[0] in _sections(EngineConfig):
        section, rest = "engine", parts
    else:
        cands = [s for s, ok in (("engine", parts[-1] in leaves), ("server", parts[-1] in server)) if ok]
        if len(parts) != 1 or len(cands) != 1:
            raise ConfigError(f"unknown config key {key!r}")
        section, rest = cands[0], parts
    if section == "server":
        if len(rest) != 1 or rest[0] not in server:
            raise ConfigError(f"unknown config key {key!r}; known server keys: {', '.join(sorted(server))}")
        return "server", (rest[0],)
    if not rest or rest[-1] not in leaves or len(rest) > 2 or (len(rest) == 2 and leaves[rest[-1]][0] != rest[0]):
        raise ConfigError(f"unknown config key {key!r}; see --help for the list")
    sec = leaves[rest[-1]][0]
    return "engine", ((sec, rest[-1]) if sec else (rest[-1],))
