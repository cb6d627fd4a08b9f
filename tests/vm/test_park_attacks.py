"""What someone holding the state directory (a restored backup, a moved disk, a shared filesystem) tries against
parked sandboxes, against real guests and a real daemon (docs/security.md, "What a parked sandbox trusts"):

- one byte of a manifest changed: refused, the sandbox stays parked and listed with the reason, and resumes once
  the byte is put back;
- a kept disk replaced by a symlink or given a second name (hard link): refused by the checks on its descriptor;
  replaced by another sandbox's disk of the same size and mode, which those checks cannot tell: with confidential
  swap the guest reads I/O errors, never the other data;
- an older sandbox directory put back with the ledger of its time: the daemon refuses to start (the ledger's head,
  beside the key, disagrees); the key file removed or replaced: refused, naming it, nothing recreated;
- an older template of the same name put back, and a template moved into a sandbox's place: refused;
- and a resume that fails before the guest answers leaves the sandbox parked on its intact snapshot.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from memvisor.errors import MemvisorError
from memvisor.image.build import Image
from tests.vm.conftest import memvisor_argv, qemu_processes
from tests.vm.test_park import park, refused, run
from tests.vm.test_service import exec_api, start_daemon, stop_daemon

# 16 MiB of random data in tmpfs, pushed out to (confidential) swap by a reclaim of the command's own cgroup
# (far quicker under TCG than a hog that squeezes the whole guest).
DATA = """
set -e
head -c 16777216 /dev/urandom > /tmp/data
sha256sum /tmp/data | cut -d' ' -f1 > /tmp/data.sum
cg=/sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)
for i in 1 2 3 4; do echo 16M > $cg/memory.reclaim 2>/dev/null || true; done
echo swap $(awk 'NR > 1 {used += $4} END {print used + 0}' /proc/swaps)
"""


def state_dir() -> Path:
    return Path(os.environ["MEMVISOR_STATE_DIR"])


def key_file() -> Path:
    return Path(os.environ["MEMVISOR_KEY_FILE"])


def create(api: httpx.Client, name: str, swap_mode: str = "confidential") -> str:
    made = api.post("/v1/sandboxes", json={"name": name, "policy": {
        "vm": {"memory_mib": 192}, "swap": {"size_mib": 128, "mode": swap_mode}}})
    assert made.status_code == 201, made.text
    sandbox_id: str = made.json()["id"]
    return sandbox_id


def problem(api: httpx.Client, key: str) -> str | None:
    listed: dict[str, Any] = api.get(f"/v1/sandboxes/{key}").json()
    assert listed["state"] == "parked", listed
    value: str | None = listed["problem"]
    return value


def test_a_changed_manifest_and_kept_disks_swapped_for_links_or_another_sandboxs(image: Image,
                                                                                 tmp_path: Path) -> None:
    d = start_daemon(tmp_path)
    try:
        with d.unix() as api:
            a, b = create(api, "victim"), create(api, "other")
            out, _ = run(api, a, DATA)
            assert int(out.decode().split()[-1]) > 4096, out  # some of the data is in swap
            run(api, b, "echo other > /tmp/mark")
            park(api, a)
            park(api, b)

            # One byte of a manifest: the policy's memory (a digit, so the JSON stays canonical).
            meta = state_dir() / b / "meta.json"
            good = meta.read_bytes()
            assert good.count(b'"memory_mib":192') == 1
            meta.write_bytes(good.replace(b'"memory_mib":192', b'"memory_mib":193'))
            words = refused(api, b, "the manifest of sandbox .* is not authentic .*its manifest was changed.*; it "
                                    "stays parked")
            assert problem(api, b) == words
            meta.write_bytes(good)  # put back: it resumes, as it was, and the problem is gone
            out, end = run(api, b, "cat /tmp/mark")
            assert out == b"other\n" and end["resume_seconds"] > 0
            assert api.get(f"/v1/sandboxes/{b}").json()["problem"] is None

            # The swap disk as a symlink to another sandbox's, then with a second name.
            swap = state_dir() / a / "swap.img"
            os.rename(swap, tmp_path / "swap.img")
            swap.symlink_to(state_dir() / b / "swap.img")
            refused(api, a, "the kept disk swap.img of sandbox .*: it is a symlink; it stays parked")
            swap.unlink()
            os.rename(tmp_path / "swap.img", swap)
            os.link(swap, tmp_path / "second-name")
            refused(api, a, "the kept disk swap.img of sandbox .* has 2 hard links, not 1")
            (tmp_path / "second-name").unlink()

            # Another sandbox's swap disk, same size and mode, copied over it: the descriptor checks pass, the
            # guest's own tags (in its RAM, so in the sealed snapshot) refuse every block it reads back.
            assert swap.stat().st_size == (state_dir() / b / "swap.img").stat().st_size
            shutil.copyfile(state_dir() / b / "swap.img", swap)
            out, err, end = exec_api(api, a, {"argv": ["sha256sum", "/tmp/data"], "root": True})
            assert end.get("exit_code") != 0 and b"Input/output error" in err, (out, err, end)
            # Never another content: the file's sum is never printed (not the right one, not another).
            assert not re.findall(rb"[0-9a-f]{64}  /tmp/data", out), (out, err)
            for key in (a, b):
                assert api.delete(f"/v1/sandboxes/{key}").status_code == 200
    finally:
        stop_daemon(d)


def serve_refused(tmp_path: Path) -> str:
    """Start `memvisor serve`, which must refuse to start; returns its stderr."""
    proc = subprocess.run(memvisor_argv("serve", "--on-exit", "stop"), capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode != 0, proc.stderr
    assert not Path(os.environ["MEMVISOR_SOCKET"]).exists()
    return proc.stderr


def put(src: Path, dst: Path) -> None:
    """Replace `dst` (a file or directory) with a copy of `src`."""
    if dst.is_dir():
        shutil.rmtree(dst)
    else:
        dst.unlink(missing_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)


def test_a_rolled_back_state_directory_and_a_removed_or_replaced_key_stop_the_daemon(image: Image,
                                                                                      tmp_path: Path) -> None:
    first = start_daemon(tmp_path, "--on-exit", "park")
    try:
        with first.unix() as api:
            key = create(api, "rolled", swap_mode="authenticated")
            run(api, key, "echo OLD-VALUE > /root/value")
            park(api, key)
            put(state_dir() / key, tmp_path / "old-dir")
            put(state_dir() / "ledger.json", tmp_path / "old-ledger.json")
            assert run(api, key, "cat /root/value; echo NEW-VALUE > /root/value")[0] == b"OLD-VALUE\n"
            park(api, key)
    finally:
        stop_daemon(first)
    put(state_dir() / key, tmp_path / "new-dir")
    put(state_dir() / "ledger.json", tmp_path / "new-ledger.json")

    # The directory and the ledger of the first park put back (a backup restored): the head says otherwise.
    put(tmp_path / "old-dir", state_dir() / key)
    put(tmp_path / "old-ledger.json", state_dir() / "ledger.json")
    err = serve_refused(tmp_path)
    head = Path(f"{key_file()}.head")
    assert f"the ledger {state_dir() / 'ledger.json'}" in err and f"its head in {head} disagree" in err, err
    assert "rolled back" in err, err
    put(tmp_path / "new-dir", state_dir() / key)
    put(tmp_path / "new-ledger.json", state_dir() / "ledger.json")

    # The key file removed: refused, naming it, and not made again.
    os.rename(key_file(), tmp_path / "host.key")
    err = serve_refused(tmp_path)
    assert f"the key file {key_file()} does not exist" in err and "nothing was recreated" in err, err
    assert not key_file().exists()
    # Replaced by another key: the ledger's MAC fails under it.
    fd = os.open(key_file(), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, os.urandom(32))
    os.close(fd)
    err = serve_refused(tmp_path)
    assert f"fails its MAC under the key file {key_file()}" in err, err
    os.replace(tmp_path / "host.key", key_file())

    second = start_daemon(tmp_path)
    try:
        with second.unix() as api:
            assert run(api, key, "cat /root/value")[0] == b"NEW-VALUE\n"
            assert api.delete(f"/v1/sandboxes/{key}").status_code == 200
    finally:
        stop_daemon(second)


def make_template(api: httpx.Client) -> dict[str, Any]:
    made = api.post("/v1/templates", json={"name": "py", "argv": ["sh", "-c", "echo warm > /tmp/warm"],
                                           "policy": {"vm": {"memory_mib": 160}}})
    assert made.status_code == 201, made.text
    info: dict[str, Any] = made.json()
    return info


def test_an_older_template_put_back_or_a_template_in_a_sandboxs_place_is_refused(image: Image,
                                                                                 tmp_path: Path) -> None:
    templates = state_dir() / "templates"
    first = start_daemon(tmp_path)
    try:
        with first.unix() as api:
            make_template(api)
            put(templates / "py", tmp_path / "older-py")
            assert api.delete("/v1/templates/py").status_code == 200
            make_template(api)  # the same name, another template
            made = api.post("/v1/sandboxes", json={"template": "py", "name": "clone"})
            assert made.status_code == 201, made.text
            clone = made.json()["id"]
            assert run(api, clone, "cat /tmp/warm")[0] == b"warm\n"
            park(api, clone)

            # The template's files in the clone's place: a template is never resumed as a sandbox.
            os.rename(state_dir() / clone, tmp_path / "clone-dir")
            put(templates / "py", state_dir() / clone)
            refused(api, clone, "is a template's manifest, not a sandbox's")
            shutil.rmtree(state_dir() / clone)
            os.rename(tmp_path / "clone-dir", state_dir() / clone)

            # The older template of the same name put back: the ledger no longer has its id.
            put(tmp_path / "older-py", templates / "py")
            r = api.post("/v1/sandboxes", json={"template": "py"})
            assert r.status_code == 409 and "is not in the ledger" in r.json()["detail"], r.text
    finally:
        stop_daemon(first)
    second = start_daemon(tmp_path)
    try:
        with second.unix() as api:
            assert api.get("/v1/templates").json() == []  # removed at the start: never used
            refused(api, clone, "is a clone of template py .* which is gone")
            assert api.delete(f"/v1/sandboxes/{clone}").status_code == 200
    finally:
        err = stop_daemon(second)
    assert "removed template py, which the ledger does not have" in err, err


def test_a_resume_that_fails_before_the_guest_answers_leaves_it_parked_on_its_snapshot(
        image: Image, monkeypatch: pytest.MonkeyPatch) -> None:
    """The snapshot stays committed until the guest answered RESUMED: a resume that fails before (here, the
    answer takes longer than allowed) kills its VMM, and the sandbox resumes later from the same snapshot."""
    from memvisor.sdk import Sandbox
    from memvisor.snapshot import park as park_module
    from memvisor.snapshot import statedir

    with Sandbox(memory_mib=160).start() as box:
        assert box.exec(["sh", "-c", "echo kept > /tmp/f"]).exit_code == 0
        box.park()
        before = {p.pid for p in qemu_processes()}
        allowed = park_module.RESUMED_ANSWER_S
        monkeypatch.setattr(park_module, "RESUMED_ANSWER_S", 0.0)
        with pytest.raises(MemvisorError, match="it stays parked"):
            box.resume()
        monkeypatch.setattr(park_module, "RESUMED_ANSWER_S", allowed)
        assert box.parked and {p.pid for p in qemu_processes()} <= before, "a failed resume left a VMM"
        with statedir.open() as state:
            kept = state.load(box.id)
            assert kept is not None and kept.generation == 1 and state.generations.current(box.id) == 1
        result = box.exec(["cat", "/tmp/f"])
        assert (result.exit_code, result.stdout) == (0, b"kept\n") and not box.parked
