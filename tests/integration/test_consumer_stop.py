"""Stopping a busy consumer, many times, on a loaded CPU, always ends in bounded time.

`Consumer.stop` once hung: its queue-depth gauge was cancelled in the middle of an RPC,
aiormq lost the cancellation (Python 3.11's `asyncio.wait_for`, see
libs.common.shutdown), the gauge kept looping, and stop waited for it forever. A loaded
CPU widens the window in which that happens, so this test loads every core while it
stops a consumer with messages in flight and its gauge polling without pause.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from libs.common.broker.connection import Broker
from libs.common.broker.consumer import Consumer
from libs.common.broker.topology import Topology
from libs.common.messages import Envelope, PaymentRequested
from tests.integration.test_broker import payment_requested, queue_depth
from tests.support import eventually

STOPS = 40
# A stop with nothing stuck takes well under a second; a hang is one that never ends.
STOP_BOUND_SECONDS = 10.0
GRACE_SECONDS = 5.0


@pytest.fixture
def loaded_cpu() -> Iterator[None]:
    """One busy loop per core, each ending by itself after a minute at most."""
    script = "import time\nend = time.monotonic() + 60\nwhile time.monotonic() < end: pass\n"
    loops = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(os.cpu_count() or 1)]
    try:
        yield
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


@pytest.mark.timeout(120)
async def test_a_busy_consumer_always_stops_in_bounded_time(
    broker: Broker, topology: Topology, loaded_cpu: None
) -> None:
    finished: list[Envelope[PaymentRequested]] = []

    async def slow(envelope: Envelope[PaymentRequested]) -> None:
        await asyncio.sleep(0.02)
        finished.append(envelope)

    published = 0
    for _ in range(STOPS):
        consumer = Consumer(broker, topology.payment_requested, PaymentRequested, slow)
        # Poll without pause, so that stop nearly always finds the gauge mid-RPC.
        consumer.depth_interval_seconds = 0.0
        await consumer.start()
        for _ in range(3):
            await broker.publish(payment_requested())
            published += 1
        # Stop with work in flight (or, on a slow start, just done).
        await eventually(
            lambda c=consumer, n=published: c.in_flight or len(finished) >= n, interval=0.001
        )

        started = time.monotonic()
        stop = asyncio.ensure_future(consumer.stop(grace_seconds=GRACE_SECONDS))
        done, _ = await asyncio.wait({stop}, timeout=STOP_BOUND_SECONDS)
        assert done, f"stop {len(finished)} did not end within {STOP_BOUND_SECONDS} s"
        stop.result()
        assert time.monotonic() - started < STOP_BOUND_SECONDS
        assert consumer.in_flight == 0

    # Nothing lost: every message was handled, or went back to the queue unacked.
    left = await queue_depth(broker, topology.payment_requested.name)
    assert len(finished) + left >= published
