"""Typed configuration, read from the environment once per process.

Every variable the platform understands is declared here and nowhere else; README's
configuration table documents the same names. Each service has its own settings class,
composed from the groups it needs, so a service never accepts a variable it ignores.
"""

from __future__ import annotations

import enum
from typing import Annotated, ClassVar, Self, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

from croniter import croniter
from limits import parse_many
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from libs.common.signing import standard_key

DEFAULT_DB_PASSWORD = "password123"  # noqa: S105 - the seed's development default, refused in production
DEFAULT_WEBHOOK_SECRET = "webhook-secret-key"  # noqa: S105 - same: refused in production
DEFAULT_RABBITMQ_URL = "amqp://guest:guest@localhost:5672/"
DEFAULT_SHUTDOWN_TIMEOUT_SECONDS = 10.0


class Environment(enum.StrEnum):
    DEVELOPMENT = "development"
    PRODUCTION = "production"


class SettingsError(SystemExit):
    """Raised at start-up when the environment does not describe a runnable service.

    A SystemExit, so the process stops with the message and no traceback."""


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


CommaList = Annotated[list[SecretStr], NoDecode]


def _split_urls(value: str) -> list[str]:
    """`amqp://a/,amqp://b/` as its URLs; a comma inside a password is written `%2C`."""
    return [part.strip() for part in value.split(",") if part.strip()]


class BaseServiceSettings(BaseSettings):
    """What every service reads."""

    # An empty variable counts as unset, as `${VAR:-}` in docker compose produces.
    model_config = SettingsConfigDict(
        frozen=True, extra="ignore", case_sensitive=False, env_ignore_empty=True
    )

    service_name: ClassVar[str] = "service"

    app_env: Environment = Environment.DEVELOPMENT
    port: int = Field(default=8000, ge=1, le=65535)
    host: str = "0.0.0.0"  # noqa: S104 - services run in containers and must listen beyond loopback
    log_level: str = "INFO"
    shutdown_timeout_seconds: float = Field(default=DEFAULT_SHUTDOWN_TIMEOUT_SECONDS, gt=0)

    @property
    def is_production(self) -> bool:
        return self.app_env is Environment.PRODUCTION

    def production_problems(self) -> list[str]:
        """Reasons this configuration must not run in production; subclasses add theirs."""
        return []

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> Self:
        if self.is_production:
            problems = self.production_problems()
            if problems:
                raise ValueError(
                    "refusing to start with APP_ENV=production: " + "; ".join(problems)
                )
        return self


class DatabaseSettings(BaseServiceSettings):
    db_host: str = "localhost"
    db_port: int = Field(default=5432, ge=1, le=65535)
    db_name: str = "payment_api"
    db_user: str = "admin"
    db_password: SecretStr = SecretStr(DEFAULT_DB_PASSWORD)
    database_url: SecretStr | None = None
    db_pool_min_size: int = Field(default=1, ge=0)
    db_pool_max_size: int = Field(default=10, ge=1)
    db_connect_timeout_seconds: float = Field(default=5.0, gt=0)
    db_command_timeout_seconds: float = Field(default=10.0, gt=0)
    db_acquire_timeout_seconds: float = Field(default=5.0, gt=0)
    # Not a variable: whether the service's code leaves session state (advisory locks,
    # settings, cursors) on a pooled connection, which the pool must then reset with one
    # more round trip per use (see `Database.connect`). Most services leave none.
    db_session_state: ClassVar[bool] = False

    def database_dsn(self) -> str:
        """A libpq-style DSN for asyncpg (`postgresql://...`)."""
        if self.database_url is not None:
            parts = urlsplit(self.database_url.get_secret_value())
            return urlunsplit(parts._replace(scheme="postgresql"))
        user = quote(self.db_user, safe="")
        password = quote(self.db_password.get_secret_value(), safe="")
        return f"postgresql://{user}:{password}@{self.db_host}:{self.db_port}/{self.db_name}"

    def sqlalchemy_url(self) -> str:
        """The same database for SQLAlchemy/Alembic, through the asyncpg driver."""
        return "postgresql+asyncpg" + self.database_dsn().removeprefix("postgresql")

    def production_problems(self) -> list[str]:
        problems = super().production_problems()
        password = urlsplit(self.database_dsn()).password or ""
        if password in ("", DEFAULT_DB_PASSWORD):
            problems.append("the database password is missing or the development default")
        return problems


