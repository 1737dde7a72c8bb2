"""Standard Webhooks secrets as the spec and its official library read them: a sender using
the `standardwebhooks` package and the gateway (and `paymentsctl webhook sign`) agree."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import io
import os
from pathlib import Path

import pytest
from standardwebhooks import Webhook

from libs.common import signing
from libs.common.settings import GatewaySettings, SettingsError, load_settings
from tools.paymentsctl.cli import run

BODY = b'{"event_type":"payment.completed","payment_id":"6c0e1f1e-9d53-4c4e-9a53-0f2b5f4f7d11"}'
NOW = 1764150000
MSG_ID = "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W"
# What the official libraries generate: whsec_ and 24 to 64 random bytes in base64.
SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()


def library_signature(secret: str | bytes, body: bytes = BODY) -> str:
    signature: str = Webhook(secret).sign(
        MSG_ID, dt.datetime.fromtimestamp(NOW, dt.UTC), body.decode()
    )
    return signature


def headers_of(signature: str) -> dict[str, str]:
    return {
        signing.ID_HEADER: MSG_ID,
        signing.TIMESTAMP_HEADER: str(NOW),
        signing.SIGNATURE_HEADER: signature,
    }


def test_the_gateway_verifies_what_the_library_signs_with_a_whsec_secret() -> None:
    headers = headers_of(library_signature(SECRET))
    assert signing.verify(BODY, headers, [SECRET], now=NOW) is signing.Scheme.STANDARD


def test_the_library_verifies_what_the_platform_signs() -> None:
    # The library checks the timestamp against its own clock: sign as of now for it.
    now = int(dt.datetime.now(dt.UTC).timestamp())
    fresh = signing.signature_headers(BODY, [SECRET], message_id=MSG_ID, timestamp=now)
    library_headers = {k: v for k, v in fresh.items() if k != signing.SEED_HEADER}
    assert Webhook(SECRET).verify(BODY, library_headers, json_parse=False) is None


def test_an_unpadded_whsec_secret_reads_as_the_library_reads_it() -> None:
    unpadded = "whsec_" + base64.b64encode(b"sixteen byte key!").decode().rstrip("=")
    assert signing.standard_signature(MSG_ID, NOW, BODY, unpadded) == library_signature(unpadded)


def test_a_raw_secret_is_its_bytes_so_the_library_takes_it_as_bytes() -> None:
    seed_secret = "webhook-secret-key"
    ours = signing.standard_signature(MSG_ID, NOW, BODY, seed_secret)
    assert ours == library_signature(seed_secret.encode())
    # Given as text, the library reads it as base64 and signs with another key: README
    # says to pass the bytes (or use a whsec_ secret) for that reason.
    assert ours != library_signature(seed_secret)


def test_the_seed_scheme_reads_any_secret_as_written() -> None:
    # openssl dgst -hmac "$WEBHOOK_SECRET": the text itself, a whsec_ one included.
    expected = hmac.new(SECRET.encode(), BODY, hashlib.sha256).hexdigest()
    assert signing.seed_signature(BODY, SECRET) == expected


def test_paymentsctl_signs_as_the_library_does(tmp_path: Path) -> None:
    payload = tmp_path / "payload.json"
    payload.write_bytes(BODY)
    stdout = io.StringIO()
    code = run(
        [
            *("--secret", SECRET),
            *("webhook", "sign", str(payload), "--scheme", "standard"),
            *("--id", MSG_ID, "--timestamp", str(NOW)),
        ],
        stdout=stdout,
        stderr=io.StringIO(),
    )
    assert code == 0
    lines = dict(line.split(": ", 1) for line in stdout.getvalue().splitlines())
    assert lines[signing.SIGNATURE_HEADER] == library_signature(SECRET)


@pytest.mark.parametrize("secret", ["whsec_not base64!", "whsec_", "whsec_===="])
def test_a_malformed_whsec_secret_stops_the_service_with_a_reason(
    monkeypatch: pytest.MonkeyPatch, secret: str
) -> None:
    monkeypatch.setenv("WEBHOOK_SECRET", f"webhook-secret-key,{secret}")
    with pytest.raises(SettingsError) as refused:
        load_settings(GatewaySettings)
    assert "WEBHOOK_SECRET" in str(refused.value)
    assert "whsec_" in str(refused.value)
