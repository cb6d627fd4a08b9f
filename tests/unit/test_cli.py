"""CLI errors: one line naming the value and the fix, exit 125, nothing started."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from memvisor import cli


@pytest.mark.parametrize(("argv", "expected"), [
    (["run", "--memory", "lots", "--", "true"], "error: flag: --memory has invalid value 'lots'"),
    (["run", "--cpus", "0", "--", "true"], "--cpus is 0, below the minimum 1"),
    (["run", "--no-balloon", "--deflate-on-oom", "--", "true"], "--deflate-on-oom needs the balloon"),
    (["run", "--swap-size", "8", "--", "true"], "--swap-size 8 MiB is too small"),
    (["run", "--memory", "192", "--swap-size", "32768", "--", "true"], "use at most 12288 MiB of swap"),
    (["run", "--swap-mode", "plain", "--", "true"], "--swap-mode plain needs a swap size"),
    (["run", "--swap-mode", "secure", "--", "true"], "choose one of off, plain, encrypted, authenticated, confidenti"),
    (["run", "--kernel-arg", "a b", "--", "true"], "kernel argument 'a b' must be one word"),
    (["run"], "no command given"),
    (["run", "--env", "NOEQUALS", "--", "true"], "--env 'NOEQUALS' is not NAME=VALUE"),
    (["--config", "/nonexistent.toml", "run", "--", "true"], "config file /nonexistent.toml does not exist"),
])
def test_bad_input_is_one_clear_line(argv: list[str], expected: str, capsys: pytest.CaptureFixture[str],
                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMVISOR_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("MEMVISOR_CONFIG", str(tmp_path / "none.toml"))
    assert cli.main(argv) == cli.EXIT_FAILURE
    err = capsys.readouterr().err
    assert expected in err
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("memvisor: error:")]) == 1
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_help_lists_every_policy_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    out = capsys.readouterr().out
    for flag in ("--memory", "--cpus", "--timeout", "--root", "--swap-size", "--swap-mode", "--zram-pct", "--ksm",
                 "--json", "--dry-run"):
        assert flag in out


def test_ps_with_nothing_running(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMVISOR_RUNTIME_DIR", str(tmp_path / "run"))
    assert cli.main(["ps", "--json"]) == 0
    assert capsys.readouterr().out.strip() == "[]"


def test_signals_the_parent_ignored_stay_ignored() -> None:
    """nohup ignores SIGHUP, a background job of a script starts with SIGINT ignored: memvisor keeps that."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        cli.catch_signals()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler)
        with pytest.raises(cli.Terminated) as caught:
            handler(signal.SIGTERM, None)
        assert caught.value.signo == signal.SIGTERM
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


@pytest.mark.parametrize("word", ["memvisor.swap_mode=plain", "memvisor.root=1", "init=/bin/sh", "rdinit=/x",
                                  "console=tty0", "quiet", "panic=0", "loglevel=0"])
def test_kernel_arguments_that_would_override_memvisor_are_refused(word: str) -> None:
    from memvisor.host.sandbox import reserved_kernel_arg

    assert reserved_kernel_arg(word)
    rc = cli.main(["run", "--kernel-arg", word, "--dry-run", "--", "true"])
    assert rc == cli.EXIT_FAILURE


def test_other_kernel_arguments_pass() -> None:
    from memvisor.host.sandbox import reserved_kernel_arg

    assert reserved_kernel_arg("module_blacklist=dm_integrity") is None


# -- the command is exactly what follows `--`; options go anywhere before it ------------------------------------
class FakeClient:
    """Stands for the daemon's client: records each call, answers what the CLI prints."""

    calls: list[tuple[str, tuple[object, ...], dict[str, object]]] = []

    def __init__(self, _socket: Path) -> None:
        pass

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def make_template(self, *args: object, **kw: object) -> dict[str, object]:
        FakeClient.calls.append(("make_template", args, kw))
        return {"name": args[0], "ram_bytes": 128 << 20, "snapshot_bytes": 1 << 20}

    def exec(self, key: str, request: dict[str, object], *_out: object) -> dict[str, object]:
        FakeClient.calls.append(("exec", (key,), request))
        return {"exit_code": 0}

    def park(self, key: str) -> dict[str, object]:
        FakeClient.calls.append(("park", (key,), {}))
        return {"id": key, "last_park_seconds": 0.25, "snapshot_bytes": 3 * 2**20 + 2**19}


