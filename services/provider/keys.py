"""The provider's typed application keys: filled by app.py, read by routes.py."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from services.provider.simulation import Simulation
from services.provider.wakeups import Wakeups

SIMULATION = web.AppKey("simulation", Simulation)
WAKEUPS = web.AppKey("wakeups", Wakeups)
WEBHOOK_CLIENT = web.AppKey("webhook_client", aiohttp.ClientSession)
SETTLEMENT_TASK: web.AppKey[asyncio.Task[None]] = web.AppKey("settlement_task")
DELIVERY_TASK: web.AppKey[asyncio.Task[None]] = web.AppKey("delivery_task")
