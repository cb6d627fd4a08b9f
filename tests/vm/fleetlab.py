"""A one-machine fleet for the tests and bench/fleet.py: a real etcd on loopback (tests/fleet_etcd.py), one store
directory, one fleet key, and daemons started as separate hosts would be (each with its own socket, TCP port,
runtime, state and log directories and host key), every process ended by its pid."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from memvisor.service.peers import FORWARDED
from tests.fleet_etcd import EtcdServer, fleet_key, free_port, start_etcd

POLICY = {"vm": {"memory_mib": 160}, "swap": {"size_mib": 64}}
LOCAL = {FORWARDED: "test"}  # a request the node answers itself (as a forwarded one): never forwarded again
# A counter that keeps counting in its own memory (and a marker there and on disk). Each count is written to a new
# file renamed into place: a look right after a resume could otherwise read the file between its truncation and
# the write (the park froze the process there; seen as an empty count in the fleet soak).
COUNTER = ("echo \"$MARK\" > /tmp/marker; python3 -c 'import os, sys, time\nm = sys.argv[1] * 4096\ni = 0\n"
           "while True:\n    i += 1\n    open(\"/tmp/count.new\", \"w\").write(str(i))\n"
           "    os.rename(\"/tmp/count.new\", \"/tmp/count\")\n    time.sleep(0.2)' \"$MARK\" "
           "</dev/null >/dev/null 2>&1 & echo $! > /tmp/pid")
LOOK = "kill -0 $(cat /tmp/pid) && echo alive; cat /tmp/marker; cat /tmp/count"
START_S = 60.0


@dataclass
class Node:
    """One daemon of the lab's fleet."""

    name: str
    folder: Path
    port: int
    env: dict[str, str]
    proc: subprocess.Popen[bytes]

    @property
    def socket(self) -> Path:
        return self.folder / "serve.sock"

    @property
    def runtime(self) -> Path:
        return self.folder / "run"

    def api(self, timeout: float = 300) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)), base_url="http://memvisor",
                            timeout=timeout)

    def log(self) -> str:
        return (self.folder / "daemon.log").read_text(errors="replace")

    def signal(self, signo: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signo)

    def stop(self, timeout: float = 300) -> int:
        """SIGTERM (the daemon drains), and wait; its exit status."""
        self.signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        self.signal(signal.SIGCONT)  # a stopped process takes its SIGKILL at once either way
        self.signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


@dataclass
class FleetLab:
    """etcd, a store and a fleet key under `root`; start() adds daemons."""

    root: Path
    etcd: EtcdServer = field(init=False)
    store: Path = field(init=False)
    key: Path = field(init=False)
    nodes: dict[str, Node] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.etcd = start_etcd(self.root / "etcd")
        self.store = self.root / "store"
        self.store.mkdir(mode=0o700, exist_ok=True)
        self.key = fleet_key(self.root / "fleet.key")

    def env_of(self, name: str) -> dict[str, str]:
        folder = self.root / name
        return {**os.environ, "MEMVISOR_SOCKET": str(folder / "serve.sock"),
                "MEMVISOR_RUNTIME_DIR": str(folder / "run"), "MEMVISOR_STATE_DIR": str(folder / "state"),
                "MEMVISOR_LOG_DIR": str(folder / "logs"), "MEMVISOR_KEY_FILE": str(folder / "keys" / "host.key"),
                "MEMVISOR_CONFIG": str(folder / "none.toml")}

    def argv(self, name: str, port: int, *extra: str, key: Path | None = None, store: Path | None = None) -> list[str]:
        folder = self.root / name
        return [sys.executable, "-m", "memvisor", "-q", "serve", "--fleet", self.etcd.url, "--node", name,
                "--store", str(store or self.store), "--fleet-key-file", str(key or self.key),
                "--listen", f"127.0.0.1:{port}", "--token-file", str(folder / "token"), *extra]

    def start(self, name: str, *extra: str, key: Path | None = None, store: Path | None = None,
              port: int | None = None) -> Node:
        """A daemon named `name` (its own directories, kept across restarts of the same name); waits until it
        answers. AssertionError with its log if it exits first."""
        folder = self.root / name
        folder.mkdir(exist_ok=True)
        port = port or (self.nodes[name].port if name in self.nodes else free_port())
        env = self.env_of(name)
        with open(folder / "daemon.log", "ab") as log:
            proc = subprocess.Popen(self.argv(name, port, *extra, key=key, store=store), env=env, stdout=log,
                                    stderr=log, stdin=subprocess.DEVNULL)
        node = Node(name, folder, port, env, proc)
        self.nodes[name] = node
        deadline = time.monotonic() + START_S
        while True:
            try:
                with node.api() as api:
                    api.get("/v1/sandboxes").raise_for_status()
                return node
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline, f"daemon {name} did not start:\n" \
                    + node.log()[-3000:]
                time.sleep(0.1)

    def close(self) -> None:
        """Remove what each daemon still holds (a test that failed half way), then stop every daemon (SIGTERM;
        SIGKILL if one hangs) and etcd."""
        for node in self.nodes.values():
            node.signal(signal.SIGCONT)
            if node.proc.poll() is None:
                try:
                    with node.api() as api:
                        for sandbox in api.get("/v1/sandboxes").json():
                            api.delete(f"/v1/sandboxes/{sandbox['id']}")
                except (httpx.HTTPError, ValueError, TypeError):
                    pass  # the daemon is in no state to answer: its stop below says what it left
        for node in self.nodes.values():
            try:
                node.stop(timeout=300)
            except subprocess.TimeoutExpired:
                node.kill()
        self.etcd.stop()


def create(api: httpx.Client, name: str, policy: dict[str, Any] | None = None) -> dict[str, Any]:
    made = api.post("/v1/sandboxes", json={"name": name, "policy": policy or POLICY})
    assert made.status_code == 201, made.text
    info: dict[str, Any] = made.json()
    return info


def sh(api: httpx.Client, key: str, script: str, headers: dict[str, str] | None = None
       ) -> tuple[int, dict[str, Any], str]:
    """Run `script` as root in sandbox `key`: (HTTP status, the exit record or the error body, stdout)."""
    out = b""
    end: dict[str, Any] = {}
    with api.stream("POST", f"/v1/sandboxes/{key}/exec", json={"argv": ["sh", "-c", script], "root": True},
                    headers=headers) as response:
        if response.status_code != 200:
            return response.status_code, json.loads(response.read() or b"{}"), ""
        for line in response.iter_lines():
            item = json.loads(line)
            out += base64.b64decode(item.get("stdout", ""))
            end = item.get("exit") or ({"error": item["error"]} if "error" in item else end)
    return 200, end, out.decode()


def ok(api: httpx.Client, key: str, script: str, headers: dict[str, str] | None = None) -> str:
    """Run `script`; its stdout, asserting it exited 0."""
    status, end, out = sh(api, key, script, headers)
    assert status == 200 and end.get("exit_code") == 0, (status, end, out)
    return out


def park(api: httpx.Client, key: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """Park sandbox `key`; its answer, asserting it is parked."""
    r = api.post(f"/v1/sandboxes/{key}/park", json={}, headers=headers)
    assert r.status_code == 200 and r.json()["state"] == "parked", r.text
    info: dict[str, Any] = r.json()
    return info
