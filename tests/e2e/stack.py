"""The platform's services as real processes, wired to each other on 127.0.0.1."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tests.e2e.processes import ServiceProcess, start_service
from tools.launch import free_port, wiring


@dataclasses.dataclass
class Stack:
    database_url: str
    rabbitmq_url: str
    tmp_path: Path
    services: list[ServiceProcess]
    gateway_port: int = dataclasses.field(default_factory=free_port)
    provider_port: int = dataclasses.field(default_factory=free_port)
    # Where the payments service finds the provider (a proxy's port, in fault tests).
    provider_url: str = ""

    def env(self, **overrides: str) -> dict[str, str]:
        return {
            "DATABASE_URL": self.database_url,
            "RABBITMQ_URL": self.rabbitmq_url,
            "SHUTDOWN_TIMEOUT_SECONDS": "5",
            **wiring(
                provider_url=self.provider_url or f"http://127.0.0.1:{self.provider_port}",
                gateway_port=self.gateway_port,
            ),
            **overrides,
        }

    async def start(self, name: str, **overrides: str) -> ServiceProcess:
        port = {"gateway": self.gateway_port, "provider": self.provider_port}.get(name)
        service = start_service(name, self.env(**overrides), self.tmp_path, port=port)
        self.services.append(service)
        await service.wait_ready()
        return service
