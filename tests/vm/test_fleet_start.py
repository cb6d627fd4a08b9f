"""`memvisor serve --fleet` refuses bad input at its start, with one line naming the value and the fix, before it
touches any sandbox: an etcd that does not answer, a store that is not a directory or not memvisor's own, a fleet
key file of the wrong size or mode, a node name a live node holds, fleet flags without --fleet. (No guest boots
here; the daemon only needs the image's key.)"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.fleet_etcd import free_port
from tests.vm.fleetlab import FleetLab


def refused(lab: FleetLab, *argv: str) -> str:
    """Run `memvisor serve` with `argv`: it must exit 125 with one error line (and a hint); its stderr."""
    folder = lab.root / "x"
    folder.mkdir(exist_ok=True)
    proc = subprocess.run(argv, env=lab.env_of("x"), capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 125 and lines and lines[0].startswith("memvisor: error: "), proc.stderr
    assert all(line.startswith("memvisor: ") for line in lines) and len(lines) <= 2, proc.stderr
    assert not (folder / "serve.sock").exists()
    return proc.stderr


def test_bad_fleet_settings_are_refused_at_start(lab: FleetLab, tmp_path: Path) -> None:
    port = free_port()
    argv = lab.argv("x", port)

    def with_(flag: str, value: str) -> list[str]:
        return [*argv[:argv.index(flag) + 1], value, *argv[argv.index(flag) + 2:]]

    dead = f"etcd://127.0.0.1:{free_port()}"
    assert f"etcd at {dead} does not answer" in refused(lab, *with_("--fleet", dead))
    assert "does not start with etcd://" in refused(lab, *with_("--fleet", "http://127.0.0.1:2379"))

    file_store = tmp_path / "not-a-dir"
    file_store.write_text("")
    assert str(file_store) in refused(lab, *with_("--store", str(file_store)))
    open_store = tmp_path / "open-store"
    open_store.mkdir(mode=0o755)
    open_store.chmod(0o755)
    assert str(open_store) in refused(lab, *with_("--store", str(open_store)))

    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 16)
    short.chmod(0o600)
    assert f"the key file {short}" in refused(lab, *with_("--fleet-key-file", str(short)))
    loose = tmp_path / "loose.key"
    loose.write_bytes(b"x" * 32)
    loose.chmod(0o644)
    assert f"the key file {loose}" in refused(lab, *with_("--fleet-key-file", str(loose)))

    a = lab.start("a")
    # (a restarted node waits its lease's TTL for its old record to go: a short one here)
    assert "node name 'a' is held by a live node" in refused(lab, *with_("--node", "a"), "--fleet-ttl", "2")
    assert a.proc.poll() is None

    assert "is a fleet setting, but --fleet is not given" in refused(
        lab, *[w for w in argv if w not in ("--fleet", lab.etcd.url)])
    assert "--fleet needs --listen" in refused(lab, *argv[:argv.index("--listen")])
