"""What the gateway makes of an accepted payment, without a broker or a database."""

from __future__ import annotations

import re
import secrets

import pytest

from services.gateway.intake import new_reference

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
REFERENCE = re.compile(r"^PAY-[0-9A-HJKMNP-TV-Z]{10}$")


def test_a_reference_spells_its_50_random_bits_in_crockford_base32(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    digits = [1, 2, 3, 4, 5, 6, 7, 8, 9, 31]
    bits = sum(digit << (5 * (9 - i)) for i, digit in enumerate(digits))
    monkeypatch.setattr(secrets, "randbits", lambda k: bits if k == 50 else pytest.fail(str(k)))
    assert new_reference() == "PAY-123456789Z"


def test_references_use_the_whole_alphabet_in_every_position() -> None:
    references = [new_reference() for _ in range(2000)]
    assert all(REFERENCE.match(reference) for reference in references)
    assert len(set(references)) == len(references)
    for position in range(4, 14):
        assert {reference[position] for reference in references} == set(CROCKFORD)
