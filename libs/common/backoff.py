"""The one retry delay: exponential, capped, optionally jittered.

Every place that waits before trying again (a transaction, a provider call, a message
handed back to the queue, a background round, a webhook delivery, an orphan webhook)
takes its delay from a `Backoff`, each with its own base and cap.
"""

from __future__ import annotations

import dataclasses
import random


@dataclasses.dataclass(frozen=True, slots=True)
class Backoff:
    """`base_seconds` after the first failure, doubling after each further one, at most
    `cap_seconds`; then spread by `jitter` (0.5 gives 75-125% of it, 1.0 gives 50-150%),
    so that clients failing together do not all retry at the same moment."""

    base_seconds: float
    cap_seconds: float
    jitter: float = 0.0

    def delay(self, failures: int) -> float:
        """Seconds to wait after `failures` consecutive failures (1 for the first)."""
        # The exponent stops growing long after any cap is reached (and before floats overflow).
        nominal = min(self.base_seconds * 2.0 ** min(max(failures - 1, 0), 64), self.cap_seconds)
        if not self.jitter:
            return nominal
        return nominal * (1.0 + self.jitter * (random.random() - 0.5))  # noqa: S311 - jitter, not crypto

    def schedule(self, failures: int) -> list[float]:
        """The delays after 1..`failures` failures, unjittered (for a SQL statement that
        picks one by a row's attempt count)."""
        steady = Backoff(self.base_seconds, self.cap_seconds)
        return [steady.delay(n) for n in range(1, failures + 1)]
