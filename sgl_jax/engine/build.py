"""Building the engine's parts from an EngineConfig: model, device runner, page pool, radix cache,
scheduler; compiling the step shapes and timing them. The only module of the engine package that
imports jax (through the runner); everything it returns is owned by the engine loop afterwards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time

from sgl_jax.config import EngineConfig
from sgl_jax.models.hub import compile_cache_path

log = logging.getLogger("sgl_jax.engine")


@dataclasses.dataclass
class Runtime:
    """What `build_runtime` made."""

    model_path: str
    model_config: object
    tokenizer: object
    vocab_size: int  # the tokenizer's ids; embedding rows past it are padding (masked on the device)
    runner: object
    allocator: object
    cache: object
    scheduler: object
    max_context_len: int
    load_seconds: float
    compile_seconds: float
    warmup_compiles: int
    channel: object = None  # multi-host: rank 0's StepChannel (also runner.channel), another rank's socket to it


def default_widths(max_pages: int, page_size: int) -> list[int]:
    """Page-table widths to compile: 256 tokens, then x4, up to the context length."""
    w = max(1, math.ceil(256 / page_size))
    out = []
    while w < max_pages:
        out.append(w)
        w *= 4
    out.append(max_pages)
    return out


def _start_parallel(c: EngineConfig):
    """(multi-host channel or None, the loader's placement or None, the list that receives the TPLayout).

    Multi-host: jax.distributed first, before anything runs on a device, then rank 0's StepChannel or another rank's
    connection to it (sgl_jax/parallel/multihost.py). Tensor parallel: the layout is planned once the loader has read
    the model's config, and every tensor is placed on the mesh as it is loaded (sgl_jax/parallel/tp.py)."""
    channel = None
    if c.parallel.nnodes > 1:
        from sgl_jax.parallel import multihost

        multihost.initialize(c.parallel)
        channel = multihost.StepChannel(c.parallel) if c.parallel.node_rank == 0 else multihost.connect(c.parallel)
    layouts: list = []

    def placement(cfg):
        from sgl_jax.parallel import tp

        layouts.append(tp.TPLayout.plan(cfg, tp.make_mesh(c.parallel.tp)))
        log.info("tensor parallel: %s", layouts[0].describe())
        return layouts[0].place

    return channel, (placement if c.parallel.tp > 1 else None), layouts


def build_runtime(c: EngineConfig, progress: bool = True) -> Runtime:
    """Load the model and make every part from the config's sections (the same names all the way). Long
    because it is the one place where the parts meet, in the order they need each other."""
    import jax

    from sgl_jax.cache import PageAllocator, RadixCache
    from sgl_jax.models.loader import canonical_dtype, load_model
    from sgl_jax.runner import ModelRunner, enable_compilation_cache
    from sgl_jax.scheduler import Scheduler
    from sgl_jax.shapes import ShapeGrid

    kv, sh = c.cache, c.shapes
    compile_dir = compile_cache_path(c.compile_cache_dir)
    enable_compilation_cache(compile_dir)
    channel, placement, layouts = _start_parallel(c)
    t0 = time.perf_counter()
    loaded = load_model(c.model, c.dtype, progress=progress, quantization=c.quantization, placement=placement)
    load_seconds = time.perf_counter() - t0
    layout = layouts[0] if layouts else None
    mc = loaded.config if layout is None else layout.model_config(loaded.config)  # KV heads as stored
    dtype = canonical_dtype(c.dtype)
    kv_dtype = canonical_dtype(c.effective_kv_dtype, kv=True)
    max_context_len = min(kv.max_context_len, mc.max_position_embeddings)
    page_bytes = mc.kv_bytes_per_token(jax.numpy.dtype(kv_dtype).itemsize) * kv.page_size
    if layout is not None:  # kv_memory_gb is per device; a device holds its KV heads' share of each page
        page_bytes = max(1, int(page_bytes * layout.kv_fraction()))
    num_pages = int(kv.kv_memory_gb * (1 << 30)) // page_bytes + 1
    if kv.max_num_pages > 0:
        num_pages = min(num_pages, kv.max_num_pages)
    max_pages_per_seq = math.ceil(max_context_len / kv.page_size)
    if num_pages - 1 < max_pages_per_seq:
        raise ValueError(f"the KV pool ({num_pages - 1} pages of {kv.page_size} tokens, kv_memory_gb="
                         f"{kv.kv_memory_gb}) cannot hold one request of max_context_len={max_context_len}")
    widths = list(sh.page_width_buckets) or default_widths(max_pages_per_seq, kv.page_size)
    if max(widths) < max_pages_per_seq:
        raise ValueError(f"page_width_buckets {widths} cannot cover max_context_len={max_context_len} "
                         f"({max_pages_per_seq} pages)")
    grid = ShapeGrid.from_config(sh, kv.page_size, widths)
    params = loaded.params
    if c.pack_weights and layout is None:  # (a mesh: the plain layout, XLA's SPMD partitioner splits it)
        from sgl_jax.models import packing

        if packing.packs_here(dtype):  # else the plain layout stays
            params = loaded.params = packing.pack_params(params, mc.tie_word_embeddings)  # the plain copy freed
    runner = ModelRunner(
        mc, params, dtype=dtype, kv_dtype=kv_dtype, num_pages=num_pages, grid=grid,
        max_running_requests=c.scheduler.max_running_requests, max_top_logprobs=c.sampling.max_top_logprobs,
        attention_backend=c.attention_backend, attention_math=c.attention_math,
        constraint_rows=c.constraints.constraint_rows,
        constraint_classes=c.constraints.constraint_classes, constraint_slots=c.constraints.constraint_slots,
        valid_vocab=loaded.vocab_size, max_logit_bias=c.sampling.max_logit_bias,
        max_suppress=c.sampling.max_stop_token_ids + len(loaded.tokenizer.stop_token_ids),
        executable_dir=os.path.join(compile_dir, "executables") if compile_dir else "", layout=layout)
    if c.retain_freed_memory and runner.platform == "cpu":  # after the weights' load, before any step runs
        from sgl_jax.engine.host_memory import retain_freed_memory

        retain_freed_memory()
    allocator = PageAllocator(num_pages, reserved=1)
    if c.parallel.node_rank == 0 and channel is not None:
        runner.channel = channel  # every device operation from here on reaches the other ranks first
    host = _host_pool(c, runner)
    cache = RadixCache(allocator, kv.page_size, disabled=kv.disable_radix_cache, host=host)
    scheduler = Scheduler(cache, c.scheduler, runner.grid, max_context_len)
    if host is not None and kv.disk_dir:
        from sgl_jax.cache.disk_store import DiskStore
        from sgl_jax.cache.disk_tier import DiskTier

        # what a page's K/V depends on besides its tokens: the weights and how they and the pool are stored
        st = os.stat(loaded.path) if os.path.isfile(loaded.path) else None
        fingerprint = json.dumps([os.path.abspath(loaded.path), st.st_size if st else 0, st.st_mtime_ns if st else 0,
                                  c.dtype, str(kv_dtype), c.quantization, kv.page_size, runner.page_bytes])
        store = DiskStore(kv.disk_dir, int(kv.disk_gb * (1 << 30)), fingerprint, runner.page_bytes, kv.page_size)
        scheduler.disk = DiskTier(store, cache, kv.write_policy)
    compile_seconds = 0.0
    if c.warmup and c.parallel.node_rank > 0:  # another rank: compile only; rank 0's calls run the warm-up
        runner.compile_in_background()
    elif c.warmup:
        background = sh.background_compile
        compile_seconds = runner.warmup(progress=progress, shapes=runner.first_shapes() if background else None)
        if host is not None:  # the load-or-recompute prices (also compiles the host tier's copies)
            costs = runner.measure_transfer_costs()
            if scheduler.disk is not None:
                read_s = scheduler.disk.store.measure_read_s()
                costs = dataclasses.replace(costs, disk_s_per_token=read_s / kv.page_size)
            scheduler.transfer_costs = costs
        if c.scheduler.decode_row_fill == "auto":  # size jump-forward steps by this machine's measured costs
            costs = step_costs(c, runner, loaded.path, measure=not background)  # background: once all compiled
            if costs is not None:
                scheduler.grid = runner.time_decode_costs(costs)
    return Runtime(loaded.path, mc, loaded.tokenizer, loaded.vocab_size, runner, allocator, cache, scheduler,
                   max_context_len, load_seconds, compile_seconds, runner.num_compiles, channel)


def _host_pool(c: EngineConfig, runner):
    """The host tier's arena bound to the runner, or None (off, no radix cache, multi-host, or not reservable)."""
    from sgl_jax.cache import HostPool

    kv = c.cache
    host_slots = int(kv.host_memory_gb * (1 << 30)) // runner.page_bytes
    if host_slots <= 0 or kv.disable_hierarchical_cache or kv.disable_radix_cache:
        return None
    if c.parallel.nnodes > 1:
        log.warning("multi-host: the host/disk KV tiers are off (not built for pools split across processes)")
        return None
    try:
        host = HostPool(host_slots, runner.page_bytes)
    except MemoryError:  # e.g. no overcommit: serve from the device pool alone, and say so once
        log.warning("the host tier of %.1f GiB could not be reserved; the prefix cache stays on the device",
                    kv.host_memory_gb)
        return None
    host.bind(runner.save_pages, runner.save_pages_into)
    runner.host_arena = host.arena
    return host


def step_costs(c: EngineConfig, r, model_path: str, measure: bool = True) -> dict | None:
    """Decode step costs per shape (ModelRunner.measure_decode_costs), kept beside the compilation cache:
    timing every shape takes ~20 s for the CPU preset, so a restart on the same machine reuses them.
    With measure=False, only what is saved (None if nothing is). Measuring runs steps on the device
    state: call it before serving or on the engine thread."""
    import jax

    from sgl_jax.executables import source_digest

    dev = jax.devices()[0]
    g = r.grid
    # the device code's digest too: a kernel change (e.g. the int8 matmul's) makes the saved costs stale
    key = json.dumps([os.path.abspath(model_path), c.dtype, c.kv_dtype, c.quantization, c.attention_backend,
                      c.attention_math, r.native_packed, source_digest(),
                      r.platform, getattr(dev, "device_kind", ""), jax.__version__, g.page_size, r.num_pages,
                      g.run_block, list(g.decode_buckets), list(g.run_block_buckets), list(g.page_width_buckets),
                      os.cpu_count()])
    path = None
    if c.compile_cache_dir:
        path = os.path.join(compile_cache_path(c.compile_cache_dir), "step_costs",
                            hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")
        try:
            with open(path) as f:
                return {tuple(k): v for k, v in json.load(f)}
        except (OSError, ValueError, TypeError):
            pass  # not measured yet (or unreadable): measure
    if not measure:
        return None
    costs = r.measure_decode_costs()
    if path:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump([[list(k), v] for k, v in sorted(costs.items())], f)
            os.replace(tmp, path)
        except OSError as e:
            log.warning("could not save step costs to %s: %s", path, e)
    return costs
