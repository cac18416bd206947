"""Host-side KV cache management (pure Python; does not import jax)."""

from .allocator import PageAllocator, pages_for_budget
from .host_pool import HostPool
from .naive_cache import NaivePrefixCache
from .radix_cache import MatchResult, RadixCache, commit_running_prefix

__all__ = [
    "HostPool",
    "MatchResult",
    "NaivePrefixCache",
    "PageAllocator",
    "RadixCache",
    "commit_running_prefix",
    "pages_for_budget",
]
