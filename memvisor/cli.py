"""The `memvisor` command line: parses, calls the library, prints. No logic that the SDK would also need.

Exit status of `memvisor run`: the command's own exit code; 128+N if signal N killed it; 124 if --timeout
expired; 125 if memvisor or the guest failed; 130/143 if memvisor was interrupted (SIGINT/SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from memvisor import __version__, cli_daemon, cli_fleet, cli_image, cli_key, cli_template, config, policy
from memvisor.errors import GuestError, MemvisorError

EXIT_FAILURE = 125
log = logging.getLogger("memvisor")


class Terminated(Exception):
    """SIGTERM/SIGHUP arrived; raised so every context manager unwinds."""

    def __init__(self, signo: int) -> None:
        super().__init__(signal.Signals(signo).name)
        self.signo = signo


class Console:
    """memvisor's own messages on stderr (never mixed into the command's stdout)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()

    def notice(self, message: str) -> None:
        if not self.quiet:
            print(f"memvisor: {message}", file=sys.stderr, flush=True)

    def warning(self, message: str) -> None:
        """Printed even with --quiet: something the user asked for is not what they get."""
        print(f"memvisor: warning: {message}", file=sys.stderr, flush=True)

    def error(self, message: str, hint: str | None = None) -> None:
        print(f"memvisor: error: {message}", file=sys.stderr, flush=True)
        if hint:
            print(f"memvisor: hint: {hint}", file=sys.stderr, flush=True)

    @contextmanager
    def progress(self, title: str) -> Iterator[Callable[[str, int, int], None]]:
        """A progress display for a multi-step job: a rich bar on a terminal, one line per step otherwise."""
        if self.quiet:
            yield lambda step, i, n: None
            return
        if not self.tty:
            yield lambda step, i, n: self.notice(f"{title}: [{i + 1}/{n}] {step}")
            return
        from rich.console import Console as RichConsole
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        with Progress(SpinnerColumn(), TextColumn(f"{title}: {{task.description}}"), BarColumn(),
                      TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                      console=RichConsole(stderr=True), transient=True) as bar:
            task = bar.add_task("starting", total=None)

            def update(step: str, i: int, n: int) -> None:
                bar.update(task, description=step, completed=i, total=n)

            yield update

    @contextmanager
    def status(self) -> Iterator[Callable[[str], None]]:
        """A spinner while the sandbox boots, gone before the command's first output."""
        if self.quiet or not self.tty:
            yield lambda phase: None
            return
        from rich.console import Console as RichConsole

        spinner = RichConsole(stderr=True).status("booting sandbox")
        spinner.start()

        def update(phase: str) -> None:
            if phase == "booting":
                spinner.update("booting sandbox")
            else:
                spinner.stop()

        try:
            yield update
        finally:
            spinner.stop()


