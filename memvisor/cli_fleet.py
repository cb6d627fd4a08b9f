"""The fleet's commands: `memvisor fleet ls | drain NODE` (thin: parse, ask the local daemon; docs/fleet.md)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from memvisor import paths


def add_parsers(sub: Any) -> None:
    """`memvisor fleet ...`, on the top-level parser's subparsers."""
    socket_help = f"the daemon's unix socket (default: $MEMVISOR_SOCKET or {paths.service_socket()})"
    fleet = sub.add_parser("fleet", help="the fleet this daemon belongs to (memvisor serve --fleet)",
                           description="A fleet of daemons coordinated through etcd (docs/fleet.md): any daemon "
                           "resumes any parked sandbox.")
    fleet_sub = fleet.add_subparsers(dest="fleet_command", required=True, metavar="ACTION")
    ls = fleet_sub.add_parser("ls", help="every node with its room, every sandbox wherever it is")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.add_argument("--socket", type=Path, help=socket_help)
    drain = fleet_sub.add_parser("drain", help="park every sandbox of NODE into the fleet's store and release it",
                                 description="Park every running sandbox of NODE into the store (the next exec "
                                 "resumes each on whichever node it reaches); the daemon keeps running.")
    drain.add_argument("node", help="the node's name (memvisor fleet ls)")
    drain.add_argument("--json", action="store_true", help="print JSON")
    drain.add_argument("--socket", type=Path, help=socket_help)
    rotate = fleet_sub.add_parser(
        "rotate-key", help="rewrap every bundle of the store under a new fleet key",
        description="Step 2 of a fleet key rotation (docs/fleet.md): with every daemon already holding the new key "
        "(--fleet-key-file) and the old one (--fleet-key-previous), rewrap each bundle in the store from the old "
        "key to the new one and move the fleet's key check in etcd to it. Run it again to finish one cut short.")
    rotate.add_argument("--fleet", required=True, metavar="etcd://HOST:PORT[,...]")
    rotate.add_argument("--store", required=True, type=Path, metavar="DIR")
    rotate.add_argument("--fleet-key-file", required=True, type=Path, metavar="NEW", help="the new key")
    rotate.add_argument("--previous-key-file", required=True, type=Path, metavar="OLD", help="the key it replaces")
    rotate.add_argument("--etcd-ca", type=Path, metavar="PATH")
    rotate.add_argument("--etcd-cert", type=Path, metavar="PATH")
    rotate.add_argument("--etcd-key", type=Path, metavar="PATH")


def cmd_fleet(args: argparse.Namespace, con: Any) -> int:
    from memvisor.service.client import Client

    if args.fleet_command == "rotate-key":
        from memvisor.service import fleetkeys, server

        done = fleetkeys.rotate(args.fleet, args.store, args.fleet_key_file, args.previous_key_file,
                                server.etcd_tls(args))
        con.notice(f"{done.rewrapped} bundle(s) rewrapped under {args.fleet_key_file}, {done.already} already were"
                   + (f"; {len(done.refused)} refused (left as they are): {done.refused}" if done.refused else ""))
        return 1 if done.refused else 0

    with Client(args.socket or paths.service_socket()) as client:
        if args.fleet_command == "drain":
            drained = client.drain(args.node)
            if args.json:
                print(json.dumps(drained))
            else:
                con.notice(f"node {args.node}: {len(drained['parked'])} sandbox(es) parked into the store"
                           + (f"; not parked (they run on): {drained['failed']}" if drained["failed"] else ""))
            return 1 if drained["failed"] else 0
        view = client.fleet()
    if args.json:
        print(json.dumps(view))
        return 0
    print(f"{'NODE':<20} {'API':<28} {'ROOM':>8} {'BUDGET':>8} {'RUN':>4} {'PARKED':>6}  QEMU / IMAGE")
    for n in view["nodes"]:
        mark = "*" if n["name"] == view["node"] else " "
        print(f"{mark}{n['name']:<19} {n['api']:<28} {n['room'] >> 20:>6}Mi {n['budget'] >> 20:>6}Mi "
              f"{n['running']:>4} {n['parked']:>6}  {n['qemu_version']} / {n['image'][:16]}")
    print(f"\n{'SANDBOX':<10} {'NAME':<20} {'STATE':<12} {'NODE':<20} {'GEN':>4}  UPDATED")
    for s in view["sandboxes"]:
        age = f"{time.time() - s['updated']:.0f}s ago" if s.get("updated") else "-"
        print(f"{s['id']:<10} {s['name'][:20]:<20} {s['state']:<12} {(s['node'] or s['last_node'] or '-'):<20} "
              f"{s['generation']:>4}  {age}")
    return 0