class BrokerSettings(BaseServiceSettings):
    rabbitmq_url: SecretStr = SecretStr(DEFAULT_RABBITMQ_URL)
    rabbitmq_heartbeat_seconds: int = Field(default=30, ge=1)
    rabbitmq_connect_timeout_seconds: float = Field(default=5.0, gt=0)
    # Between reconnect attempts (each to the next node of a cluster), and the least time
    # between a connection made and the next attempt should it drop at once.
    rabbitmq_reconnect_interval_seconds: float = Field(default=1.0, gt=0)
    # The gateway must answer 503 within 2 s when the broker does not confirm.
    publish_timeout_seconds: float = Field(default=1.5, gt=0)
    consumer_prefetch: int = Field(default=32, ge=1)

    @field_validator("rabbitmq_url")
    @classmethod
    def _amqp_url(cls, value: SecretStr) -> SecretStr:
        urls = _split_urls(value.get_secret_value())
        if not urls:
            raise ValueError("must look like amqp://user:password@host:5672/vhost")
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
                raise ValueError(
                    "must look like amqp://user:password@host:5672/vhost"
                    " (or several such URLs, comma-separated, one per cluster node)"
                )
        return value

    def rabbitmq_node_urls(self) -> list[str]:
        """The broker's nodes, in the order given: one URL, or one per cluster node."""
        return _split_urls(self.rabbitmq_url.get_secret_value())

    def production_problems(self) -> list[str]:
        problems = super().production_problems()
        for url in self.rabbitmq_node_urls():
            parts = urlsplit(url)
            if (parts.username, parts.password) in (("guest", "guest"), (None, None)):
                problems.append("RABBITMQ_URL uses the default guest credentials")
                break
        return problems


class WebhookSigningSettings(BaseServiceSettings):
    # A comma-separated list: the first secret signs, every one verifies (rotation).
    webhook_secret: CommaList = Field(default_factory=lambda: [SecretStr(DEFAULT_WEBHOOK_SECRET)])

    _split_secrets = field_validator("webhook_secret", mode="before")(_split_commas)

    @field_validator("webhook_secret")
    @classmethod
    def _at_least_one(cls, value: list[SecretStr]) -> list[SecretStr]:
        if not value:
            raise ValueError("WEBHOOK_SECRET must hold at least one secret")
        for secret in value:
            try:
                standard_key(secret.get_secret_value())
            except ValueError as exc:
                raise ValueError(f"WEBHOOK_SECRET: {exc}") from None
        return value

    def production_problems(self) -> list[str]:
        problems = super().production_problems()
        if any(s.get_secret_value() == DEFAULT_WEBHOOK_SECRET for s in self.webhook_secret):
            problems.append("WEBHOOK_SECRET is the development default")
        return problems


class ProviderClientSettings(BaseServiceSettings):
    provider_url: str = "http://localhost:3100"
    provider_timeout_seconds: float = Field(default=5.0, gt=0)


class GatewaySettings(DatabaseSettings, BrokerSettings, WebhookSigningSettings):
    service_name: ClassVar[str] = "gateway"
    port: int = Field(default=3000, ge=1, le=65535)
    api_secret: SecretStr | None = None
    api_keys: CommaList = Field(default_factory=list)

    # Per API key (per client address without keys), in the `limits` notation.
    rate_limit: str = "100/second"
    # Webhook requests with a bad signature, per client address; past it, 429.
    webhook_failure_limit: str = "20/minute"
    # One JSON line per request at INFO (method, route, status, duration, client).
    access_log: bool = True

    _split_keys = field_validator("api_keys", mode="before")(_split_commas)

    @field_validator("rate_limit", "webhook_failure_limit")
    @classmethod
    def _valid_limit(cls, value: str) -> str:
        try:
            parse_many(value)
        except ValueError:
            raise ValueError(
                f"{value!r} is not a rate limit (e.g. '100/second' or '20/minute')"
            ) from None
        return value

    def all_api_keys(self) -> list[SecretStr]:
        """API_KEYS plus the seed's single API_SECRET; empty means no API auth."""
        return [*self.api_keys, *([self.api_secret] if self.api_secret else [])]

    def production_problems(self) -> list[str]:
        problems = super().production_problems()
        if not self.all_api_keys():
            problems.append("API_KEYS (or API_SECRET) must be set")
        return problems