# -- argument parsing -----------------------------------------------------------------------------------------
def add_policy_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per policy setting, straight from policy.SETTINGS."""
    group = parser.add_argument_group("sandbox policy (also settable in the config file)")
    for s in policy.SETTINGS:
        note = f" [config: {s.toml_key}]"
        if s.kind is bool:
            group.add_argument(s.flag, dest=s.field, action=argparse.BooleanOptionalAction, default=None,
                               help=s.help + note)
        else:
            metavar = "|".join(s.choices) if s.choices else s.flag.lstrip("-").split("-")[0].upper()
            group.add_argument(s.flag, dest=s.field, default=None, metavar=metavar, help=s.help + note)


def add_command_words(parser: argparse.ArgumentParser, usage: str) -> None:
    """The command a subcommand runs: only the words after `--` (parse() puts them in `args.argv`), so that an
    option written anywhere before `--` stays an option. argparse's REMAINDER would start the command at the first
    bare word and swallow every option after it (`template create NAME --from X` ran `--from X`)."""
    parser.add_argument("argv", nargs="*", metavar="-- CMD", help="the command and its arguments, after `--`")
    parser.set_defaults(command_usage=usage)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memvisor", description="Secure memory oversubscription for microVM "
                                     "sandboxes: boot a sandbox VM with a memory policy and run a command in it.")
    parser.add_argument("--version", action="version", version=f"memvisor {__version__}")
    parser.add_argument("--config", type=Path, help="TOML config file (default: $MEMVISOR_CONFIG or "
                        "~/.config/memvisor/config.toml, if it exists)")
    parser.add_argument("--debug", action="store_true", help="show debug logs and tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="no notices or progress on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="boot a sandbox and run a command in it",
                         description="Boot a sandbox, run CMD inside, stream its stdout and stderr, exit with "
                         "its exit code (128+N for signal N, 124 on --timeout, 125 if memvisor or the guest "
                         "failed).")
    add_policy_flags(run)
    run.add_argument("-e", "--env", action="append", default=[], metavar="NAME=VALUE",
                     help="set an environment variable for CMD (repeatable)")
    run.add_argument("--kernel-arg", action="append", default=[], metavar="ARG",
                     help="extra guest kernel command-line word, e.g. module_blacklist=dm_integrity (repeatable)")
    run.add_argument("--json", action="store_true", help="print a JSON report as the last line of stdout")
    run.add_argument("--dry-run", action="store_true", help="print the exact VMM command line and exit")
    run.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                     help="also boot the guest with kernel messages on its console and hung-task reports after "
                     "10 s (same as `memvisor --debug run`)")
    add_command_words(run, "memvisor run [OPTIONS] -- CMD [ARGS...]")

    cli_image.add_parsers(sub)

    ps = sub.add_parser("ps", help="list running sandboxes")
    ps.add_argument("--json", action="store_true", help="print JSON")

    st = sub.add_parser("stats", help="where each sandbox's memory went (host RSS, KSM, guest, swap, balloon)")
    st.add_argument("id", nargs="?", help="one sandbox (default: all)")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.add_argument("--watch", action="store_true", help="refresh in place until Ctrl-C")
    st.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    st.add_argument("--serve", metavar="ADDR:PORT", help="serve the figures as Prometheus metrics at /metrics")

    cli_daemon.add_parsers(sub, add_policy_flags, add_command_words)
    cli_template.add_parsers(sub, add_policy_flags, add_command_words)
    cli_key.add_parsers(sub)
    cli_fleet.add_parsers(sub)

    k = sub.add_parser("ksm", help="ksmd state and counters; start or stop it (never done implicitly)")
    k_sub = k.add_subparsers(dest="ksm_command", required=True, metavar="ACTION")
    k_status = k_sub.add_parser("status", help="ksmd's state and counters")
    k_status.add_argument("--json", action="store_true", help="print JSON")
    k_start = k_sub.add_parser("start", help="start ksmd (echo 1 > /sys/kernel/mm/ksm/run)")
    k_start.add_argument("--pages-to-scan", type=int, help="pages ksmd scans per wake-up")
    k_start.add_argument("--sleep-ms", type=int, help="milliseconds ksmd sleeps between scans")
    k_sub.add_parser("stop", help="stop ksmd (echo 0 > /sys/kernel/mm/ksm/run; merged pages stay merged)")
    return parser


def policy_from_args(args: argparse.Namespace) -> policy.Policy:
    """File < flags."""
    file_layer = config.load(args.config, explicit=args.config is not None)
    flags = {s.field: policy.coerce(s, getattr(args, s.field), "flag") for s in policy.SETTINGS
             if getattr(args, s.field, None) is not None}
    return policy.merge(file_layer, ("flags", flags))


# -- commands ---------------------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace, con: Console) -> int:
    from memvisor.host.sandbox import Instance
    from memvisor.image import build

    pol = policy_from_args(args)
    argv, env = cli_daemon.command_and_env(args, "memvisor run [OPTIONS] -- CMD [ARGS...]",
                                           allow_empty=pol.image is not None)
    with con.progress("building guest image") as progress:
        image = build.ensure(progress)
    vm = Instance(pol, image, kernel_args=tuple(args.kernel_arg), on_warning=con.warning, debug=args.debug)
    if args.dry_run:
        try:
            print(shlex.join(vm.plan()))
        finally:
            vm.close()
        return 0
    notice = vm.vmm.notice()
    if notice:
        con.notice(notice)
    stdout, stderr = sys.stdout.buffer, sys.stderr.buffer
    last = bytearray(b"\n")

    def out(data: bytes) -> None:
        stdout.write(data)
        stdout.flush()
        last[:] = data[-1:]

    def err(data: bytes) -> None:
        stderr.write(data)
        stderr.flush()

    try:
        with con.status() as phase, vm:
            result = vm.run(argv, env=env, on_stdout=out, on_stderr=err, on_phase=phase)
    except GuestError as exc:
        kept = str(vm.kept_log) if vm.kept_log else None
        if args.json:
            print(json.dumps({"id": vm.id, "error": exc.message, "console_tail": exc.console_tail,
                              "console_log": kept}))
        if kept:
            exc.console_tail += f"\n(the whole console log is kept at {kept})"
        raise
    oom = result.oom_message()
    if oom:
        con.error(oom)
    if result.timed_out:
        con.error(f"the sandbox ran past its --timeout of {pol.timeout:g} s and was killed")
        if result.stall is not None:
            from memvisor import views

            print(views.stall_text(result.stall.to_json(), result.stall.console_tail), file=sys.stderr)
    if args.json:
        if last != b"\n":
            stdout.write(b"\n")
        stdout.write(json.dumps(result.report).encode() + b"\n")
        stdout.flush()
    return result.exit_code


def parked_sandboxes(con: Console) -> tuple[list[Any], list[Any]]:
    """The parked sandboxes' manifests and problems, read only; none (with a warning) if the state directory or
    its key cannot be read."""
    from memvisor.snapshot import statedir

    try:
        state = statedir.open_to_read()
        if state is None:
            return [], []
        with state:
            return state.committed()
    except MemvisorError as exc:
        con.warning(f"parked sandboxes are not listed: {exc.message}")
        return [], []


def cmd_ps(args: argparse.Namespace, con: Console) -> int:
    from memvisor.host import runtime
    from memvisor.service import lostbook

    states = runtime.live()
    parked, problems = parked_sandboxes(con)
    lost = lostbook.read_all()

    def running(s: runtime.SandboxState) -> str:
        # A daemon's sandbox whose daemon died runs on until the next daemon takes it over.
        return "running" if runtime.same_process(s.owner_pid, s.owner_started) else "running (no daemon)"

    if args.json:
        print(json.dumps([{**s.to_json(), "state": running(s)} for s in states]
                         + [{"id": m.id, "state": "parked", "parked_at": m.parked_at,
                             "generation": m.generation, "snapshot_bytes": m.disk_bytes()} for m in parked]
                         + [{"id": p.id, "state": "parked", "problem": p.why} for p in problems]
                         + [{"id": r["id"], "state": "lost", "name": r.get("name"), "lost": r["reason"]}
                            for r in lost], indent=2))
        return 0
    if not states and not parked and not problems and not lost:
        con.notice("no sandboxes running or parked")
        return 0
    rows = [("ID", "STATE", "VMM PID", "AGE", "POLICY", "RUNTIME DIR")]
    for s in states:
        rows.append((s.id, running(s), str(s.vmm_pid or "-"), f"{time.time() - s.created:.0f}s", s.summary,
                     s.runtime_dir))
    for m in parked:
        summary = f"parked {time.time() - m.parked_at:.0f}s ago, {m.disk_bytes() / 2**20:.1f} MiB on disk"
        rows.append((m.id, "parked", "-", "-", summary, "-"))
    for p in problems:
        rows.append((p.id, "parked", "-", "-", f"cannot resume: {p.why}", "-"))
    for record in lost:
        rows.append((record["id"], "lost", "-", "-", str(record["reason"])[:100], "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_stats(args: argparse.Namespace, con: Console) -> int:
    from rich.console import Console as RichConsole
    from rich.live import Live

    from memvisor import views
    from memvisor.host import stats

    if args.serve:
        from memvisor.host import exporter

        addr, sep, port = args.serve.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise MemvisorError(f"--serve {args.serve!r} is not ADDR:PORT", hint="e.g. --serve 127.0.0.1:9477")
        con.notice(f"serving Prometheus metrics on http://{addr or '0.0.0.0'}:{port}/metrics")
        try:
            from memvisor.snapshot import metrics

            exporter.serve(addr or "0.0.0.0", int(port), metrics.parked_families)
        except OSError as exc:
            raise MemvisorError(f"cannot listen on {args.serve}: {exc.strerror}") from None
        return 0
    if args.interval <= 0:
        raise MemvisorError(f"--interval {args.interval} must be positive")
    if args.json and not args.watch:
        print(json.dumps(stats.collect(args.id), indent=2))
        return 0
    if not args.watch:
        RichConsole(width=None if sys.stdout.isatty() else 200).print(views.stats_table(stats.collect(args.id)))
        return 0
    if args.json:
        while True:  # one JSON document per line
            print(json.dumps(stats.collect(args.id)), flush=True)
            time.sleep(args.interval)
    with Live(views.stats_table(stats.collect(args.id)), console=RichConsole(), auto_refresh=False) as live:
        while True:
            time.sleep(args.interval)
            live.update(views.stats_table(stats.collect(args.id)), refresh=True)


def cmd_ksm(args: argparse.Namespace, con: Console) -> int:
    from rich.console import Console as RichConsole

    from memvisor import views
    from memvisor.host import ksm

    if args.ksm_command == "start":
        tunables = {"run": 1}
        if args.pages_to_scan is not None:
            tunables["pages_to_scan"] = args.pages_to_scan
        if args.sleep_ms is not None:
            tunables["sleep_millisecs"] = args.sleep_ms
        ksm.set_tunables(**tunables)
        con.notice("ksmd started: only sandboxes run with --ksm are mergeable")
        return 0
    if args.ksm_command == "stop":
        ksm.set_tunables(run=0)
        con.notice("ksmd stopped (pages already merged stay merged until written)")
        return 0
    st = ksm.state()
    if not st.available:
        raise MemvisorError("this kernel has no KSM (/sys/kernel/mm/ksm is missing)")
    if args.json:
        print(json.dumps({"running": st.running, "saved_bytes": st.saved_bytes(),
                          "ksmd_cpu_seconds": st.cpu_seconds, **st.values}, indent=2))
        return 0
    RichConsole().print(views.ksm_table(st.values, st.running, st.cpu_seconds, st.saved_bytes()))
    if not st.running:
        con.notice("ksmd is stopped: `memvisor ksm start` to start it")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace, Console], int]] = {
    "run": cmd_run, "image": cli_image.cmd_image, "ps": cmd_ps, "stats": cmd_stats, "ksm": cmd_ksm,
    "serve": cli_daemon.cmd_serve, "exec": cli_daemon.cmd_exec, "stop": cli_daemon.cmd_stop,
    "park": cli_daemon.cmd_park, "resume": cli_daemon.cmd_resume,
    "create": lambda args, con: cli_daemon.cmd_create(args, con, policy_from_args),
    "template": lambda args, con: cli_template.cmd_template(args, con, policy_from_args),
    "key": cli_key.cmd_key,
    "fleet": cli_fleet.cmd_fleet,
}


def catch_signals() -> None:
    """SIGTERM and SIGHUP raise Terminated (SIGINT raises KeyboardInterrupt, Python's own), so every context
    manager unwinds and the VMM is stopped. A signal the parent set to be ignored stays ignored, as POSIX
    programs do: `nohup` ignores SIGHUP, and a non-interactive shell starts `cmd &` with SIGINT and SIGQUIT
    ignored (Python then installs no SIGINT handler either)."""
    def terminate(signo: int, _frame: Any) -> None:
        raise Terminated(signo)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, terminate)


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """Options and positionals are the words before the first `--`; the command (`args.argv`) is exactly the words
    after it. A bare word before `--` where a command would go is refused with the line the user meant."""
    words = list(argv)
    cut = words.index("--") if "--" in words else len(words)
    parser = build_parser()
    args, extra = parser.parse_known_args(words[:cut])
    stray = [*getattr(args, "argv", []), *extra]
    first = next((w for w in words[:cut] if w in stray), "")
    if stray and (first.startswith("-") or not hasattr(args, "command_usage")):  # a mistyped option
        parser.error(f"unrecognized arguments: {shlex.join([w for w in extra if w.startswith('-')] or stray)}")
    if stray:
        raise MemvisorError(f"`{shlex.join(stray)}` is not an option: the command goes after `--`",
                            hint=f"usage: {args.command_usage}")
    if cut < len(words) - 1 and not hasattr(args, "command_usage"):
        parser.error(f"`memvisor {args.command}` takes no command after `--`")
    args.argv = words[cut + 1:]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    try:
        args = parse(sys.argv[1:] if argv is None else argv)
    except MemvisorError as exc:
        Console(False).error(exc.message, exc.hint)
        return EXIT_FAILURE
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="memvisor: %(levelname)s: %(message)s")
    con = Console(args.quiet)
    catch_signals()
    try:
        return COMMANDS[args.command](args, con)
    except GuestError as exc:
        con.error(exc.message, exc.hint)
        if exc.console_tail:
            print("memvisor: last guest console lines:\n" + "\n".join(
                f"  | {line}" for line in exc.console_tail.splitlines()), file=sys.stderr)
        if args.debug:
            raise
        return EXIT_FAILURE
    except MemvisorError as exc:
        con.error(exc.message, exc.hint)
        if args.debug:
            raise
        return EXIT_FAILURE
    except KeyboardInterrupt:
        con.error("interrupted")
        return 128 + signal.SIGINT
    except Terminated as exc:
        con.error(f"terminated by {exc}")
        return 128 + exc.signo
    except BrokenPipeError:
        # stdout closed by the reader (e.g. `| head`): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
