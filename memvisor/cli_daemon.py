"""The daemon's commands: `memvisor serve`, and its clients `create`, `exec`, `stop` (thin: parse, call the
service layer). `memvisor ps` lists the daemon's sandboxes with the others (they share the runtime root)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from memvisor import paths, policy

Add = Callable[[argparse.ArgumentParser], None]


def add_parsers(sub: Any, add_policy_flags: Add, add_command_words: Callable[[argparse.ArgumentParser, str], None]
                ) -> None:
    """The subcommands, on the top-level parser's subparsers."""
    socket_help = f"the daemon's unix socket (default: $MEMVISOR_SOCKET or {paths.service_socket()})"
    serve = sub.add_parser("serve", help="run the daemon that owns long-lived sandboxes (HTTP/JSON API)",
                           description="Serve the API on a unix socket (mode 0660) and, with --listen, on a "
                           "loopback TCP port that requires a bearer token. SIGTERM parks every running sandbox "
                           "(--on-exit), and the next `memvisor serve` lists them parked.")
    serve.add_argument("--socket", type=Path, help=socket_help)
    serve.add_argument("--listen", metavar="ADDR:PORT", help="also serve on this TCP address (a bearer token is "
                       "required; a non-loopback address needs --tls-cert and --tls-key)")
    serve.add_argument("--tls-cert", type=Path, metavar="PATH", help="TLS certificate for --listen (PEM)")
    serve.add_argument("--tls-key", type=Path, metavar="PATH", help="its private key (PEM)")
    serve.add_argument("--budget", default="80%", help="host memory the sandboxes may use, in MiB or as a share "
                       "of MemTotal (default 80%%): admission reserves each sandbox's floor, the supervisor keeps "
                       "the balloon targets inside it")
    serve.add_argument("--on-exit", choices=("park", "stop", "leave"), default="park",
                       help="what SIGTERM does to running sandboxes: park them to sealed snapshots, which the next "
                       "daemon resumes on demand (default; one that cannot be parked is stopped), stop them, or "
                       "leave them running for the next daemon to take over (an upgrade). A daemon killed any other "
                       "way leaves them running too")
    serve.add_argument("--park-after-idle", type=int, default=0, metavar="SECONDS",
                       help="park a sandbox after this many seconds without a running command, unless its policy "
                       "says otherwise (park_after_idle_s); 0: never (default). Idle sandboxes are also parked, "
                       "least recently used first, when a new or resuming sandbox needs room in the budget")
    serve.add_argument("--key-file", type=Path, metavar="PATH",
                       help=f"the host key that wraps parked snapshots and authenticates the ledger (default: "
                       f"$MEMVISOR_KEY_FILE or {paths.key_file()}; made, mode 0600, only while the state directory "
                       "holds nothing wrapped; never inside the state directory: docs/configuration.md)")
    fleet = serve.add_argument_group("fleet (docs/fleet.md): any daemon of the fleet resumes any parked sandbox")
    fleet.add_argument("--fleet", metavar="etcd://HOST:PORT[,HOST:PORT...]",
                       help="join the fleet coordinated by this etcd (v3): parked sandboxes go to --store, every park "
                       "and resume is fenced in etcd, requests for sandboxes elsewhere are forwarded")
    fleet.add_argument("--node", metavar="NAME", help="this node's name in the fleet (default: the host name)")
    fleet.add_argument("--store", type=Path, metavar="DIR", help="the fleet's bundle store: a directory of this "
                       "user's, mode 0700, shared by every node (NFS, CephFS; one host: a local directory)")
    fleet.add_argument("--fleet-key-file", type=Path, metavar="PATH", help="the fleet key (32 bytes, mode 0600 or "
                       "0400): wraps every snapshot key; the same file on every node; never written by memvisor")
    fleet.add_argument("--fleet-key-previous", type=Path, metavar="PATH", help="the fleet's key before a rotation: "
                       "snapshots wrapped under it still resume (memvisor fleet rotate-key; docs/fleet.md)")
    fleet.add_argument("--advertise", metavar="URL", help="this daemon's API as the others reach it (default: from "
                       "--listen, e.g. http://127.0.0.1:PORT)")
    fleet.add_argument("--fleet-ttl", type=int, default=10, metavar="SECONDS",
                       help="this node's lease in etcd: how long after it stops answering the fleet sees it gone and "
                       "shows its running sandboxes unreachable (default 10; 2-300)")
    fleet.add_argument("--peer-ca", type=Path, metavar="PATH", help="the CA that signs the other daemons' "
                       "--tls-cert (their https --advertise)")
    fleet.add_argument("--etcd-ca", type=Path, metavar="PATH", help="the CA that signed etcd's certificate (https)")
    fleet.add_argument("--etcd-cert", type=Path, metavar="PATH", help="a client certificate etcd trusts")
    fleet.add_argument("--etcd-key", type=Path, metavar="PATH", help="its private key")
    serve.add_argument("--openapi", action="store_true", help="print the API's OpenAPI document and exit")
    serve.add_argument("--token-file", type=Path, help="bearer token for --listen (created, mode 0600, if missing;"
                       " default: a random token printed nowhere: pass a file to use TCP)")

    create = sub.add_parser("create", help="boot a long-lived sandbox in the daemon; prints its id")
    add_policy_flags(create)
    create.add_argument("--name", help="a name to address it by (a-z 0-9 _ . -)")
    create.add_argument("--socket", type=Path, help=socket_help)
    create.add_argument("--json", action="store_true", help="print the sandbox as JSON")
    create.add_argument("--template", metavar="NAME", help="start it as a clone of this template (its policy is the "
                        "template's: no policy flags; docs/templates.md)")
    create.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="boot the guest with kernel messages on its console (OOM reports, panics) and "
                        "hung-task reports after 10 s (same as `memvisor --debug create`)")

    ex = sub.add_parser("exec", help="run a command in a daemon sandbox; exits with its exit code (as `run`)")
    ex.add_argument("sandbox", help="id or name")
    ex.add_argument("-e", "--env", action="append", default=[], metavar="NAME=VALUE")
    ex.add_argument("--cwd", help="working directory in the guest")
    ex.add_argument("--root", action="store_true", help="run as root in the guest")
    ex.add_argument("--timeout", type=float, help="kill the command after this many seconds (exit 124)")
    ex.add_argument("-i", "--stdin", action="store_true", help="feed this process's stdin to the command")
    ex.add_argument("--socket", type=Path, help=socket_help)
    add_command_words(ex, "memvisor exec SANDBOX [OPTIONS] -- CMD [ARGS...]")

    for verb, text in (("park", "park a daemon sandbox: its state goes to a sealed snapshot on disk and its VMM "
                                "exits; the next exec (or `memvisor resume`) brings it back"),
                       ("resume", "resume a parked daemon sandbox now (an exec would resume it too)")):
        parked = sub.add_parser(verb, help=text, description=text)
        parked.add_argument("sandbox", help="id or name")
        parked.add_argument("--json", action="store_true", help="print the sandbox as JSON")
        parked.add_argument("--socket", type=Path, help=socket_help)

    stop = sub.add_parser("stop", help="stop a daemon sandbox and release its resources")
    stop.add_argument("sandbox", help="id or name")
    stop.add_argument("--socket", type=Path, help=socket_help)