class OutboxSettings(BaseServiceSettings):
    """The relay of payment events (libs/common/outbox.py), run by the payments service."""

    outbox_batch_size: int = Field(default=500, ge=1, le=10_000)
    # How often an idle relay looks for new events; with a backlog it does not wait.
    outbox_poll_interval_seconds: float = Field(default=0.1, gt=0, le=60)
    # The event log (GET /api/events) keeps published events at least this long.
    event_retention_days: int = Field(default=30, ge=30)


class PaymentsSettings(DatabaseSettings, BrokerSettings, ProviderClientSettings, OutboxSettings):
    service_name: ClassVar[str] = "payments"
    port: int = Field(default=9101, ge=1, le=65535)
    # It works in batches (four in flight, each up to a quarter of the window): a wider
    # window makes fewer, fuller batches (docs/decisions/0001-performance.md).
    consumer_prefetch: int = Field(default=256, ge=1)


class WebhooksSettings(DatabaseSettings, BrokerSettings):
    service_name: ClassVar[str] = "webhooks"
    port: int = Field(default=9102, ge=1, le=65535)


class ReconcilerSettings(DatabaseSettings, BrokerSettings, ProviderClientSettings):
    service_name: ClassVar[str] = "reconciler"
    port: int = Field(default=9103, ge=1, le=65535)
    # A run holds an advisory lock on a pooled connection.
    db_session_state: ClassVar[bool] = True
    # None means the environment's default: every 5 minutes in development, hourly in production.
    reconcile_cron: str | None = None
    reconcile_min_age_seconds: int = Field(default=120, ge=0)

    reconcile_batch_size: int = Field(default=500, ge=1, le=10_000)
    reconcile_concurrency: int = Field(default=20, ge=1, le=500)
    # A payment the provider never saw is submitted again while younger than this;
    # older, it is marked failed.
    reconcile_resubmit_max_age_seconds: int = Field(default=3600, ge=0)

    @field_validator("reconcile_cron")
    @classmethod
    def _valid_cron(cls, value: str | None) -> str | None:
        if value is not None and not croniter.is_valid(value):
            raise ValueError(
                f"{value!r} is not a cron expression (five fields, e.g. '*/5 * * * *')"
            )
        return value

    @property
    def effective_reconcile_cron(self) -> str:
        if self.reconcile_cron:
            return self.reconcile_cron
        return "0 * * * *" if self.is_production else "*/5 * * * *"


class ProviderSettings(DatabaseSettings, WebhookSigningSettings):
    service_name: ClassVar[str] = "provider"
    port: int = Field(default=3100, ge=1, le=65535)
    provider_webhook_url: str = "http://localhost:3000/api/webhooks"
    provider_webhook_timeout_seconds: float = Field(default=5.0, gt=0)
    provider_webhook_delay_ms: int = Field(default=500, ge=0)
    provider_decline_rate: float = Field(default=0.1, ge=0, le=1)
    provider_refund_decline_rate: float = Field(default=0.0, ge=0, le=1)
    provider_webhook_drop_rate: float = Field(default=0.0, ge=0, le=1)
    provider_webhook_duplicate_rate: float = Field(default=0.0, ge=0, le=1)
    provider_error_rate: float = Field(default=0.0, ge=0, le=1)
    provider_seed: int | None = None


class CtlSettings(BrokerSettings, WebhookSigningSettings):
    """The operator's command line (`paymentsctl`): where the API is, how to sign, the broker.

    Not a service: nothing here starts, so production's refusals do not apply; a wrong
    secret or key is refused by the gateway itself.
    """

    service_name: ClassVar[str] = "paymentsctl"
    payments_url: str = "http://localhost:3000"
    payments_api_key: SecretStr | None = None

    def production_problems(self) -> list[str]:
        return []


S = TypeVar("S", bound=BaseServiceSettings)


def load_settings(cls: type[S]) -> S:
    """Build `cls` from the environment, or stop the process with a readable message."""
    try:
        return cls()
    except ValidationError as exc:
        lines = []
        for error in exc.errors(include_url=False, include_input=False):
            where = ".".join(str(p) for p in error["loc"]).upper()
            message = error["msg"].removeprefix("Value error, ")
            lines.append(f"  {where}: {message}" if where else f"  {message}")
        raise SettingsError(
            f"{cls.service_name}: invalid configuration:\n" + "\n".join(lines)
        ) from None
