"""Webhook signatures, both schemes: what signs must verify, and nothing else may."""

from __future__ import annotations

import base64
import hashlib
import hmac
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from multidict import CIMultiDict

from libs.common.signing import (
    ID_HEADER,
    SEED_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Scheme,
    SignatureError,
    seed_signature,
    signature_headers,
    standard_signature,
    verify,
)

BODY = b'{"event_id":"evt_1","event_type":"payment.completed","data":{"amount_minor":10000}}'
SECRET = "webhook-secret-key"
NOW = 1_700_000_000

Only = Callable[["CIMultiDict[str]"], "CIMultiDict[str]"]


def signed(
    body: bytes = BODY, secrets: list[str] | None = None, timestamp: int = NOW
) -> CIMultiDict[str]:
    return CIMultiDict(
        signature_headers(body, secrets or [SECRET], message_id="evt_1", timestamp=timestamp)
    )


def seed_only(headers: CIMultiDict[str]) -> CIMultiDict[str]:
    return CIMultiDict({SEED_HEADER: headers[SEED_HEADER]})


def standard_only(headers: CIMultiDict[str]) -> CIMultiDict[str]:
    return CIMultiDict({k: v for k, v in headers.items() if k != SEED_HEADER})


def refused(body: bytes, headers: CIMultiDict[str], secrets: list[str], **kwargs: int) -> str:
    with pytest.raises(SignatureError) as caught:
        verify(body, headers, secrets, **kwargs)
    return caught.value.code


def test_both_schemes_verify_what_was_signed() -> None:
    headers = signed()
    assert verify(BODY, headers, [SECRET], now=NOW) is Scheme.STANDARD
    assert verify(BODY, seed_only(headers), [SECRET], now=NOW) is Scheme.SEED
    assert verify(BODY, standard_only(headers), [SECRET], now=NOW) is Scheme.STANDARD


def test_header_names_are_case_insensitive() -> None:
    headers = CIMultiDict({k.upper(): v for k, v in signed().items()})
    assert verify(BODY, headers, [SECRET], now=NOW) is Scheme.STANDARD


