"""End-to-end tests run real service processes on the default topology, so each test
gets a vhost of its own: nothing a failed test left in a queue reaches the next one."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import fresh_vhost


@pytest.fixture
def rabbitmq_url() -> Iterator[str]:
    with fresh_vhost() as url:
        yield url
