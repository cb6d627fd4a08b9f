"""The host key's commands: `memvisor key rotate` (thin: parse, call memvisor/snapshot/rotate.py)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from memvisor import paths


def add_parsers(sub: Any) -> None:
    """`memvisor key ...`, on the top-level parser's subparsers."""
    key = sub.add_parser("key", help="the host key that wraps parked snapshots (rotate it)",
                         description="The host key (docs/configuration.md): it wraps every parked snapshot's and "
                         "template's key and authenticates the ledger. It lives outside the state directory.")
    key_sub = key.add_subparsers(dest="key_command", required=True, metavar="ACTION")
    rotate = key_sub.add_parser(
        "rotate", help="make a new host key and rewrap every parked snapshot and template under it",
        description="Write a new key beside the key file, rewrap every parked snapshot's and template's key and "
        "re-authenticate the ledger under it, then replace the key file. Crash-safe: a rotation cut short is "
        "finished by running this again (the daemon refuses to start until then). Refused while a daemon (or a "
        "program parking sandboxes) uses the state directory.")
    rotate.add_argument("--key-file", type=Path, metavar="PATH",
                        help=f"the key file (default: $MEMVISOR_KEY_FILE or {paths.key_file()})")


def cmd_key(args: argparse.Namespace, con: Any) -> int:
    from memvisor.snapshot import rotate

    done = rotate.rotate(args.key_file)
    if done.finished_earlier_run:
        con.notice("finished a rotation that had been cut short")
    con.notice(f"rotated the host key {done.key_file}: {done.sandboxes} parked sandbox(es) and {done.templates} "
               "template(s) rewrapped, the ledger re-authenticated. Copies of the old key (backups, freed disk "
               "blocks) still open the snapshots of before: retire them")
    return 0
