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