@pytest.mark.parametrize("only", [seed_only, standard_only], ids=["seed", "standard"])
def test_a_changed_byte_is_refused(only: Only) -> None:
    headers = only(signed())
    for index in (0, len(BODY) // 2, len(BODY) - 1):
        tampered = bytearray(BODY)
        tampered[index] ^= 0x01
        assert refused(bytes(tampered), headers, [SECRET], now=NOW) == "signature_invalid"
    assert refused(BODY + b"\n", headers, [SECRET], now=NOW) == "signature_invalid"


@pytest.mark.parametrize("only", [seed_only, standard_only], ids=["seed", "standard"])
def test_a_wrong_secret_is_refused(only: Only) -> None:
    headers = only(signed(secrets=["another-secret"]))
    assert refused(BODY, headers, [SECRET], now=NOW) == "signature_invalid"


def test_missing_headers_are_refused() -> None:
    assert refused(BODY, CIMultiDict(), [SECRET], now=NOW) == "signature_missing"
    full = standard_only(signed())
    for left_out in (ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER):
        partial = CIMultiDict({k: v for k, v in full.items() if k != left_out})
        assert refused(BODY, partial, [SECRET], now=NOW) == "signature_missing", left_out


def test_a_partial_standard_signature_is_not_saved_by_a_seed_one() -> None:
    # Standard headers present means Standard rules apply, so freshness cannot be skipped.
    headers = signed()
    del headers[TIMESTAMP_HEADER]
    assert refused(BODY, headers, [SECRET], now=NOW) == "signature_missing"


def test_a_timestamp_that_is_not_a_number_is_refused() -> None:
    headers = standard_only(signed())
    headers[TIMESTAMP_HEADER] = "yesterday"
    assert refused(BODY, headers, [SECRET], now=NOW) == "signature_timestamp_invalid"


@pytest.mark.parametrize("offset", [-301, 301], ids=["301s-old", "301s-ahead"])
def test_a_timestamp_beyond_tolerance_is_refused(offset: int) -> None:
    headers = signed(timestamp=NOW + offset)
    code = refused(BODY, headers, [SECRET], now=NOW)
    assert code == "signature_timestamp_out_of_tolerance"


@pytest.mark.parametrize("offset", [-300, 300])
def test_a_timestamp_at_the_tolerance_is_accepted(offset: int) -> None:
    assert verify(BODY, signed(timestamp=NOW + offset), [SECRET], now=NOW) is Scheme.STANDARD


def test_the_seed_scheme_has_no_timestamp_to_expire() -> None:
    headers = seed_only(signed(timestamp=NOW - 10_000))
    assert verify(BODY, headers, [SECRET], now=NOW) is Scheme.SEED


@pytest.mark.parametrize("only", [seed_only, standard_only], ids=["seed", "standard"])
def test_rotation_every_secret_verifies_and_the_first_signs(only: Only) -> None:
    old, new = "old-secret", "new-secret"
    rotating = [new, old]
    signed_by_old = only(signed(secrets=[old]))
    signed_by_new = only(signed(secrets=rotating))
    assert verify(BODY, signed_by_old, rotating, now=NOW)
    assert verify(BODY, signed_by_new, rotating, now=NOW)
    # The list's first secret is the one that signs.
    assert verify(BODY, signed_by_new, [new], now=NOW)
    assert refused(BODY, signed_by_new, [old], now=NOW) == "signature_invalid"
    assert refused(BODY, signed_by_old, ["third"], now=NOW) == "signature_invalid"


def test_standard_header_may_carry_several_signatures() -> None:
    old, new = "old-secret", "new-secret"
    headers = standard_only(signed(secrets=[new]))
    by_old = standard_signature("evt_1", NOW, BODY, old)
    headers[SIGNATURE_HEADER] = f"v1a,ignored {by_old} {headers[SIGNATURE_HEADER]}"
    assert verify(BODY, headers, [old], now=NOW) is Scheme.STANDARD
    assert verify(BODY, headers, [new], now=NOW) is Scheme.STANDARD
    assert refused(BODY, headers, ["third"], now=NOW) == "signature_invalid"


def test_whsec_secrets_are_base64_keys() -> None:
    key = bytes(range(32))
    secret = "whsec_" + base64.b64encode(key).decode()
    headers = signed(secrets=[secret])
    assert verify(BODY, headers, [secret], now=NOW) is Scheme.STANDARD
    expected = hmac.new(key, f"evt_1.{NOW}.".encode() + BODY, hashlib.sha256).digest()
    assert headers[SIGNATURE_HEADER] == "v1," + base64.b64encode(expected).decode()
    # The decoded key, not the text: signing with the text itself must not verify.
    assert refused(BODY, headers, [secret.removeprefix("whsec_")], now=NOW) == "signature_invalid"


def test_standard_webhooks_reference_vector() -> None:
    # The test vector published with the Standard Webhooks reference libraries.
    signature = standard_signature(
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        1614265330,
        b'{"test": 2432232314}',
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    )
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


@pytest.mark.parametrize(
    "header",
    [
        lambda s: s,
        lambda s: "sha256=" + s,
        lambda s: s.upper(),
        lambda s: f"  {s} ",
    ],
    ids=["plain", "sha256-prefix", "uppercase", "padded"],
)
def test_seed_header_spellings(header: Callable[[str], str]) -> None:
    value = header(seed_signature(BODY, SECRET))
    assert verify(BODY, CIMultiDict({SEED_HEADER: value}), [SECRET]) is Scheme.SEED


def test_seed_signature_is_what_openssl_prints(tmp_path: Path) -> None:
    openssl = shutil.which("openssl")
    assert openssl is not None, "openssl is needed to check the seed's documented command"
    payload = tmp_path / "payload.json"
    # The seed README's payload, trailing bytes included: openssl signs the file as is.
    payload.write_bytes(
        b'{"event_type":"payment.completed","payment_id":"p1","provider":"test_provider",'
        b'"data":{"reference":"PAY-1"}}1\n'
    )
    printed = subprocess.run(
        [openssl, "dgst", "-sha256", "-hmac", SECRET, str(payload)],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    # "HMAC-SHA2-256(payload.json)= <hex>": the seed README takes the second field.
    assert printed.split()[1] == seed_signature(payload.read_bytes(), SECRET)
