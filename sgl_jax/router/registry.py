"""The Ray request routers living in this process, for the gateway beside them (same process, another thread).

Its own module because Ray pickles the router's module by value (RequestRouterConfig): module state there would
be copied, not shared.
"""

from __future__ import annotations

import threading

_ROUTERS: list = []
_LOCK = threading.Lock()


def register(router) -> None:
    with _LOCK:
        _ROUTERS.append(router)


def prefilled(route_rid: str) -> None:
    """The request the gateway tagged `route_rid` sent its first byte: its prompt is off its replica's load."""
    with _LOCK:
        routers = list(_ROUTERS)
    for r in routers:
        r.prefilled(route_rid)


def snapshot() -> list[dict]:
    """What each router of this process knows of its replicas (the gateway's /router_stats)."""
    with _LOCK:
        routers = list(_ROUTERS)
    return [r.snapshot() for r in routers]
