"""The authenticated ledger and its head beside the key file: generations by compare-and-swap, a MAC over every
byte, and a state directory put back from an older copy refused because the head disagrees."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from pathlib import Path

import pytest

from memvisor.snapshot import files, ledger, statedir
from memvisor.snapshot.files import StateError


def head_of(state: statedir.State) -> Path:
    assert state.ledger is not None
    return state.ledger.head


def test_generations_advance_by_compare_and_swap_and_survive() -> None:
    with statedir.open(create_key=True) as state:
        gens = state.generations
        assert gens.current("abc") is None
        assert [gens.advance("abc", n) for n in (None, 1, 2)] == [1, 2, 3]
        with pytest.raises(ledger.Stale, match="is 3, not 2"):
            gens.advance("abc", 2)
        assert gens.advance("xyz", None) == 1
    with statedir.open() as state:
        assert state.generations.all() == {"abc": 3, "xyz": 1}
        state.generations.forget("abc")
        assert state.generations.current("abc") is None
    doc = json.loads((statedir.root() / "ledger.json").read_text())
    assert doc["generations"] == {"xyz": 1} and doc["counter"] == 6 and len(doc["mac"]) == 64
    assert (statedir.root() / "ledger.json").stat().st_mode & 0o777 == 0o600


def _bump(n: int) -> None:
    with statedir.open() as state:
        for _ in range(n):
            while True:
                try:
                    state.generations.advance("abc", state.generations.current("abc"))
                    break
                except ledger.Stale:
                    continue


def test_concurrent_advances_are_not_lost() -> None:
    with statedir.open(create_key=True):
        pass
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_bump, args=(10,)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with statedir.open() as state:
        assert state.generations.current("abc") == 40


def test_a_state_directory_put_back_with_the_ledger_of_its_time_is_refused(tmp_path: Path) -> None:
    with statedir.open(create_key=True) as state:
        state.generations.advance("abc", None)
        head = head_of(state)
    old = tmp_path / "old-state"
    shutil.copytree(statedir.root(), old)
    with statedir.open() as state:
        state.generations.advance("abc", 1)  # parked again: generation 2
    root = statedir.root()
    shutil.rmtree(root)
    shutil.copytree(old, root)
    with pytest.raises(StateError, match=rf"the ledger {root}/ledger.json \(counter 2\) and its head in "
                                         rf"{head} disagree: the head says counter 3, so the state directory was "
                                         "rolled back") as info:
        statedir.open()
    assert "nothing is reset" in (info.value.hint or "")


def test_a_crash_between_the_ledger_and_its_head_is_repaired(tmp_path: Path) -> None:
    with statedir.open(create_key=True) as state:
        state.generations.advance("abc", None)
        head = head_of(state)
    behind = head.read_bytes()
    with statedir.open() as state:
        state.generations.advance("abc", 1)
    files.write_atomic(head, behind)  # as if the head's write never happened
    with statedir.open() as state:
        assert state.generations.current("abc") == 2
    assert head.read_bytes() != behind  # repaired
    with statedir.open() as state:
        state.generations.advance("abc", 2)
        state.generations.advance("abc", 3)
    files.write_atomic(head, behind)  # two behind: no crash leaves that
    with pytest.raises(StateError, match="disagree"):
        statedir.open()


@pytest.mark.parametrize("change", ["generation", "counter", "spacing", "mac"])
def test_an_edited_ledger_is_refused(change: str) -> None:
    with statedir.open(create_key=True) as state:
        state.generations.advance("abc", None)
    path = statedir.root() / "ledger.json"
    doc = json.loads(path.read_text())
    if change == "generation":
        doc["generations"]["abc"] = 7
    elif change == "counter":
        doc["counter"] += 1
    elif change == "mac":
        doc["mac"] = "0" * 64
    data = files.canonical(doc) if change != "spacing" else (json.dumps(doc, sort_keys=True) + "\n").encode()
    files.write_atomic(path, data)
    with pytest.raises(StateError, match="fails its MAC|canonical form"):
        statedir.open()


def test_a_removed_head_or_ledger_is_refused() -> None:
    with statedir.open(create_key=True) as state:
        state.generations.advance("abc", None)
        head = head_of(state)
    saved = head.read_bytes()
    head.unlink()
    with pytest.raises(StateError, match="the head has no entry for this state directory"):
        statedir.open()
    files.write_atomic(head, saved)
    with statedir.open() as state:  # nothing was reset meanwhile
        assert state.generations.current("abc") == 1
    from tests.unit.test_statedir import park

    with statedir.open() as state:
        park(state, "xyz")
    (statedir.root() / "ledger.json").unlink()
    with pytest.raises(StateError, match="the ledger .* is missing, but the state directory holds the snapshot of "
                                         "sandbox xyz"):
        statedir.open(create_key=True)


def test_several_state_directories_share_one_key_file_each_with_its_head(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    with statedir.open(create_key=True) as state:
        state.generations.advance("abc", None)
        head = head_of(state)
    first = os.environ["MEMVISOR_STATE_DIR"]
    monkeypatch.setenv("MEMVISOR_STATE_DIR", str(tmp_path / "second"))
    with statedir.open(create_key=True) as state:
        state.generations.advance("xyz", None)
    assert len(json.loads(head.read_text())["heads"]) == 2
    monkeypatch.setenv("MEMVISOR_STATE_DIR", first)
    with statedir.open() as state:
        assert state.generations.all() == {"abc": 1}


def test_the_head_can_live_elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMVISOR_LEDGER_HEAD", str(tmp_path / "heads" / "ledger.head"))
    with statedir.open(create_key=True) as state:
        state.generations.advance("abc", None)
    assert (tmp_path / "heads" / "ledger.head").exists()
    assert not Path(os.environ["MEMVISOR_KEY_FILE"] + ".head").exists()


def test_a_head_that_cannot_be_written_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "not-a-directory").write_text("")  # (root ignores directory modes: a file in the way fails for all)
    monkeypatch.setenv("MEMVISOR_LEDGER_HEAD", str(tmp_path / "not-a-directory" / "ledger.head"))
    with pytest.raises(StateError, match="cannot write the ledger head .*: Not a directory") as info:
        statedir.open(create_key=True)
    assert "MEMVISOR_LEDGER_HEAD" in (info.value.hint or "")
