"""Test helpers: the suite's compilation cache; drive the model forward over paged KV with explicit page
assignment."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from sgl_jax.batch import SeqChunk, pack
from sgl_jax.models.attention import AttnMetadata
from sgl_jax.models.hub import cache_dir
from sgl_jax.models.llama import CausalLM, init_kv_cache, kv_format_of

# The suite's compilation cache, under the project's cache directory (hub.cache_dir), one per xdist worker;
# conftest.py points jax's persistent cache here. Test engines and servers that build the same steps more than once
# pass it as `compile_cache_dir`: a rebuilt engine then loads them from the executable store there
# (sgl_jax/executables.py) instead of tracing and lowering them again. One directory per worker: the store keeps
# only its newest few fingerprints, so the other worker's engines would prune this one's while it runs.
SUITE_CACHE = str(cache_dir() / "jax_cache_tests" / os.environ.get("PYTEST_XDIST_WORKER", "main"))


# XLA's default backend optimisation level, for a compile that checks the code as users' compiles build it: the suite
# compiles at the lowest level (tests/conftest.py); an option given to a compile overrides XLA_FLAGS.
SHIPPED_LEVEL = {"xla_backend_optimization_level": 3}


class PagedRunner:
    """Owns a KV pool and hands each sequence consecutive fresh pages (page 0 stays the sink)."""

    def __init__(self, cfg, params, *, num_pages=256, page_size=4, block_q=8, dtype=jnp.float32,
                 attention_backend="jnp", nan_fill=True, kv_dtype=None, layout=None, attention_math="float32",
                 page_width=None, prefill_blocks=None, shape=None, compiler_options=None):
        """`layout` (sgl_jax.parallel.tp.TPLayout): run tensor parallel on its mesh (params placed and KV heads
        expanded here, the pool sharded by KV heads). `page_width` / `prefill_blocks`: pad every step's page
        tables to that many pages and every step with prompt chunks to that many prefill blocks, as the engine's
        buckets do (one compiled shape for all decode steps and one for all prompts, instead of one per context
        length: the rows past a sequence's pages and the padding blocks are masked, so the logits are the same).
        `shape`: pack()'s padding targets for every step (e.g. num_decode, num_blocks, page_width, num_logits; the
        `page_width` argument is shorthand for shape={"page_width": ...}): all of a runner's steps in one compiled
        shape, which another runner of the same model and settings loads from the suite's compilation cache instead
        of compiling it again. `compiler_options`: XLA options for the step's compile (SHIPPED_LEVEL: the
        optimisation level a user's compile gets, not the suite's, tests/conftest.py)."""
        if layout is not None:
            params, cfg = layout.shard_params(params), layout.model_config(cfg)
        self.cfg, self.params, self.page_size, self.block_q = cfg, params, page_size, block_q
        fmt = kv_format_of(kv_dtype or dtype)  # a float8 pool: uint8 codes
        self.model = CausalLM(cfg, dtype, attention_backend, layout, attention_math, fmt)
        kv = init_kv_cache(cfg, num_pages, page_size, kv_dtype or dtype)
        if nan_fill:  # a read of a page nobody owns poisons the output (a float8 pool: the format's NaN code)
            nan = lambda x: (jax.lax.bitcast_convert_type(jnp.full(x.shape, jnp.nan, fmt), jnp.uint8)  # noqa: E731
                             if fmt else jnp.full_like(x, jnp.nan))
            kv = tuple((nan(k), nan(v)) for k, v in kv)
        if layout is not None:
            kv = jax.device_put(kv, layout.kv_shardings(cfg.num_layers))
        self.kv = kv
        self.next_page = 1
        self.prefill_blocks = prefill_blocks
        self.shape = dict(shape or {}) if page_width is None else {"page_width": page_width, **(shape or {})}
        self.pages: dict[int, list[int]] = {}
        self._fwd = jax.jit(self._forward, donate_argnums=(2,), static_argnames=("block_q", "run_q"),
                            compiler_options=compiler_options)

    def _forward(self, params, ids, kv, logits_idx, meta_arrays, block_q, run_arrays=(None, None), run_q=1):
        meta = AttnMetadata(*meta_arrays, block_q=block_q, run_page_table=run_arrays[0],
                            run_kv_lens=run_arrays[1], run_q=run_q)
        return self.model.apply({"params": params}, ids, meta, kv, logits_idx)

    def ensure_pages(self, sid: int, length: int) -> list[int]:
        table = self.pages.setdefault(sid, [])
        while len(table) * self.page_size < length:
            table.append(self.next_page)
            self.next_page += 1
        return table

    def step(self, work: list[tuple], **pad):
        """work: (seq id, new token ids, start position, logits_from[, as_run]). Returns per-chunk logits.

        pad: pack()'s padding targets, and run_q (tokens per run block) for `as_run` chunks.
        """
        chunks = []
        for sid, ids, start, logits_from, *rest in work:
            table = self.ensure_pages(sid, start + len(ids))
            chunks.append(SeqChunk(list(ids), start, list(table), logits_from, as_run=bool(rest and rest[0])))
        pad = {**self.shape, **pad}
        if self.prefill_blocks is not None and any(len(c.token_ids) > 1 and not c.as_run for c in chunks):
            pad.setdefault("num_blocks", self.prefill_blocks)
        b = pack(chunks, page_size=self.page_size, block_q=self.block_q, **pad)
        meta = (b.positions, b.slot_mapping, b.dec_page_table, b.dec_kv_lens, b.pre_page_table, b.pre_kv_lens)
        runs = (jnp.asarray(b.run_page_table), jnp.asarray(b.run_kv_lens)) if len(b.run_kv_lens) else (None, None)
        logits, self.kv = self._fwd(self.params, b.input_ids, self.kv, b.logits_indices,
                                    tuple(jnp.asarray(m) for m in meta), block_q=b.block_q, run_arrays=runs,
                                    run_q=b.run_q)
        logits = np.asarray(logits)
        return [logits[a:e] for a, e in b.logits_rows]
