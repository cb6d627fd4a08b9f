"""The manifest: one canonical serialization, a digest over everything but the wrapped key, every field checked;
and what park.py binds of a clone's template."""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any

import pytest

from memvisor.snapshot import park
from memvisor.snapshot.files import StateError
from memvisor.snapshot.manifest import KeptFile, Manifest, TemplateRef
from memvisor.snapshot.statedir import SnapshotProblem

WRAPPED = base64.b64encode(bytes(60)).decode()


def manifest(**changes: Any) -> Manifest:
    base = Manifest(kind="sandbox", id="abc", generation=2, parked_at=1.5,
                    streams={"vm": {"plaintext_bytes": 1, "file_bytes": 2, "allocated_bytes": 4096}},
                    files={"swap.img": KeptFile(3, 8192, "confidential")},
                    sandbox={"name": "n", "policy": {"vm": {"memory_mib": 192}}, "hello": {"x": [1, 2.5]}},
                    template=TemplateRef("py", "t-0123456789abcdef", 1, "ab" * 32), wrapped_key=WRAPPED)
    return dataclasses.replace(base, **changes)


def test_round_trip_is_byte_exact_and_canonical() -> None:
    m = manifest()
    data = m.to_bytes()
    assert Manifest.from_bytes(data, "meta.json") == m
    assert data == (json.dumps(json.loads(data), sort_keys=True, separators=(",", ":")) + "\n").encode()
    assert m.disk_bytes() == 4096 + 8192


def test_the_digest_covers_everything_but_the_wrapped_key() -> None:
    m = manifest()
    assert m.digest() == manifest(wrapped_key=base64.b64encode(bytes([1] * 60)).decode()).digest()
    for change in ({"kind": "template"}, {"id": "abd"}, {"generation": 3}, {"parked_at": 1.25},
                   {"streams": {"vm": {"plaintext_bytes": 1, "file_bytes": 2, "allocated_bytes": 0}}},
                   {"files": {"swap.img": KeptFile(3, 8192, "plain")}}, {"sandbox": {"name": "m"}},
                   {"template": None}, {"template": TemplateRef("py", "t-0123456789abcdef", 2, "ab" * 32)}):
        assert manifest(**change).digest() != m.digest(), change


@pytest.mark.parametrize("text", [
    lambda d: d.replace(b'"generation":2', b'"generation": 2'),  # a space
    lambda d: d.replace(b'"kind":"sandbox"', b'"kind":"sandbox","kind":"sandbox"'),  # a duplicate key
    lambda d: d.replace(b'"name":"n"', b'"name":"\\u006e"'),  # an escape of the same text
    lambda d: d.rstrip(b"\n"),
])
def test_the_same_json_in_other_bytes_is_refused(text: Any) -> None:
    data = manifest().to_bytes()
    changed = text(data)
    assert changed != data and json.loads(changed) == json.loads(data)
    with pytest.raises(StateError, match="not in memvisor's canonical form"):
        Manifest.from_bytes(changed, "meta.json")


@pytest.mark.parametrize("change", [
    {"generation": 0}, {"generation": "2"}, {"id": "../x"}, {"kind": "vm"}, {"wrapped_key": "not base64!"},
    {"wrapped_key": "AAAA"}, {"parked_at": "now"}, {"streams": {"disk": {}}},
    {"streams": {"vm": {"plaintext_bytes": -1, "file_bytes": 2, "allocated_bytes": 0}}},
    {"files": {"../host.key": {"bytes": 1, "allocated_bytes": 0, "protection": "plain"}}},
    {"files": {"meta.json": {"bytes": 1, "allocated_bytes": 0, "protection": "plain"}}},
    {"files": {"vm.snap": {"bytes": 1, "allocated_bytes": 0, "protection": "plain"}}},
    {"files": {"swap.img": {"bytes": 1, "allocated_bytes": 0, "protection": "hopeful"}}},
    {"files": {"swap.img": 3}}, {"template": {"name": "py"}}, {"sandbox": []}, {"extra": 1},
])
def test_malformed_manifests_are_refused(change: dict[str, object]) -> None:
    doc = json.loads(manifest().to_bytes())
    with pytest.raises(StateError, match="meta.json is malformed"):
        Manifest.from_bytes((json.dumps(doc | change, sort_keys=True, separators=(",", ":")) + "\n").encode(),
                            "meta.json")


def test_a_clone_binds_its_templates_id_generation_and_digest() -> None:
    template = Manifest(kind="template", id="t-0123456789abcdef", generation=1, parked_at=1.0,
                        streams={}, sandbox={"name": "py"}, wrapped_key=WRAPPED)
    ref = park.template_ref(template)
    assert ref == TemplateRef("py", "t-0123456789abcdef", 1, template.digest().hex())
    clone = manifest(template=ref)
    park.check_template(clone, template)
    remade = dataclasses.replace(template, id="t-fedcba9876543210")
    with pytest.raises(SnapshotProblem, match="is a clone of template py t-0123456789abcdef .* but template py is "
                                              "now t-fedcba9876543210 .* made again"):
        park.check_template(clone, remade)
    with pytest.raises(SnapshotProblem, match="which is gone"):
        park.check_template(clone, None)
    with pytest.raises(SnapshotProblem, match="not a clone"):
        park.check_template(manifest(template=None), template)
    park.check_template(manifest(template=None), None)
