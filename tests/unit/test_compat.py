"""The compatibility gate on files: snapshot contracts, change them, read the verdict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from banyan_bus import Event
from banyan_bus.compat import FORMAT, compare, read_snapshot, snapshot, write_snapshot


class Address(BaseModel):
    street: str
    city: str


class AddressV2(BaseModel):
    street: int
    city: str


# Each "release" of a contract is its own class (the registry holds one class per type
# and version); the snapshot then names them all "MemberJoined", as one service would.
class Released(Event, name="CompatReleased", naming="free"):
    member_id: str
    email: str
    age: int
    nickname: str | None = None
    address: Address


class Breaking(Event, name="CompatBreaking", naming="free"):
    member_id: str
    age: str
    nickname: str | None
    phone: str
    address: AddressV2


class Additive(Event, name="CompatAdditive", naming="free"):
    member_id: str
    email: str
    age: int
    nickname: str | None = None
    address: Address
    referrer: str | None = None
    tags: list[str] = []


class AdditiveV2(Event, name="CompatAdditive", version=2, naming="free"):
    member_id: str


class Unrelated(Event, name="CompatUnrelated", naming="free"):
    other_id: str


def as_type(data: dict[str, Any], **names: str) -> dict[str, Any]:
    """``data`` with contract types renamed (``CompatBreaking="MemberJoined"``)."""
    for entry in data["contracts"]:
        entry["type"] = names.get(entry["type"], entry["type"])
    return data


def released(tmp_path: Path) -> dict[str, Any]:
    """The snapshot file of the released contract, written and read back."""
    path = tmp_path / "contracts.snapshot.json"
    write_snapshot(path, [Released])
    data = json.loads(path.read_text())
    path.write_text(json.dumps(as_type(data, CompatReleased="MemberJoined")))
    return read_snapshot(path)


def test_a_snapshot_lists_type_version_kind_and_wire_schema(tmp_path: Path) -> None:
    path = tmp_path / "snap.json"
    write_snapshot(path, [AdditiveV2, Released, Additive])
    text = path.read_text()
    data = json.loads(text)
    assert data["format"] == FORMAT
    assert [(e["type"], e["version"], e["kind"]) for e in data["contracts"]] == [
        ("CompatAdditive", 1, "event"),
        ("CompatAdditive", 2, "event"),
        ("CompatReleased", 1, "event"),
    ]
    assert set(data["contracts"][2]["schema"]["properties"]) == {
        "memberId",
        "email",
        "age",
        "nickname",
        "address",
    }
    write_snapshot(path, [Released, Additive, AdditiveV2])
    assert path.read_text() == text  # stable: the file diffs cleanly under version control
    assert compare(read_snapshot(path), snapshot([Released, Additive, AdditiveV2])).ok


def test_breaking_changes_to_an_existing_version_are_one_line_each(tmp_path: Path) -> None:
    report = compare(
        released(tmp_path), as_type(snapshot([Breaking]), CompatBreaking="MemberJoined")
    )
    assert report.problems == [
        "MemberJoined v1: retyped field 'address.street': string → integer",
        "MemberJoined v1: retyped field 'age': integer → string",
        "MemberJoined v1: removed field 'email'",
        "MemberJoined v1: newly required field 'nickname'",
        "MemberJoined v1: newly required field 'phone'",
    ]
    assert not report.ok


def test_additive_optional_fields_and_new_versions_pass_and_are_listed(tmp_path: Path) -> None:
    current = as_type(snapshot([Additive, AdditiveV2, Unrelated]), CompatAdditive="MemberJoined")
    report = compare(released(tmp_path), current)
    assert report.ok
    assert report.additions == [
        "MemberJoined v1: new optional field 'referrer'",
        "MemberJoined v1: new optional field 'tags'",
        "new type CompatUnrelated (v1)",
        "new version MemberJoined v2",
    ]


def test_a_renamed_type_and_a_removed_version_are_breaking(tmp_path: Path) -> None:
    before = as_type(snapshot([Additive, AdditiveV2]), CompatAdditive="MemberJoined")
    renamed = compare(before, snapshot([Additive, AdditiveV2]))
    assert renamed.problems == [
        "MemberJoined: the type is gone (renamed or removed); subscribers and publishers of it "
        "would stop matching. Keep the old name (`name='MemberJoined'`) or add a new type "
        "next to it."
    ]
    assert renamed.additions == ["new type CompatAdditive (v1, v2)"]
    dropped = compare(before, as_type(snapshot([Additive]), CompatAdditive="MemberJoined"))
    assert dropped.problems == ["MemberJoined v2: the version is gone"]


def test_documentation_changes_are_not_changes(tmp_path: Path) -> None:
    before = released(tmp_path)
    after = json.loads(json.dumps(before))
    props = after["contracts"][0]["schema"]["properties"]
    props["age"]["description"] = "in years"
    props["age"]["title"] = "Age of the member"
    assert compare(before, after) == compare(before, before)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not JSON"),
        ('{"format": "other", "contracts": []}', "not a banyan contracts snapshot"),
        (json.dumps({"format": FORMAT, "contracts": [{"type": "X"}]}), "needs 'type'"),
    ],
)
def test_a_bad_snapshot_file_says_what_is_wrong(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "snap.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_snapshot(path)
