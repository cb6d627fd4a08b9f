"""The daemon's small guards, without guests: the TCP bearer token is compared in constant time, sandbox ids are
fresh (drawn again on a collision) and a name can never equal an id (memvisor/service/api.py, registry.py)."""

from __future__ import annotations

import hmac
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

with warnings.catch_warnings():  # starlette asks for httpx2, which this project does not use
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from memvisor import policy as pol
from memvisor.errors import MemvisorError
from memvisor.host import runtime
from memvisor.service import api, registry
from memvisor.service.registry import Entry, Registry

TOKEN = "s3cret-token-0123456789"


def test_the_bearer_token_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[bytes, bytes]] = []
    constant_time = hmac.compare_digest

    def compare(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return constant_time(a, b)

    monkeypatch.setattr(hmac, "compare_digest", compare)  # the module api.py calls
    client = TestClient(api.create_app(None, TOKEN))
    for header in (None, b"Bearer wrong", f"Bearer {TOKEN}x".encode(), f"bearer {TOKEN}".encode(),
                   "Bearer s3crét".encode()):  # not ASCII: compared as bytes, a 401 and not a 500
        r = client.get("/v1/sandboxes", headers={"Authorization": header} if header else {})
        assert r.status_code == 401 and "bearer token" in r.json()["detail"], (header, r.text)
    ok = client.get("/v1/sandboxes", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 503  # past the guard: this app describes the API only
    assert len(seen) == 6 and all(b == f"Bearer {TOKEN}".encode() for _, b in seen)
    unix = TestClient(api.create_app(None))  # the unix socket's app: its file mode guards it, no token
    assert unix.get("/v1/sandboxes").status_code == 503


@pytest.fixture
def reg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Registry]:
    monkeypatch.setenv("MEMVISOR_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("MEMVISOR_STATE_DIR", str(tmp_path / "state"))
    (tmp_path / "run").mkdir(mode=0o700)
    (tmp_path / "state").mkdir(mode=0o700)
    r = Registry(lambda: None)  # type: ignore[arg-type, return-value]
    r._idle_stop.set()
    yield r


def known(r: Registry, sandbox_id: str, name: str, state: str) -> None:
    r._entries[sandbox_id] = Entry(sandbox_id, name, pol.DEFAULT, None, state=state)


def draws(monkeypatch: pytest.MonkeyPatch, *ids: str) -> list[str]:
    left = list(ids)
    monkeypatch.setattr(runtime, "new_id", lambda: left.pop(0))
    return left


def test_a_fresh_id_that_collides_is_drawn_again(reg: Registry, monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    known(reg, "aaaaaaaa", "aaaaaaaa", "running")
    known(reg, "bbbbbbbb", "web", "parked")
    known(reg, "cccccccc", "dddddddd", "parked")  # a name from before names could not look like ids
    (tmp_path / "run" / "eeeeeeee").mkdir()  # a `memvisor run` sandbox, or one left by a crash
    (tmp_path / "state" / "ffffffff").mkdir(mode=0o700)  # a parked snapshot this daemon did not list
    left = draws(monkeypatch, "aaaaaaaa", "bbbbbbbb", "dddddddd", "eeeeeeee", "ffffffff", "12345678", "99999999")
    assert reg.fresh_id() == "12345678" and left == ["99999999"]


def test_an_id_source_that_only_collides_is_an_error(reg: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    known(reg, "aaaaaaaa", "a", "running")
    draws(monkeypatch, *["aaaaaaaa"] * registry.ID_DRAWS)
    with pytest.raises(MemvisorError, match="no free sandbox id"):
        reg.fresh_id()


def test_every_drawn_id_has_the_form_names_may_not_have() -> None:
    assert all(registry.ID_FORM.fullmatch(runtime.new_id()) for _ in range(200))


@pytest.mark.parametrize("name", ["deadbeef", "01234567", "a1b2c3d4"])
def test_a_name_of_the_form_of_an_id_is_refused(name: str, reg: Registry) -> None:
    with pytest.raises(MemvisorError) as refused:
        reg.create(pol.DEFAULT, name)
    assert "has the form of a sandbox id" in refused.value.message and refused.value.hint
    assert not reg._entries  # refused before anything is made


@pytest.mark.parametrize("name", ["deadbeef0", "deadbeeg", "agent-1", "dead.bee", "7"])
def test_names_unlike_an_id_pass(name: str) -> None:
    registry.check_name(name)


def test_the_api_answers_400_with_the_hint(reg: Registry) -> None:
    r = TestClient(api.create_app(reg)).post("/v1/sandboxes", json={"name": "cafe0123", "policy": {}})
    body: dict[str, Any] = r.json()
    assert r.status_code == 400 and "form of a sandbox id" in body["detail"] and "cafe0123-1" in body["hint"]


PRIVATE = """
import json, os, resource, subprocess, time
from memvisor import proc
fd = os.open("/dev/null", os.O_RDONLY)
if os.geteuid() == 0:  # as an unprivileged user: that is where /proc/self/fd and /proc/PID ownership change
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    proc.prctl(proc.PR_SET_DUMPABLE, 1)  # as a process started by that user (setuid cleared it)
hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))  # core files allowed, as far as this user may
before = proc.prctl(proc.PR_GET_DUMPABLE, 0), resource.getrlimit(resource.RLIMIT_CORE)
proc.keep_memory_private()
again = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)  # as the daemon opens its kernel, initrd and disks
child = subprocess.Popen(["sleep", "30"])  # a VMM: dumpable again after its execve
deadline = time.monotonic() + 10  # Popen may return (vfork) before the exec has made it dumpable
while os.stat(f"/proc/{child.pid}/status").st_uid == 0 and time.monotonic() < deadline:
    time.sleep(0.01)
try:
    print(json.dumps({"before": before, "dumpable": proc.prctl(proc.PR_GET_DUMPABLE, 0), "uid": os.getuid(),
                      "core": resource.getrlimit(resource.RLIMIT_CORE),
                      "same_file": os.fstat(again).st_rdev == os.fstat(fd).st_rdev,
                      "owner": os.stat(f"/proc/{os.getpid()}/status").st_uid,
                      "child_owner": os.stat(f"/proc/{child.pid}/status").st_uid}))
finally:
    child.kill()
"""


def test_the_daemon_process_cannot_be_dumped_or_traced() -> None:
    """keep_memory_private(), which `memvisor serve` calls first: no core file, no ptrace (/proc/PID/* belongs to
    root once a process is not dumpable); its own /proc/self/fd/N still opens, and a child's execve makes the child
    dumpable again (the VMMs)."""
    import json
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", PRIVATE], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    assert seen["before"][0] == 1 and seen["before"][1][0] != 0  # what the call changes
    assert seen["dumpable"] == 0 and seen["core"] == [0, 0] and seen["same_file"]
    assert seen["uid"] != 0 and seen["owner"] == 0 and seen["child_owner"] == seen["uid"]
