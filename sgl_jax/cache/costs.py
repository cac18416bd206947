"""Load or recompute: the cost model behind the host tier (pure host code).

A cached prefix on the host can be loaded into device pages (host -> device copies, one batch per step) or
recomputed (prefill). ``TransferCosts`` holds this machine's measured prices, taken at start-up by the runner
(``ModelRunner.measure_transfer_costs``): the prefill time per token, and a load's fixed time per batch plus its
time per token. A hit of ``n`` tokens is loaded when ``load_s(n) < recompute_s(n)``; ``min_load_tokens`` is the
break-even length below which recomputing is cheaper (short prefixes are not worth loading). Without
measurements (``TransferCosts.unmeasured()``, e.g. warm-up off) every hit is loaded: moving a page's K/V costs a
copy of it, and recomputing it costs the whole model's matmuls over its tokens; the measured figures are in
bench/notes.md.
"""

from __future__ import annotations

import dataclasses
import math

__all__ = ["TransferCosts"]


@dataclasses.dataclass(frozen=True)
class TransferCosts:
    prefill_s_per_token: float  # recomputing one token (its share of a full prefill step)
    load_s_fixed: float  # one batch of host -> device loads, whatever its size
    load_s_per_token: float  # each token's K/V copied host -> device
    save_s_per_token: float = 0.0  # device -> host (demotion), for /metrics and the notes
    measured: bool = True
    disk_s_per_token: float = 0.0  # disk tier -> host slot, per token (read and verified; 0 without a disk tier)

    @classmethod
    def unmeasured(cls) -> "TransferCosts":
        return cls(math.inf, 0.0, 0.0, 0.0, measured=False)

    def load_s(self, tokens: int) -> float:
        return self.load_s_fixed + tokens * self.load_s_per_token if tokens > 0 else 0.0

    def recompute_s(self, tokens: int) -> float:
        return tokens * self.prefill_s_per_token

    def load_pays(self, tokens: int) -> bool:
        """Whether loading ``tokens`` cached tokens beats recomputing them."""
        return tokens > 0 and self.load_s(tokens) < self.recompute_s(tokens)

    def disk_pays(self, tokens: int) -> bool:
        """Whether reading ``tokens`` from the disk tier and then loading them beats recomputing them."""
        return tokens > 0 and tokens * self.disk_s_per_token + self.load_s(tokens) < self.recompute_s(tokens)

    @property
    def min_load_tokens(self) -> int:
        """The shortest hit worth loading (tokens; 1 when every hit is)."""
        margin = self.prefill_s_per_token - self.load_s_per_token
        if not self.measured or self.load_s_fixed <= 0:
            return 1
        if margin <= 0:
            return 1 << 62  # loading never pays
        return int(self.load_s_fixed // margin) + 1

    def as_dict(self) -> dict:
        return {"prefill_us_per_token": 1e6 * self.prefill_s_per_token, "load_us_fixed": 1e6 * self.load_s_fixed,
                "load_us_per_token": 1e6 * self.load_s_per_token, "save_us_per_token": 1e6 * self.save_s_per_token,
                "disk_us_per_token": 1e6 * self.disk_s_per_token, "min_load_tokens": self.min_load_tokens,
                "measured": self.measured}
