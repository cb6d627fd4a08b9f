"""The one-machine fleet as README.md and docs/fleet.md write it, run as written: the three commands (etcd and two
daemons, started in the background by `sh -c`), then the user's lines of docs/fleet.md. Only `D=...` (the demo's
directory) and the ports are changed, so that the test owns what it starts; `memvisor` is this checkout's CLI. Every
process the lines started is ended by its pid."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from memvisor.image.build import Image
from tests.fleet_etcd import free_port
from tests.vm.conftest import alive, wait_for
from tests.vm.test_template_docs import sh_blocks

ROOT = Path(__file__).parents[2]


def fleet_lines() -> tuple[list[str], list[str]]:
    """README's three commands (the block after "A fleet of hosts on one machine"), and docs/fleet.md's lines
    of a user (its second block); docs/fleet.md's first block must be README's three."""
    readme = ROOT.joinpath("README.md").read_text()
    start = sh_blocks(readme[readme.index("A fleet of hosts on one machine"):])[0]
    doc = sh_blocks(ROOT.joinpath("docs", "fleet.md").read_text())
    assert doc[0] == start and len(start) == 3, (doc[0], start)
    return start, doc[1]


def test_the_documented_one_machine_fleet_works_as_written(image: Image, tmp_path: Path) -> None:
    start, use = fleet_lines()
    demo = tmp_path / "demo"
    ports = {"2379": str(free_port()), "2380": str(free_port()), "7001": str(free_port()), "7002": str(free_port())}

    def local(line: str) -> str:
        line = re.sub(r"^D=\S+;", f"D={demo};", line)
        for old, new in ports.items():
            line = line.replace(f":{old}", f":{new}")
        return line

    # `memvisor` on the PATH is this checkout's CLI: a script that execs it, so `memvisor serve &`'s pid is the
    # daemon's own.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "memvisor").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m memvisor -q "$@"\n')
    (bin_dir / "memvisor").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "D": str(demo)}
    pids: list[int] = []
    try:
        for i, line in enumerate(start):
            assert line.endswith("&"), line
            # Output to a file, not a pipe: the background process keeps it open (a pipe would never end).
            log = tmp_path / f"start-{i}.log"
            with log.open("w") as f:
                r = subprocess.run(["sh", "-c", f"{local(line)}\necho pid $!"], stdout=f, stderr=subprocess.STDOUT,
                                   env=env, timeout=60, stdin=subprocess.DEVNULL)
            assert r.returncode == 0, (line, log.read_text())
            found = re.search(r"^pid (\d+)$", log.read_text(), re.M)
            assert found is not None, log.read_text()
            pids.append(int(found.group(1)))
            if "etcd" in line:
                time.sleep(1)  # etcd answers within a second; the daemon's own start check says if not
        for sock in (demo / "a.sock", demo / "b.sock"):
            wait_for(sock.exists, 60, f"the daemon's socket {sock}")
        out: list[str] = []
        for line in use:
            done = subprocess.run(["sh", "-c", f"D={demo}\n{local(line)}"], capture_output=True, text=True, env=env,
                               timeout=300, stdin=subprocess.DEVNULL)
            assert done.returncode == 0, (line, done.stdout, done.stderr)
            out.append(done.stdout)
        assert "kept\n" in out, out  # resumed on b, with what a wrote
        listed = next(o for line, o in zip(use, out, strict=True) if "fleet ls" in line)
        assert re.search(r"^[* ]a\s", listed, re.M) and re.search(r"^[* ]b\s", listed, re.M), listed
    finally:
        hung = []
        for pid in reversed(pids):  # the daemons first (they drain: nothing is left), etcd last
            if alive(pid):
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + 120
                while alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.1)
                if alive(pid):  # ended anyway, so that one that hangs does not leave the others running
                    hung.append(pid)
                    os.kill(pid, signal.SIGKILL)
        assert not hung, f"pids {hung} did not end on SIGTERM"
    assert not [p for p in (demo / "a" / "run", demo / "b" / "run") if p.exists() and any(p.iterdir())]
