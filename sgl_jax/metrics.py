"""Prometheus metrics of one engine, in a registry of their own (not prometheus_client's global one,
so that several engines or test apps in one process never collide).

The engine reports; the server only renders:
* `observe_step(seconds, batch_size)` after every model step,
* `set_queue(waiting, running, pages_used_ratio)` whenever the scheduler's queues change,
* `on_first_token(seconds)` when a request's first output token exists (time since arrival),
* `set_cache(tiers)` after every step: the prefix cache's pages per tier and its host-tier decisions
  (`cache_tiers(scheduler)` gathers them),
* `on_finish(status, prompt_tokens, completion_tokens, cached_tokens, e2e_seconds)` once per request;
  `status` is the finish type: "stop", "length", "abort" or "error".
`render()` returns the Prometheus text exposition format that `/metrics` serves.
Every call is thread-safe (prometheus_client locks internally; the hit-rate sums take our lock).
"""

from __future__ import annotations

import threading

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "sgl_jax_"

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry(auto_describe=True)
        p = PREFIX
        self.requests_total = Counter(f"{p}requests", "finished requests by finish type", ["status"], registry=r)
        self.prompt_tokens_total = Counter(f"{p}prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens_total = Counter(f"{p}generation_tokens", "generated tokens", registry=r)
        self.cached_tokens_total = Counter(f"{p}cached_tokens", "prompt tokens served from the prefix cache", registry=r)
        self.num_waiting = Gauge(f"{p}num_waiting", "requests waiting for admission", registry=r)
        self.num_running = Gauge(f"{p}num_running", "requests in the running batch", registry=r)
        self.cache_hit_rate = Gauge(f"{p}cache_hit_rate", "cached / prompt tokens since start", registry=r)
        self.kv_pages_used_ratio = Gauge(f"{p}kv_pages_used_ratio", "fraction of KV pages in use", registry=r)
        self.time_to_first_token_seconds = Histogram(
            f"{p}time_to_first_token_seconds", "arrival to first output token", buckets=TTFT_BUCKETS, registry=r)
        self.e2e_latency_seconds = Histogram(
            f"{p}e2e_latency_seconds", "arrival to finish", buckets=_E2E_BUCKETS, registry=r)
        self.step_seconds = Histogram(f"{p}step_seconds", "duration of one engine step", buckets=_STEP_BUCKETS, registry=r)
        self.batch_size = Histogram(f"{p}batch_size", "sequences per engine step", buckets=_BATCH_BUCKETS, registry=r)
        self.cache_pages = Gauge(f"{p}cache_pages", "pages held by the prefix cache, by tier", ["tier"], registry=r)
        self.cache_tier_bytes = Gauge(f"{p}cache_tier_bytes", "bytes of cached K/V, by tier", ["tier"], registry=r)
        self.host_free_slots = Gauge(f"{p}host_free_slots", "free page slots of the host tier", registry=r)
        self.host_copy_slots = Gauge(f"{p}host_copy_slots", "host slots kept as copies of promoted device pages "
                                     "(given up first when the host tier needs a slot)", registry=r)
        self.disk_loading = Gauge(f"{p}disk_loading", "requests waiting for a read from the disk tier", registry=r)
        self.cache_events = Gauge(f"{p}cache_events", "tier events since start: pages demoted (of them, "
                                  "into their host copy, without a copy), promoted (loaded), dropped from the host; "
                                  "hit tokens loaded or recomputed; disk pages "
                                  "written, written back as the host dropped them, read, found corrupt, evicted; "
                                  "tokens read from disk", ["event"], registry=r)
        self._lock = threading.Lock()
        self._prompt_sum = 0
        self._cached_sum = 0

    def observe_step(self, seconds: float, batch_size: int) -> None:
        self.step_seconds.observe(seconds)
        self.batch_size.observe(batch_size)

    def set_queue(self, waiting: int, running: int, pages_used_ratio: float) -> None:
        self.num_waiting.set(waiting)
        self.num_running.set(running)
        self.kv_pages_used_ratio.set(pages_used_ratio)

    def set_cache(self, tiers: dict) -> None:
        for tier in ("device", "host"):
            self.cache_pages.labels(tier=tier).set(tiers[f"{tier}_pages"])
            self.cache_tier_bytes.labels(tier=tier).set(tiers[f"{tier}_pages"] * tiers["page_bytes"])
        self.host_free_slots.set(tiers["host_free_slots"])
        self.host_copy_slots.set(tiers["host_copy_pages"])
        for event in ("pages_demoted", "pages_demoted_by_copy", "pages_promoted", "host_pages_dropped",
                      "host_tokens_loaded", "host_tokens_recomputed"):
            self.cache_events.labels(event=event).set(tiers[event])
        if "disk_pages" in tiers:  # a disk tier
            self.cache_pages.labels(tier="disk").set(tiers["disk_pages"])
            self.cache_tier_bytes.labels(tier="disk").set(tiers["disk_bytes"])
            self.disk_loading.set(tiers["disk_loading"])
            for event in ("disk_written", "disk_pages_spilled", "disk_read", "disk_corrupt", "disk_evicted",
                          "disk_tokens_read"):
                self.cache_events.labels(event=event).set(tiers[event])

    def on_first_token(self, seconds: float) -> None:
        self.time_to_first_token_seconds.observe(seconds)

    def on_finish(self, status: str, prompt_tokens: int, completion_tokens: int, cached_tokens: int,
                  e2e_seconds: float) -> None:
        self.requests_total.labels(status=status).inc()
        self.prompt_tokens_total.inc(prompt_tokens)
        self.generation_tokens_total.inc(completion_tokens)
        self.cached_tokens_total.inc(cached_tokens)
        self.e2e_latency_seconds.observe(e2e_seconds)
        with self._lock:
            self._prompt_sum += prompt_tokens
            self._cached_sum += cached_tokens
            rate = self._cached_sum / self._prompt_sum if self._prompt_sum else 0.0
        self.cache_hit_rate.set(rate)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def cache_tiers(scheduler) -> dict:
    """The prefix cache's state per tier and the host tier's counters, from the scheduler (engine thread; after
    every step, so counters only: `Engine.stats` adds the measured prices)."""
    cache = scheduler.cache
    host = getattr(cache, "host", None)
    return {"device_pages": cache.cached_pages, "host_pages": getattr(cache, "host_cached_pages", 0),
            "page_bytes": host.page_bytes if host is not None else 0,
            "host_free_slots": host.allocator.num_free if host is not None else 0,
            "host_slots": host.num_slots if host is not None else 0,
            "pages_demoted": getattr(cache, "pages_demoted", 0), "pages_promoted": getattr(cache, "pages_promoted", 0),
            "host_pages_dropped": getattr(cache, "host_pages_dropped", 0),
            "host_copy_pages": getattr(cache, "host_copy_pages", 0),
            "pages_demoted_by_copy": getattr(cache, "pages_demoted_by_copy", 0),
            "host_tokens_loaded": scheduler.host_tokens_loaded,
            "host_tokens_recomputed": scheduler.host_tokens_recomputed,
            **(scheduler.disk.stats() if getattr(scheduler, "disk", None) is not None else {})}
