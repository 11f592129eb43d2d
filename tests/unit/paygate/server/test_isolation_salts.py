"""Cache-isolation salts are remembered per tenant: the same salt as computing it afresh, a
payer's address in any case one tenant, the table bounded."""

from __future__ import annotations

from paygate.server.isolation import Salts, Tenant


def test_a_remembered_salt_is_the_computed_one() -> None:
    salts = Salts(b"operator secret")
    payer = Tenant("payer", "0xAbC0000000000000000000000000000000000001")
    first = salts.salt(payer)
    assert salts.salt(payer) == first
    assert Salts(b"operator secret").salt(payer) == first  # not per process: keyed by the secret
    assert salts.salt(Tenant("payer", payer.id.lower())) == first
    assert salts.salt(Tenant("free", payer.id)) != first  # the free callers' own domain
    assert Salts(b"another secret").salt(payer) != first


def test_the_table_is_bounded() -> None:
    salts = Salts(b"s")
    for i in range(Salts.KEPT + 10):
        salts.salt(Tenant("free", f"10.0.{i // 256}.{i % 256}"))
    assert len(salts._known) <= Salts.KEPT
