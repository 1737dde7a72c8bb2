"""When the provider's background loops have work, so they need not wait for their poll.

A real PSP sends its webhook when the charge settles. Polled every interval, the
simulated one added half an interval on average to settlement and half again to
delivery: time every payer waited that no real provider makes them wait, and that
hid the platform's own latency. The API knows when it made work due (a charge or a
refund settles `settle_delay_ms` after it is created; a declined charge's webhook is
queued at once), and settlement knows when it queued webhooks; each tells the loop
concerned. The poll stays, as the fallback for work this process did not make (another
replica's, or what was due before a restart).
"""

from __future__ import annotations

import asyncio
import math

# Wake-ups falling due within one slot share a timer and a round of settlement: at a
# high rate of charges that bounds rounds per second, so each round settles a batch.
# A slot is at least MIN_SLOT_SECONDS and about a fiftieth of the delay it waits out, so
# that a long configured delay keeps some fifty timers pending, not one per 10 ms of it.
MIN_SLOT_SECONDS = 0.01
SLOTS_PER_DELAY = 50


class Wakeups:
    def __init__(self) -> None:
        self.settlement = asyncio.Event()
        self.delivery = asyncio.Event()
        self._slots: set[tuple[float, int]] = set()

    def settle_after(self, seconds: float) -> None:
        """Wake settlement once something created now falls due, `seconds` from now."""
        loop = asyncio.get_running_loop()
        # Powers of two, so that delays alike share a width and their slots coincide.
        width = MIN_SLOT_SECONDS
        if seconds > MIN_SLOT_SECONDS * SLOTS_PER_DELAY:
            width = 2.0 ** math.floor(math.log2(seconds / SLOTS_PER_DELAY))
        # The slot's end, never before the work is due, wakes it.
        slot = (width, math.ceil((loop.time() + seconds) / width))
        if slot not in self._slots:
            self._slots.add(slot)
            loop.call_at(slot[0] * slot[1], self._due, slot)

    def pending(self) -> int:
        """Timers waiting to wake settlement."""
        return len(self._slots)

    def _due(self, slot: tuple[float, int]) -> None:
        self._slots.discard(slot)
        self.settlement.set()

    def deliver_now(self) -> None:
        """Wake delivery: webhooks were queued."""
        self.delivery.set()
