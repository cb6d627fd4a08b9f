"""docs/templates.md's command lines, run as written against real guests: its ```sh blocks, line by line, through
`sh -c`, with only `memvisor serve &` replaced by a daemon of this test (private socket, runtime and state
directories) and `memvisor` by this checkout's CLI. A documented line that stops working fails here (the
`--from` form once ran `--from base` as a warm-up command). The daemon is also checked to run without core dumps."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from memvisor.image.build import Image
from tests.vm.test_service import start_daemon, stop_daemon

DOC = Path(__file__).parents[2] / "docs" / "templates.md"
SERVE = "memvisor serve &"
# `memvisor` in a documented line is this checkout's CLI (as tests/vm/conftest.py's memvisor_argv runs it).
PRELUDE = 'memvisor() { "$MEMVISOR_TEST_PYTHON" -m memvisor -q "$@"; }\n'


def sh_blocks(text: str) -> list[list[str]]:
    """The logical lines (backslash continuations joined) of each ```sh block, comment-only lines dropped."""
    blocks = []
    for body in re.findall(r"^```sh\n(.*?)^```$", text, re.S | re.M):
        lines = re.sub(r"\\\n", "", body).splitlines()
        blocks.append([line for line in lines if line.strip() and not line.lstrip().startswith("#")])
    return blocks


def shell(line: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["sh", "-c", PRELUDE + line], capture_output=True, text=True, timeout=300,
                       stdin=subprocess.DEVNULL, env={**os.environ, "MEMVISOR_TEST_PYTHON": sys.executable})
    assert r.returncode == 0, (line, r.returncode, r.stdout, r.stderr)
    return r


def test_the_documented_template_lines_work_as_written(image: Image, tmp_path: Path) -> None:
    quick, from_base = sh_blocks(DOC.read_text())
    assert quick[0] == SERVE and SERVE not in quick[1:] + from_base
    assert any("template create py --from base" in line for line in from_base)
    daemon = start_daemon(tmp_path)
    try:
        limits = Path(f"/proc/{daemon.proc.pid}/limits").read_text()
        assert re.search(r"^Max core file size\s+0\s+0\s", limits, re.M), limits  # `serve` dumps no core
        for line in quick[1:]:
            out = shell(line).stdout
            if "exec agent-1" in line:
                assert out == "1\n"
                # the process the warm-up left runs on in the clone (the doc says so)
                warm = shell("""memvisor exec agent-1 -- python3 -c 'import glob
print(*(open(p, "rb").read() for p in glob.glob("/proc/[0-9]*/cmdline")))'""")
                assert "import decimal, json, sqlite3" in warm.stdout, warm.stdout
            if line.endswith("template ls"):
                assert re.search(r"^py\s", out, re.M), out
        for line in from_base:
            shell(line)
        # The --from template holds base's warm state, and its clone woke as its own machine.
        shell("memvisor create --template py --name check")
        assert shell("memvisor exec check -- cat /tmp/state").stdout == "warm\n"
        assert '"hostname": "memvisor-' in shell("memvisor exec check -- cat /run/memvisor/forked").stdout
        shell("memvisor stop check && memvisor template rm py")
        assert shell("memvisor template ls --json").stdout.strip() == "[]"
    finally:
        stop_daemon(daemon)
