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

from memvisor import __version__, config, policy
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
        note = f" [config: {s.toml_key}]" + (f" (not implemented yet: issue #{s.pending_issue})"
                                               if s.pending_issue else "")
        if s.kind is bool:
            group.add_argument(s.flag, dest=s.field, action=argparse.BooleanOptionalAction, default=None,
                               help=s.help + note)
        else:
            metavar = "|".join(s.choices) if s.choices else s.flag.lstrip("-").split("-")[0].upper()
            group.add_argument(s.flag, dest=s.field, default=None, metavar=metavar, help=s.help + note)


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
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")

    image = sub.add_parser("image", help="build or inspect the guest image")
    image_sub = image.add_subparsers(dest="image_command", required=True, metavar="ACTION")
    image_build = image_sub.add_parser("build", help="build the guest image from Debian packages (cached)")
    image_build.add_argument("--rebuild", action="store_true", help="build even if an identical image exists")
    image_build.add_argument("--json", action="store_true", help="print the image manifest as JSON")
    image_info = image_sub.add_parser("info", help="show the current guest image")
    image_info.add_argument("--json", action="store_true", help="print the image manifest as JSON")

    ps = sub.add_parser("ps", help="list running sandboxes")
    ps.add_argument("--json", action="store_true", help="print JSON")
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

    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise MemvisorError("no command given", hint="usage: memvisor run [OPTIONS] -- CMD [ARGS...]")
    env = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise MemvisorError(f"--env {item!r} is not NAME=VALUE")
        env[name] = value
    pol = policy_from_args(args)
    with con.progress("building guest image") as progress:
        image = build.ensure(progress)
    vm = Instance(pol, image, kernel_args=tuple(args.kernel_arg), on_warning=con.warning)
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
        if args.json:
            print(json.dumps({"id": vm.id, "error": exc.message, "console_tail": exc.console_tail}))
        raise
    if result.timed_out:
        con.error(f"the sandbox ran past its --timeout of {pol.timeout:g} s and was killed")
    if args.json:
        if last != b"\n":
            stdout.write(b"\n")
        stdout.write(json.dumps(result.report).encode() + b"\n")
        stdout.flush()
    return result.exit_code


def cmd_image(args: argparse.Namespace, con: Console) -> int:
    from memvisor.image import build

    if args.image_command == "build":
        with con.progress("building guest image") as progress:
            image = build.build(rebuild=args.rebuild, progress=progress)
    else:
        found = build.find()
        if found is None:
            raise MemvisorError("no guest image is built for this memvisor", hint="run `memvisor image build`")
        image = found
    if args.json:
        print(json.dumps({"path": str(image.path), **image.manifest}, indent=2))
        return 0
    m = image.manifest
    sizes = m["sizes"]
    print(f"image:      {image.path}")
    print(f"kernel:     {m['kernel_version']} (vmlinux {sizes['vmlinux'] / 2**20:.1f} MiB)")
    print(f"initramfs:  {sizes['initramfs.cpio'] / 2**20:.1f} MiB, {m['initramfs_files']} files")
    print(f"packages:   {', '.join(f'{k} {v}' for k, v in m['packages'].items())}")
    print(f"built:      {m['built_at']} in {m['build_seconds']} s")
    return 0


def cmd_ps(args: argparse.Namespace, con: Console) -> int:
    from memvisor.host import runtime

    states = runtime.live()
    if args.json:
        print(json.dumps([s.to_json() for s in states], indent=2))
        return 0
    if not states:
        con.notice("no sandboxes running")
        return 0
    rows = [("ID", "VMM PID", "AGE", "POLICY", "RUNTIME DIR")]
    for s in states:
        rows.append((s.id, str(s.vmm_pid or "-"), f"{time.time() - s.created:.0f}s", s.summary, s.runtime_dir))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace, Console], int]] = {
    "run": cmd_run, "image": cmd_image, "ps": cmd_ps,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="memvisor: %(levelname)s: %(message)s")
    con = Console(args.quiet)

    def terminate(signo: int, _frame: Any) -> None:
        raise Terminated(signo)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, terminate)
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
