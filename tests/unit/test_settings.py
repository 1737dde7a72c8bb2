"""Configuration: the names and defaults README's configuration table gives (the seed
project's, kept for its users), and production's refusals."""

from __future__ import annotations

import pytest

from libs.common.settings import (
    GatewaySettings,
    PaymentsSettings,
    ProviderSettings,
    ReconcilerSettings,
    SettingsError,
    WebhooksSettings,
    load_settings,
)

SETTINGS_CLASSES = (
    GatewaySettings,
    PaymentsSettings,
    WebhooksSettings,
    ReconcilerSettings,
    ProviderSettings,
)
PLATFORM_VARIABLES = {name.upper() for cls in SETTINGS_CLASSES for name in cls.model_fields}

SAFE_PRODUCTION = {
    "APP_ENV": "production",
    "DB_PASSWORD": "a-real-password",
    "RABBITMQ_URL": "amqp://payments:s3cret@rabbitmq:5672/",
    "WEBHOOK_SECRET": "whsec_bGl2ZS1zZWNyZXQtb25l",
    "API_KEYS": "key-one,key-two",
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PLATFORM_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_defaults_are_the_documented_ones() -> None:
    gateway = GatewaySettings()
    assert gateway.port == 3000
    assert gateway.database_dsn() == "postgresql://admin:password123@localhost:5432/payment_api"
    assert gateway.rabbitmq_url.get_secret_value() == "amqp://guest:guest@localhost:5672/"
    assert [s.get_secret_value() for s in gateway.webhook_secret] == ["webhook-secret-key"]
    assert gateway.all_api_keys() == []
    assert ProviderSettings().port == 3100
    assert PaymentsSettings().port == 9101
    assert WebhooksSettings().port == 9102
    reconciler = ReconcilerSettings()
    assert reconciler.port == 9103
    assert reconciler.provider_url == "http://localhost:3100"
    assert reconciler.effective_reconcile_cron == "*/5 * * * *"
    assert reconciler.reconcile_min_age_seconds == 120
    provider = ProviderSettings()
    assert provider.provider_webhook_url == "http://localhost:3000/api/webhooks"
    assert provider.provider_webhook_delay_ms == 500
    assert provider.provider_decline_rate == 0.1
    assert provider.provider_seed is None


def test_environment_overrides_and_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "8080")
    monkeypatch.setenv("WEBHOOK_SECRET", "new-secret, old-secret")
    monkeypatch.setenv("API_KEYS", "k1,k2")
    monkeypatch.setenv("API_SECRET", "seed-style")
    settings = GatewaySettings()
    assert settings.port == 8080
    assert [s.get_secret_value() for s in settings.webhook_secret] == ["new-secret", "old-secret"]
    assert [k.get_secret_value() for k in settings.all_api_keys()] == ["k1", "k2", "seed-style"]


def test_database_url_wins_over_the_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgres://u:p@db.internal:6543/payments")
    monkeypatch.setenv("DB_HOST", "ignored")
    settings = PaymentsSettings()
    assert settings.database_dsn() == "postgresql://u:p@db.internal:6543/payments"
    assert settings.sqlalchemy_url() == "postgresql+asyncpg://u:p@db.internal:6543/payments"


def test_special_characters_in_the_password_are_escaped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DB_PASSWORD", "p@ss/w:rd")
    assert "p%40ss%2Fw%3Ard@" in PaymentsSettings().database_dsn()


def test_secrets_do_not_leak_into_reprs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEBHOOK_SECRET", "very-secret-value")
    monkeypatch.setenv("DB_PASSWORD", "another-secret")
    text = repr(GatewaySettings())
    assert "very-secret-value" not in text
    assert "another-secret" not in text


def test_production_with_every_secret_set_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SAFE_PRODUCTION.items():
        monkeypatch.setenv(name, value)
    assert GatewaySettings().is_production
    assert ReconcilerSettings().effective_reconcile_cron == "0 * * * *"


@pytest.mark.parametrize(
    ("missing_or_default", "value", "message"),
    [
        ("DB_PASSWORD", "password123", "database password"),
        ("RABBITMQ_URL", "amqp://guest:guest@rabbitmq:5672/", "guest credentials"),
        ("WEBHOOK_SECRET", "webhook-secret-key", "WEBHOOK_SECRET"),
        ("WEBHOOK_SECRET", "whsec_new,webhook-secret-key", "WEBHOOK_SECRET"),
        ("API_KEYS", None, "API_KEYS"),
    ],
)
def test_production_refuses_default_or_missing_secrets(
    monkeypatch: pytest.MonkeyPatch, missing_or_default: str, value: str | None, message: str
) -> None:
    for name, safe in SAFE_PRODUCTION.items():
        monkeypatch.setenv(name, safe)
    if value is None:
        monkeypatch.delenv(missing_or_default)
    else:
        monkeypatch.setenv(missing_or_default, value)
    with pytest.raises(SettingsError) as refused:
        load_settings(GatewaySettings)
    text = str(refused.value)
    assert "gateway: invalid configuration" in text
    assert "APP_ENV=production" in text
    assert message in text


def test_invalid_values_are_named_in_the_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "not-a-port")
    monkeypatch.setenv("PROVIDER_DECLINE_RATE", "1.5")
    with pytest.raises(SettingsError) as refused:
        load_settings(ProviderSettings)
    text = str(refused.value)
    assert "PORT:" in text
    assert "PROVIDER_DECLINE_RATE:" in text
