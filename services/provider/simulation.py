"""How the simulated PSP misbehaves: its delays and the dice behind its failure modes.

Each failure mode draws from its own random stream, derived from PROVIDER_SEED. One
shared stream would make, say, the settlement decisions depend on how many API calls
happened to arrive in between; separate streams keep a seeded run repeatable per mode.
"""

from __future__ import annotations

import dataclasses
import random

from libs.common.settings import ProviderSettings


def _stream(seed: int | None, purpose: str) -> random.Random:
    # A str seed is hashed with SHA-512 by `random`, so it is stable across processes.
    derived = None if seed is None else f"{seed}/{purpose}"
    return random.Random(derived)  # noqa: S311 - simulated failures, not crypto


@dataclasses.dataclass(slots=True)
class Simulation:
    settle_delay_ms: int
    decline_rate: float
    drop_rate: float
    duplicate_rate: float
    error_rate: float
    seed: int | None = None
    refund_decline_rate: float = 0.0
    _streams: dict[str, random.Random] = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def from_settings(cls, settings: ProviderSettings) -> Simulation:
        return cls(
            settle_delay_ms=settings.provider_webhook_delay_ms,
            decline_rate=settings.provider_decline_rate,
            drop_rate=settings.provider_webhook_drop_rate,
            duplicate_rate=settings.provider_webhook_duplicate_rate,
            error_rate=settings.provider_error_rate,
            seed=settings.provider_seed,
            refund_decline_rate=settings.provider_refund_decline_rate,
        )

    def _roll(self, purpose: str, rate: float) -> bool:
        stream = self._streams.get(purpose)
        if stream is None:
            stream = self._streams[purpose] = _stream(self.seed, purpose)
        # random() is in [0, 1): a rate of 0 never fires, a rate of 1 always does.
        return stream.random() < rate

    def unavailable(self) -> bool:
        """Whether this API call is answered 503 (PROVIDER_ERROR_RATE)."""
        return self._roll("error", self.error_rate)

    def declines(self) -> bool:
        """Whether a settling charge is declined (PROVIDER_DECLINE_RATE)."""
        return self._roll("decline", self.decline_rate)

    def refund_declines(self) -> bool:
        """Whether a settling refund fails (PROVIDER_REFUND_DECLINE_RATE)."""
        return self._roll("refund_decline", self.refund_decline_rate)

    def drops(self) -> bool:
        """Whether a new webhook is never sent (PROVIDER_WEBHOOK_DROP_RATE)."""
        return self._roll("drop", self.drop_rate)

    def duplicates(self) -> bool:
        """Whether a delivered webhook is sent once more (PROVIDER_WEBHOOK_DUPLICATE_RATE)."""
        return self._roll("duplicate", self.duplicate_rate)
