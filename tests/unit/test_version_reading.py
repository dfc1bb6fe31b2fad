"""Reading one version of a contract as another: downcaster chains, re-validation, and
the errors that name both versions (no I/O)."""

from __future__ import annotations

import pytest

from banyan_bus import ContractError, Event, HandlerError, downcaster, upcaster
from banyan_bus.contracts import registry
from banyan_bus.errors import ConfigurationError
from banyan_bus.versions import downcast_chain, pinned_versions, read_as


class LeaseSigned(Event):
    lease_id: str
    tenant: str


class LeaseSignedV2(Event, name="LeaseSigned", version=2):
    lease_id: str
    tenant: str
    deposit: int = 0


class LeaseSignedV3(Event, name="LeaseSigned", version=3):
    lease_id: str
    tenants: list[str]


@downcaster(LeaseSignedV3, LeaseSignedV2)
def lease_v3_to_v2(new: LeaseSignedV3) -> LeaseSignedV2:
    return LeaseSignedV2(lease_id=new.lease_id, tenant=", ".join(new.tenants))


@downcaster(LeaseSignedV2, LeaseSigned)
def lease_v2_to_v1(new: LeaseSignedV2) -> LeaseSigned:
    return LeaseSigned(lease_id=new.lease_id, tenant=new.tenant.upper())


@upcaster(LeaseSigned, LeaseSignedV2)
def lease_v1_to_v2(old: LeaseSigned) -> LeaseSignedV2:
    return LeaseSignedV2(lease_id=old.lease_id, tenant=old.tenant, deposit=-1)


class KeyIssued(Event):
    key_id: str
    room: int


class KeyIssuedV2(Event, name="KeyIssued", version=2):
    key_id: str
    room: int
    floor: int = 0


class KeyIssuedV3(Event, name="KeyIssued", version=3):
    key_id: str
    door: str


def test_downcasters_chain_from_newer_to_older() -> None:
    assert downcast_chain("LeaseSigned", 3, 1) == [lease_v3_to_v2, lease_v2_to_v1]
    assert downcast_chain("LeaseSigned", 3, 2) == [lease_v3_to_v2]
    assert downcast_chain("KeyIssued", 2, 1) is None
    old = read_as(LeaseSignedV3(lease_id="l", tenants=["ann", "bo"]), LeaseSigned)
    assert old == LeaseSigned(lease_id="l", tenant="ANN, BO")


def test_read_as_prefers_a_declared_converter_to_validation() -> None:
    assert read_as(LeaseSigned(lease_id="l", tenant="t"), LeaseSignedV2).deposit == -1
    assert read_as(LeaseSignedV2(lease_id="l", tenant="t"), LeaseSigned).tenant == "T"


def test_without_a_converter_an_additive_change_is_read_by_validation() -> None:
    assert read_as(KeyIssuedV2(key_id="k", room=4, floor=2), KeyIssued) == KeyIssued(
        key_id="k", room=4
    )
    assert read_as(KeyIssued(key_id="k", room=4), KeyIssuedV2) == KeyIssuedV2(key_id="k", room=4)
    same = KeyIssued(key_id="k", room=1)
    assert read_as(same, KeyIssued) is same


def test_an_unreadable_version_names_both_versions_and_the_way_out() -> None:
    with pytest.raises(ContractError) as info:
        read_as(KeyIssuedV3(key_id="k", door="d"), KeyIssued)
    text = str(info.value)
    assert "KeyIssued v3 cannot be read as v1 (KeyIssued): room: Field required" in text
    assert "@downcaster(KeyIssuedV3, KeyIssued)" in text


def test_a_downcaster_goes_from_newer_to_older_of_one_type() -> None:
    with pytest.raises(HandlerError, match="newer to an older"):
        downcaster(KeyIssued, KeyIssuedV2)
    with pytest.raises(HandlerError, match="newer to an older"):
        downcaster(KeyIssuedV2, LeaseSigned)


def test_pins_resolve_classes_and_names_and_refuse_unknown_versions() -> None:
    assert pinned_versions({KeyIssuedV3: 1, "LeaseSigned": 2}, registry) == {
        "KeyIssued": KeyIssued,
        "LeaseSigned": LeaseSignedV2,
    }
    with pytest.raises(ConfigurationError, match=r"KeyIssued to version 9.*\[1, 2, 3\]"):
        pinned_versions({KeyIssued: 9}, registry)
    with pytest.raises(ConfigurationError, match="contract classes or message type names"):
        pinned_versions({3: 1}, registry)  # type: ignore[dict-item]
