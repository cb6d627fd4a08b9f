"""The template commands: `memvisor template create | ls | rm` (thin: parse, call the daemon; docs/templates.md).
`memvisor create --template NAME` starts a clone (cli_daemon.py)."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from memvisor import paths, policy
from memvisor.errors import MemvisorError


def add_parsers(sub: Any, add_policy_flags: Callable[[argparse.ArgumentParser], None],
                add_command_words: Callable[[argparse.ArgumentParser, str], None]) -> None:
    """`memvisor template ...`, on the top-level parser's subparsers."""
    socket_help = f"the daemon's unix socket (default: $MEMVISOR_SOCKET or {paths.service_socket()})"
    tpl = sub.add_parser("template", help="freeze a warm sandbox as a template; clone it with `create --template`",
                         description="Templates (docs/templates.md): a warm sandbox frozen once, whose RAM its "
                         "clones share copy-on-write. Opt-in: the sharing is a side channel between clones, as KSM's.")
    tpl_sub = tpl.add_subparsers(dest="template_command", required=True, metavar="ACTION")
    make = tpl_sub.add_parser(
        "create", help="make a template of a running templatable sandbox (--from), or of a new one warmed up by CMD",
        description="With --from: the running sandbox (created with --templatable) becomes the template; its VMM "
        "exits. Without: boot a templatable sandbox with the policy flags, run CMD in it as root to warm it up, "
        "and freeze it once CMD exits 0.")
    make.add_argument("name", help="the template's name (1-30 of a-z 0-9 _ -)")
    make.add_argument("--from", dest="source", metavar="SANDBOX", help="id or name of a running templatable sandbox")
    make.add_argument("--warmup-timeout", type=float, metavar="SECONDS", help="seconds the warm-up command may take")
    make.add_argument("--json", action="store_true", help="print the template as JSON")
    make.add_argument("--socket", type=Path, help=socket_help)
    add_policy_flags(make)
    add_command_words(make, "memvisor template create NAME [OPTIONS] -- CMD [ARGS...]")
    ls = tpl_sub.add_parser("ls", help="list the daemon's templates")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.add_argument("--socket", type=Path, help=socket_help)
    rm = tpl_sub.add_parser("rm", help="remove a template (refused while sandboxes cloned from it exist)")
    rm.add_argument("name")
    rm.add_argument("--socket", type=Path, help=socket_help)


def cmd_template(args: argparse.Namespace, con: Any, policy_from_args: Callable[[argparse.Namespace], Any]) -> int:
    from memvisor.service.client import Client

    with Client(args.socket or paths.service_socket()) as client:
        if args.template_command == "create":
            argv = args.argv
            if (args.source is None) == (not argv):
                raise MemvisorError("give either --from SANDBOX or a warm-up command",
                                    hint="memvisor template create NAME --from ID, or memvisor template create NAME "
                                         "[policy flags] -- CMD")
            started = time.monotonic()
            if args.source is not None:
                info = client.make_template(args.name, source=args.source)
            else:
                args.templatable = True  # what a template's sandbox is; no balloon unless asked (then refused)
                args.balloon = False if args.balloon is None else args.balloon
                info = client.make_template(args.name, policy=policy.to_json(policy_from_args(args)), argv=argv,
                                            timeout=args.warmup_timeout)
            if args.json:
                print(json.dumps(info))
            else:
                con.notice(f"template {info['name']} made in {time.monotonic() - started:.1f} s: "
                           f"{info['ram_bytes'] / 2**20:.0f} MiB of RAM, {info['snapshot_bytes'] / 2**20:.0f} MiB "
                           "on disk")
                print(info["name"])
        elif args.template_command == "ls":
            templates = client.templates()
            if args.json:
                print(json.dumps(templates))
            else:
                print(f"{'NAME':<30} {'MEMORY':>7} {'RAM':>8} {'DISK':>8} {'CLONES':>6}  SOURCE")
                for t in templates:
                    print(f"{t['name']:<30} {t['memory_mib']:>5}Mi {t['ram_bytes'] / 2**20:>6.0f}Mi "
                          f"{t['snapshot_bytes'] / 2**20:>6.0f}Mi {len(t['clones']):>6}  {t['source'] or '-'}")
        else:
            print(client.remove_template(args.name)["name"])
    return 0
