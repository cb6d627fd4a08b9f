"""Templates through the daemon, against real guests (docs/templates.md): made by a warm-up command, cloned over
the API and the CLI, refused removal while clones exist, bad requests answered with a 4xx that says why, a clone
parked and resumed, and a template that outlives the daemon: the next one clones it and resumes its parked clone."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx

from memvisor.image.build import Image
from tests.vm.test_park import run
from tests.vm.test_service import cli, start_daemon, stop_daemon

WARM_UP = "echo warm > /tmp/warm && python3 -c 'import decimal' && echo done"


def make(api: httpx.Client, name: str = "py") -> dict[str, Any]:
    made = api.post("/v1/templates", json={"name": name, "argv": ["sh", "-c", WARM_UP],
                                           "policy": {"vm": {"memory_mib": 192}, "swap": {"size_mib": 64}}})
    assert made.status_code == 201, made.text
    info: dict[str, Any] = made.json()
    return info


def clone(api: httpx.Client, name: str) -> dict[str, Any]:
    made = api.post("/v1/sandboxes", json={"template": "py", "name": name})
    assert made.status_code == 201, made.text
    info: dict[str, Any] = made.json()
    assert info["template"] == "py" and info["state"] == "running"
    return info


def test_templates_through_the_daemon_and_across_its_restart(image: Image, tmp_path: Path) -> None:
    first = start_daemon(tmp_path)
    try:
        with first.unix() as api:
            info = make(api)
            assert info["ram_bytes"] > 16 << 20 and info["clones"] == [] and info["policy"]["template"]["ready"]
            one = clone(api, "one")
            out, _ = run(api, one["id"], "cat /tmp/warm; hostname; cat /proc/swaps | wc -l")
            warm, hostname, swaps = out.decode().split()
            assert (warm, hostname) == ("warm", f"memvisor-{one['id']}") and int(swaps) >= 2, out
            made = cli("create", "--template", "py", "--name", "two")
            assert made.returncode == 0, made.stderr
            two = made.stdout.strip()
            listed = cli("template", "ls", "--json")
            assert listed.returncode == 0, listed.stderr
            assert '"clones": ["' in listed.stdout and one["id"] in listed.stdout and two in listed.stdout
            # Bad requests: a 4xx naming the problem, nothing made.
            for path, body, status, words in (
                    ("/v1/templates", {"name": "Bad Name", "argv": ["true"]}, 400, "not allowed"),
                    ("/v1/templates", {"name": "x"}, 400, "either source"),
                    ("/v1/templates", {"name": "y", "source": one["id"]}, 409, "is a clone of template py"),
                    ("/v1/templates", {"name": "py", "argv": ["true"]}, 409, "already exists"),
                    ("/v1/sandboxes", {"template": "nope"}, 404, "no template 'nope'"),
                    ("/v1/sandboxes", {"template": "py", "policy": {"vm": {"memory_mib": 256}}}, 400, "no policy")):
                r = api.post(path, json=body)
                assert r.status_code == status and words in r.text, (body, r.status_code, r.text)
            refused = api.delete("/v1/templates/py")
            assert refused.status_code == 409 and "used by 2 sandbox(es)" in refused.text
            plain = api.post("/v1/sandboxes", json={"policy": {"vm": {"memory_mib": 128}}})
            assert plain.status_code == 201, plain.text
            r = api.post("/v1/templates", json={"name": "z", "source": plain.json()["id"]})
            assert r.status_code == 400 and "was not created templatable" in r.text, r.text
            assert api.delete(f"/v1/sandboxes/{plain.json()['id']}").status_code == 200
            # A clone parks like any sandbox (its snapshot carries the pages it wrote and the template's).
            run(api, two, "echo mine > /tmp/mine")
            assert api.post(f"/v1/sandboxes/{two}/park", json={}).status_code == 200
            assert api.delete(f"/v1/sandboxes/{one['id']}").status_code == 200
    finally:
        stop_daemon(first)
    second = start_daemon(tmp_path)
    try:
        with second.unix() as api:
            [kept] = api.get("/v1/templates").json()
            assert kept["name"] == "py" and kept["clones"] == [two] and not kept["ram_loaded"]
            out, end = run(api, two, "cat /tmp/mine /tmp/warm")  # resumes over the template, rebuilt from disk
            assert out == b"mine\nwarm\n" and end["resume_seconds"] > 0
            three = clone(api, "three")
            assert run(api, three["id"], "cat /tmp/warm")[0] == b"warm\n"
            for key in (two, three["id"]):
                assert api.delete(f"/v1/sandboxes/{key}").status_code == 200
            assert api.delete("/v1/templates/py").status_code == 200
            assert api.get("/v1/templates").json() == []
    finally:
        stop_daemon(second)
    assert not any((Path(os.environ["MEMVISOR_STATE_DIR"]) / "templates").iterdir())