@pytest.fixture
def daemon(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> type[FakeClient]:
    from memvisor.service import client

    monkeypatch.setattr(client, "Client", FakeClient)
    monkeypatch.setenv("MEMVISOR_CONFIG", str(tmp_path / "none.toml"))
    FakeClient.calls = []
    return FakeClient


def test_template_create_from_takes_options_after_the_name(daemon: type[FakeClient]) -> None:
    """docs/templates.md's line: REMAINDER once ran `--from base` as the warm-up command (exit 127)."""
    assert cli.main(["template", "create", "py", "--from", "base", "--json"]) == 0
    assert daemon.calls == [("make_template", ("py",), {"source": "base"})]


def test_template_create_options_after_the_name_are_policy(daemon: type[FakeClient]) -> None:
    argv = ["template", "create", "py", "--memory", "160", "--warmup-timeout", "30", "--", "python3", "-c", "1",
            "--memory", "1"]
    assert cli.main(argv) == 0
    [(_, args, kw)] = daemon.calls
    assert args == ("py",) and kw["argv"] == ["python3", "-c", "1", "--memory", "1"] and kw["timeout"] == 30
    assert kw["policy"]["vm"]["memory_mib"] == 160  # type: ignore[index]


def test_exec_options_after_the_sandbox_are_options(daemon: type[FakeClient]) -> None:
    assert cli.main(["exec", "box", "--root", "--cwd", "/tmp", "-e", "A=1", "--", "sh", "-c", "id", "--root"]) == 0
    [(_, key, request)] = daemon.calls
    assert key == ("box",) and request["root"] is True and request["cwd"] == "/tmp" and request["env"] == {"A": "1"}
    assert request["argv"] == ["sh", "-c", "id", "--root"]


def test_run_options_anywhere_before_the_command() -> None:
    args = cli.parse(["run", "--memory", "160", "--json", "--", "python3", "-h", "--json", "--"])
    assert args.json and args.memory_mib == "160"
    assert args.argv == ["python3", "-h", "--json", "--"]  # only the first `--` ends the options
    assert cli.parse(["run", "--image", "web"]).argv == []  # no command: the image's own


@pytest.mark.parametrize(("argv", "usage"), [
    (["run", "--memory", "160", "echo", "-n", "hi"], "memvisor run [OPTIONS] -- CMD"),
    (["exec", "box", "ls", "-l", "--", "x"], "memvisor exec SANDBOX [OPTIONS] -- CMD"),
    (["template", "create", "py", "echo", "hi"], "memvisor template create NAME [OPTIONS] -- CMD"),
])
def test_a_command_before_the_double_dash_is_refused(argv: list[str], usage: str, capsys: pytest.CaptureFixture[str],
                                                     daemon: type[FakeClient]) -> None:
    assert cli.main(argv) == cli.EXIT_FAILURE
    err = capsys.readouterr().err
    assert "is not an option: the command goes after `--`" in err and usage in err
    assert daemon.calls == []


@pytest.mark.parametrize(("argv", "said"), [
    (["run", "--memroy", "1", "--", "true"], "unrecognized arguments: --memroy"),
    (["ps", "x"], "unrecognized arguments: x"),
    (["ps", "--", "x"], "`memvisor ps` takes no command after `--`"),
])
def test_mistyped_options_and_stray_words_are_argparse_errors(argv: list[str], said: str,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ended:
        cli.main(argv)
    assert ended.value.code == 2 and said in capsys.readouterr().err


def test_park_says_what_the_snapshot_holds_on_disk(daemon: type[FakeClient],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The figure is the API's snapshot_bytes (allocated bytes: sparse swap counts what it holds)."""
    assert cli.main(["park", "box"]) == 0
    out = capsys.readouterr()
    assert out.out == "box\n"
    assert out.err == "memvisor: parked box in 0.25 s: 3.5 MiB on disk, no host memory\n"
