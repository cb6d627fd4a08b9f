"""Sandboxes that stay up: many commands in one booted guest, at once, each with its own id, argv, env, cwd,
uid, stdin, timeout, output and exit status (protocol 3). Asserted from the host's results and from the guest's
own view (its uptime: one boot serves every command)."""

from __future__ import annotations

import hashlib
import threading
import time

from memvisor import policy
from memvisor.host.result import RunResult
from memvisor.host.sandbox import Instance
from memvisor.image.build import Image
from memvisor.sdk import Sandbox
from tests.vm.conftest import alive


def test_many_commands_in_one_sandbox(image: Image) -> None:
    with Instance(policy.merge(("test", {"memory_mib": 192})), image) as vm:
        results: dict[str, RunResult] = {}
        ended: dict[str, float] = {}

        def run(name: str, argv: list[str]) -> None:
            results[name] = vm.exec(argv)
            ended[name] = time.monotonic()

        threads = [threading.Thread(target=run, args=("slow", ["sh", "-c", "sleep 3; echo slow; exit 4"])),
                   threading.Thread(target=run, args=("fast", ["sh", "-c", "echo fast >&2"]))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert results["slow"].exit_code == 4 and results["slow"].stdout == b"slow\n"
        assert results["fast"].exit_code == 0 and results["fast"].stderr == b"fast\n"
        assert ended["fast"] < ended["slow"], "the commands did not run at once"

        data = bytes(range(256)) * 2000  # 512,000 bytes, more than one frame
        piped = vm.exec(["sha256sum"], stdin=data)
        assert piped.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()

        late = vm.exec(["sh", "-c", "sleep 60 & sleep 60"], timeout=1)
        assert late.timed_out and late.exit_code == 124

        who = vm.exec(["sh", "-c", 'echo "$(id -u) $X $(pwd)"'], env={"X": "y"}, cwd="/tmp")
        assert who.stdout == b"1000 y /tmp\n"
        assert vm.exec(["id", "-u"], uid=0).stdout == b"0\n"
        assert vm.exec(["no-such-program"]).exit_code == 127

        uptimes = [float(vm.exec(["cut", "-d", " ", "-f1", "/proc/uptime"]).stdout) for _ in range(2)]
        assert uptimes[0] < uptimes[1], "each command must run in the same boot"
        assert vm.process is not None and vm.process.poll() is None
        vm.shutdown()
        assert vm.process.poll() is not None, "SHUTDOWN must power the guest off"


def test_sdk_start_exec_stop() -> None:
    with Sandbox(memory_mib=160, config_file=False).start() as live:
        assert live.exec(["echo", "one"]).stdout == b"one\n"
        assert live.exec(["cat"], stdin=b"two").stdout == b"two"
        assert live.exec(["id", "-u"], root=True).stdout == b"0\n"
        pid = live._vm.process.pid if live._vm.process else 0
    assert pid and not alive(pid)