def command_and_env(args: argparse.Namespace, usage: str, allow_empty: bool = False
                    ) -> tuple[list[str], dict[str, str]]:
    """The `-- CMD [ARGS...]` and the `-e NAME=VALUE` words of `run` and `exec`, checked. `allow_empty`: no
    command is fine (a user's image runs its Entrypoint/Cmd)."""
    from memvisor.errors import MemvisorError

    argv: list[str] = args.argv
    if not argv and not allow_empty:
        raise MemvisorError("no command given", hint=f"usage: {usage}")
    env = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise MemvisorError(f"--env {item!r} is not NAME=VALUE")
        env[name] = value
    return argv, env


def cmd_serve(args: argparse.Namespace, _con: Any) -> int:
    from memvisor.service import server

    if args.openapi:
        from memvisor.service.api import create_app

        print(json.dumps(create_app(None).openapi(), indent=1, sort_keys=True))
        return 0
    server.serve(args.socket or paths.service_socket(), args.listen, args.token_file, args.budget, args.on_exit,
                 args.park_after_idle, key_file=args.key_file, tls=server.tls_files(args.tls_cert, args.tls_key),
                 fleet=server.fleet_options(args))
    return 0


def cmd_create(args: argparse.Namespace, _con: Any, policy_from_args: Callable[[argparse.Namespace], Any]) -> int:
    from memvisor.service.client import Client

    with Client(args.socket or paths.service_socket()) as client:
        if args.template is not None:
            info = client.create({}, args.name, template=args.template)
        else:
            info = client.create(policy.to_json(policy_from_args(args)), args.name, debug=args.debug)
    print(json.dumps(info) if args.json else info["id"])
    return 0


def cmd_exec(args: argparse.Namespace, _con: Any) -> int:
    from memvisor.host.result import RunResult
    from memvisor.service.client import Client

    argv, env = command_and_env(args, "memvisor exec SANDBOX -- CMD [ARGS...]")
    request: dict[str, Any] = {"argv": argv, "env": env, "cwd": args.cwd, "root": args.root, "timeout": args.timeout}
    if args.stdin:
        import base64

        request["stdin"] = base64.b64encode(sys.stdin.buffer.read()).decode()
    out, err = sys.stdout.buffer, sys.stderr.buffer

    def write(stream: Any) -> Callable[[bytes], None]:
        def emit(data: bytes) -> None:
            stream.write(data)
            stream.flush()
        return emit

    with Client(args.socket or paths.service_socket()) as client:
        result = client.exec(args.sandbox, request, write(out), write(err))
    if result.get("timed_out"):
        print(f"memvisor: error: the command ran past its --timeout of {args.timeout:g} s and was killed",
              file=sys.stderr)
    oom = RunResult(int(result["exit_code"]), result.get("code"), result.get("signal"), bool(result.get("timed_out")),
                    oom_kills=int(result.get("oom_kills") or 0)).oom_message()
    if oom:
        print(f"memvisor: error: {oom}", file=sys.stderr)
    return int(result["exit_code"])


def cmd_park(args: argparse.Namespace, con: Any) -> int:
    from memvisor.service.client import Client

    with Client(args.socket or paths.service_socket()) as client:
        info = client.park(args.sandbox)
    if args.json:
        print(json.dumps(info))
    else:
        con.notice(f"parked {info['id']} in {info['last_park_seconds']:.2f} s: "
                   f"{(info['snapshot_bytes'] or 0) / 2**20:.1f} MiB on disk, no host memory")
        print(info["id"])
    return 0


def cmd_resume(args: argparse.Namespace, con: Any) -> int:
    from memvisor.service.client import Client

    with Client(args.socket or paths.service_socket()) as client:
        info = client.resume(args.sandbox)
    if args.json:
        print(json.dumps(info))
    else:
        if info.get("last_resume_seconds") is not None:
            con.notice(f"{info['id']} is running (resumed in {info['last_resume_seconds']:.2f} s)")
        print(info["id"])
    return 0


def cmd_stop(args: argparse.Namespace, _con: Any) -> int:
    from memvisor.service.client import Client

    with Client(args.socket or paths.service_socket()) as client:
        info = client.stop(args.sandbox)
    print(info["id"])
    return 0
