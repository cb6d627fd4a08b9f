"""`memvisor serve` against real guests: the API over its unix socket and over TCP with a bearer token, the CLI
clients, hostile requests, the published OpenAPI document (a SIGKILLed daemon: tests/vm/test_crash.py).
Every daemon is started on a private socket and runtime directory and ended by pid."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from memvisor.image.build import Image
from tests.vm.conftest import alive, memvisor_argv, ps, wait_for

OPENAPI = Path(__file__).parents[2] / "docs" / "openapi.json"


@dataclass
class Daemon:
    proc: subprocess.Popen[str]
    socket: Path
    port: int
    token: str

    def unix(self) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)), base_url="http://memvisor",
                            timeout=300)

    def tcp(self, token: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=f"http://127.0.0.1:{self.port}", headers=headers, timeout=300)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True


def start_daemon(tmp_path: Path, *extra: str) -> Daemon:
    """A daemon on this test's socket; SIGTERM stops its sandboxes unless `extra` says --on-exit park."""
    sock = Path(os.environ["MEMVISOR_SOCKET"])
    if "--on-exit" not in extra:
        extra = ("--on-exit", "stop", *extra)
    token_file = tmp_path / "token"
    port = free_port()
    proc = subprocess.Popen(memvisor_argv("serve", "--listen", f"127.0.0.1:{port}", "--token-file", str(token_file),
                                          *extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    # A socket that accepts, not one that exists: a daemon killed before this one left its socket file behind.
    wait_for(lambda: proc.poll() is None and accepts(sock) and token_file.exists(), 30, "the daemon's socket")
    return Daemon(proc, sock, port, token_file.read_text().strip())


def stop_daemon(daemon: Daemon) -> str:
    if daemon.proc.poll() is None:
        daemon.proc.send_signal(signal.SIGTERM)
    _, err = daemon.proc.communicate(timeout=120)
    return err


@pytest.fixture
def daemon(image: Image, tmp_path: Path) -> Iterator[Daemon]:
    d = start_daemon(tmp_path)
    try:
        yield d
    finally:
        stop_daemon(d)
        assert not d.socket.exists(), "the daemon left its socket"


def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(memvisor_argv(*args), capture_output=True, text=True, input=stdin, timeout=300)


def exec_api(client: httpx.Client, key: str, body: dict[str, Any]) -> tuple[bytes, bytes, dict[str, Any]]:
    out, err, end = b"", b"", dict[str, Any]()
    with client.stream("POST", f"/v1/sandboxes/{key}/exec", json=body) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            item = json.loads(line)
            out += base64.b64decode(item.get("stdout", ""))
            err += base64.b64decode(item.get("stderr", ""))
            end = item.get("exit", end)
    return out, err, end


def test_create_exec_stop_over_the_socket_and_the_cli(daemon: Daemon) -> None:
    assert oct(daemon.socket.stat().st_mode & 0o777) == "0o660"
    made = cli("create", "--memory", "192", "--swap-size", "64", "--name", "agent-1")
    assert made.returncode == 0, made.stderr
    sandbox_id = made.stdout.strip()
    r = cli("exec", "agent-1", "--", "sh", "-c", "echo $((1+2)); echo oops >&2; exit 5")
    assert (r.returncode, r.stdout, r.stderr) == (5, "3\n", "oops\n")
    assert cli("exec", "-i", sandbox_id, "--", "tr", "a-z", "A-Z", stdin="shout").stdout == "SHOUT"
    with daemon.unix() as api:
        [listed] = api.get("/v1/sandboxes").json()
        assert listed["id"] == sandbox_id and listed["name"] == "agent-1" and listed["execs"] == 2
        assert listed["policy"]["swap"]["size_mib"] == 64 and alive(listed["vmm_pid"])
        out, _, end = exec_api(api, sandbox_id, {"argv": ["id", "-u"], "root": True})
        assert out == b"0\n" and end["exit_code"] == 0
        _, _, late = exec_api(api, sandbox_id, {"argv": ["sleep", "60"], "timeout": 1})
        assert late["timed_out"] and late["exit_code"] == 124
        host = api.get("/v1/host").json()
        assert host["sandboxes"] == 1 and host["committed_mib"] == 192 and host["resident_bytes"] > 0
        assert "memvisor_sandboxes 1.0" in api.get("/metrics").text
    assert [s["id"] for s in ps()] == [sandbox_id]  # `memvisor ps` lists the daemon's sandboxes too
    assert cli("stop", "agent-1").returncode == 0
    assert not alive(listed["vmm_pid"])
    gone = cli("exec", "agent-1", "--", "true")
    assert gone.returncode == 125 and "no sandbox 'agent-1'" in gone.stderr


def test_tcp_needs_the_bearer_token(daemon: Daemon) -> None:
    for token in (None, "wrong-token-0123456789"):
        with daemon.tcp(token) as api:
            r = api.get("/v1/sandboxes")
            assert r.status_code == 401 and "bearer token" in r.json()["detail"]
    with daemon.tcp(daemon.token) as api:
        assert api.get("/v1/sandboxes").json() == []
        made = api.post("/v1/sandboxes", json={"policy": {"vm": {"memory_mib": 128}}})
        assert made.status_code == 201, made.text
        assert api.delete(f"/v1/sandboxes/{made.json()['id']}").status_code == 200


def test_hostile_requests_get_4xx_and_the_daemon_carries_on(daemon: Daemon) -> None:
    with daemon.unix() as api:
        cases: list[tuple[httpx.Response, int, str]] = [
            (api.post("/v1/sandboxes", content=b"{not json", headers={"content-type": "application/json"}), 422,
             "JSON"),
            (api.post("/v1/sandboxes", json={"policy": {}, "colour": "red"}), 422, "colour"),
            (api.post("/v1/sandboxes", json={"policy": {"vm": {"memory_mib": 10**12}}}), 400, "above the maximum"),
            (api.post("/v1/sandboxes", json={"policy": {"vm": {"memory_mib": "256"}}}), 400, "invalid value"),
            (api.post("/v1/sandboxes", json={"policy": {"nosuch": {}}}), 400, "unknown section"),
            (api.post("/v1/sandboxes", json={"name": "../etc"}), 400, "not allowed"),
            (api.post("/v1/sandboxes", content=b"x" * (2 << 20), headers={"content-type": "application/json"}),
             413, "limit"),
            (api.post("/v1/sandboxes/nosuch/exec", json={"argv": ["true"]}), 404, "no sandbox"),
            (api.post("/v1/sandboxes/nosuch/exec", json={"argv": []}), 422, "argv"),
            (api.delete("/v1/sandboxes/nosuch"), 404, "no sandbox"),
        ]
        for response, status, words in cases:
            assert response.status_code == status, (response.request.content[:80], response.text)
            assert words in response.text, response.text
        assert api.get("/v1/sandboxes").json() == []
    assert daemon.proc.poll() is None


def test_published_openapi_document_is_the_running_servers(daemon: Daemon) -> None:
    with daemon.unix() as api:
        served = api.get("/openapi.json").json()
    assert served == json.loads(OPENAPI.read_text()), "docs/openapi.json is stale: memvisor serve --openapi"
