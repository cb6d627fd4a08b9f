"""Run the daemon: the API on a unix socket (mode 0660, bound here before uvicorn gets it, so it is never
reachable with looser permissions) and, only when asked, on a loopback TCP port that requires a bearer token.

On SIGTERM/SIGINT uvicorn stops accepting requests; then every sandbox is parked, stopped or left running
(--on-exit) and logged, the socket is removed, and the process exits. A daemon killed any other way (SIGKILL,
the OOM killer, a crash) leaves its VMMs running: the next daemon on the same runtime directory takes them over
(service/recovery.py). One daemon per runtime directory: it holds runtime.daemon_lock() while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import secrets
import signal
import socket
from collections.abc import Generator
from pathlib import Path
from typing import Any

import uvicorn

from memvisor import proc
from memvisor.errors import MemvisorError
from memvisor.host import runtime
from memvisor.image import build
from memvisor.service.api import create_app
from memvisor.service.peers import PeerAuth, Peers
from memvisor.service.registry import Registry
from memvisor.service.supervisor import Supervisor, parse_budget
from memvisor.snapshot import statedir

log = logging.getLogger("memvisor")
SOCKET_MODE = 0o660
DEFAULT_BUDGET = "80%"
SHUTDOWN_GRACE_S = 10  # seconds requests in flight get to end after SIGTERM


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to serve() (several servers share one process)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def bind_unix(path: Path) -> socket.socket:
    """A listening unix socket at `path`, mode 0660 from the moment it exists; a stale socket is replaced, a
    live one (another daemon) is an error."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    if path.exists():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
            raise MemvisorError(f"another memvisor daemon is listening on {path}",
                                hint="stop it first, or pass --socket PATH")
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~SOCKET_MODE)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(128)
    return sock


def bind_tcp(host: str, port: int) -> socket.socket:
    """A listening TCP socket on a loopback address. Bound here, before the unix socket exists, so a client that
    has seen the unix socket can also connect over TCP: uvicorn gets the fd and never binds anything itself."""
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise MemvisorError(f"cannot listen on {host}:{port}: {exc.strerror}",
                            hint="pick a free port with --listen") from None
    sock.listen(128)
    return sock


def parse_listen(text: str, tls: bool = False) -> tuple[str, int]:
    """`ADDR:PORT`: a loopback address, or with TLS (`tls`) any address (the bearer token must not travel in
    clear beyond the host)."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        if not sep or not 0 < int(port) < 65536:
            raise ValueError
        address = ipaddress.ip_address(host)
    except ValueError:
        raise MemvisorError(f"--listen {text!r} is not an ADDRESS:PORT",
                            hint="e.g. --listen 127.0.0.1:7373") from None
    if not address.is_loopback and not tls:
        raise MemvisorError(f"--listen {text!r} is not a loopback address, and the API has no TLS here",
                            hint="give --tls-cert and --tls-key to listen beyond loopback, or use 127.0.0.1")
    return host, int(port)


def tls_files(cert: Path | None, key: Path | None) -> tuple[Path, Path] | None:
    """--tls-cert and --tls-key: both or neither, readable."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise MemvisorError("--tls-cert and --tls-key go together", hint="give both, or neither")
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        if not path.is_file() or not os.access(path, os.R_OK):
            raise MemvisorError(f"{flag} {path} is not a readable file", hint="give a PEM file")
    return cert, key


def etcd_tls(args: Any) -> Any:
    """The --etcd-ca/--etcd-cert/--etcd-key flags (of `serve` and `fleet rotate-key`) as fleet.etcd.TLSFiles, or
    None for plain http; a client certificate without the CA is refused, never dropped (Etcd() checks the files)."""
    if args.etcd_ca is None and args.etcd_cert is None and args.etcd_key is None:
        return None
    if args.etcd_ca is None:
        raise MemvisorError("--etcd-cert/--etcd-key need --etcd-ca", hint="give the CA that signed etcd's "
                            "certificate")
    from memvisor.fleet.etcd import TLSFiles

    return TLSFiles(args.etcd_ca, args.etcd_cert, args.etcd_key)


def fleet_options(args: Any) -> Any:
    """serve's fleet flags as fleetd.Options (None without --fleet); a one-line error naming what is missing. The
    fleet layer is imported only here, by a daemon that joins a fleet."""
    if args.fleet is None:
        loose = [f for f in ("node", "store", "fleet_key_file", "fleet_key_previous", "advertise", "peer_ca",
                             "etcd_ca", "etcd_cert", "etcd_key") if getattr(args, f) is not None]
        if loose:
            raise MemvisorError(f"--{loose[0].replace('_', '-')} is a fleet setting, but --fleet is not given",
                                hint="add --fleet etcd://HOST:PORT, or drop the fleet flags")
        return None
    from memvisor.fleet.etcd import parse_url
    from memvisor.service import fleetd

    parse_url(args.fleet)  # a malformed URL is refused here, before anything else
    for flag, value in (("--store", args.store), ("--fleet-key-file", args.fleet_key_file)):
        if value is None:
            raise MemvisorError(f"--fleet needs {flag}", hint="docs/fleet.md shows a one-machine fleet")
    if args.listen is None:
        raise MemvisorError("--fleet needs --listen: the address the other daemons forward requests to",
                        hint="e.g. --listen 127.0.0.1:7373 on one machine; NODE_IP:PORT with --tls-cert/--tls-key")
    tls = etcd_tls(args)
    host, port = parse_listen(args.listen, args.tls_cert is not None)
    scheme = "https" if args.tls_cert is not None else "http"
    advertise = args.advertise or f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"
    if not 2 <= args.fleet_ttl <= 300:
        raise MemvisorError(f"--fleet-ttl {args.fleet_ttl} is not 2-300 seconds",
                            hint="the default, 10, suits most fleets")
    return fleetd.Options(url=args.fleet, node=args.node or fleetd.default_node(), store=args.store,
                          key_file=args.fleet_key_file, advertise=advertise, tls=tls, peer_ca=args.peer_ca,
                          ttl=args.fleet_ttl, previous_key_file=args.fleet_key_previous)


def token_from(path: Path | None) -> str:
    """The bearer token: read from `path` (created with a fresh random token, mode 0600, if missing)."""
    if path is None:
        return secrets.token_urlsafe(32)
    try:
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
        token = path.read_text().strip()
    except OSError as exc:
        raise MemvisorError(f"--token-file {path}: {exc.strerror}", hint="give a file in a directory that exists "
                            "(it is made, mode 0600, if missing)") from None
    if len(token) < 16:
        raise MemvisorError(f"the token in {path} is shorter than 16 characters")
    return token


def serve(socket_path: Path, listen: str | None = None, token_file: Path | None = None,
          budget: str = DEFAULT_BUDGET, on_exit: str = "park", park_after_idle_s: int = 0,
          key_file: Path | None = None, tls: tuple[Path, Path] | None = None, fleet: Any = None) -> None:
    """Serve until SIGTERM/SIGINT; then park (or stop, `on_exit`) every running sandbox. `key_file`: the host key
    (default $MEMVISOR_KEY_FILE, then paths.key_file()); made here only if the state directory holds nothing
    wrapped under a key."""
    proc.keep_memory_private()  # before the host key or any snapshot key is read
    if park_after_idle_s < 0:
        raise MemvisorError(f"--park-after-idle {park_after_idle_s} is negative", hint="give seconds, or 0 for never")
    tcp = parse_listen(listen, tls is not None) if listen else None
    token = token_from(token_file) if tcp else None
    budget_bytes = parse_budget(budget)
    lock = runtime.daemon_lock()  # one daemon per runtime directory: before anything is adopted, swept or scanned
    try:
        member = None
        if fleet is not None:
            # Everything a fleet needs is checked before any sandbox is touched: etcd, the store, the fleet key,
            # the node's name (service/fleetd.py); its generations and key are then the state directory's.
            from memvisor.service.fleetd import Fleet

            member = Fleet(fleet, budget_bytes, str(build.ensure().manifest.get("key")))
            try:
                state = statedir.open_fleet(fleet.key_file, member, fleet.previous_key_file)
            except BaseException:
                member.close()
                raise
        else:
            # The key and the ledger are checked before anything else: a replaced key or a rolled-back state
            # directory stops the daemon here, naming the file. The registry holds them (and closes them) from here.
            state = statedir.open(key_file, create_key=True)
        _serve(socket_path, tcp, token, state, budget_bytes, on_exit, park_after_idle_s, tls, member)
    finally:
        runtime.daemon_unlock(lock)


def _serve(socket_path: Path, tcp: tuple[str, int] | None, token: str | None, state: statedir.State,
           budget_bytes: int, on_exit: str, park_after_idle_s: int, tls: tuple[Path, Path] | None,
           fleet: Any) -> None:
    supervisor: Supervisor | None = None
    try:
        supervisor = Supervisor(budget_bytes)
        # The image is fixed when the daemon starts: its guest code must be the daemon's own (an upgrade of
        # memvisor on disk would otherwise boot new guests that speak a protocol the running daemon does not).
        image = build.ensure()
        registry = Registry(lambda: image, supervisor, on_exit=on_exit, park_after_idle_s=park_after_idle_s,
                            state=state, fleet=fleet)
    except BaseException:
        state.close()
        if supervisor is not None:
            supervisor.close()
        if fleet is not None:
            fleet.close(leave=False)
        raise
    peers, peer_auth = None, None
    if fleet is not None:
        fleet.counts = registry.counts
        peer_keys = fleet.peer_keys()
        peers = Peers(fleet.node, peer_keys[0], fleet.options.peer_ca)
        peer_auth = PeerAuth(fleet.node, peer_keys)
    # Both listeners exist before the unix socket appears on disk: whoever waits for that path may use either.
    # uvicorn serves the sockets as they are (never binding anything itself).
    listeners = [(create_app(registry, token, peers, peer_auth), bind_tcp(*tcp))] if tcp is not None else []
    listeners.insert(0, (create_app(registry, None, peers), bind_unix(socket_path)))
    # On SIGTERM, requests in flight (an exec's output stream) get SHUTDOWN_GRACE_S to end; then they are cut and
    # the sandboxes parked or stopped, so a command that never ends cannot keep the daemon from exiting.
    def config(app: Any, sock: socket.socket) -> uvicorn.Config:
        secure = tls is not None and sock.family != socket.AF_UNIX  # TLS on TCP, never on the unix socket
        return uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
                              ssl_certfile=str(tls[0]) if secure and tls else None,
                              ssl_keyfile=str(tls[1]) if secure and tls else None)

    servers = [_Server(config(app, sock)) for app, sock in listeners]
    log.warning("memvisor serve: listening on %s%s; memory budget %d MiB", socket_path,
                f" and http://{tcp[0]}:{tcp[1]} (bearer token required)" if tcp else "",
                supervisor.budget_bytes >> 20)

    def stop(signo: int, _frame: object) -> None:
        log.warning("memvisor serve: %s received, stopping", signal.Signals(signo).name)
        for server in servers:
            server.should_exit = True

    async def main() -> None:
        await asyncio.gather(*(s.serve(sockets=[sock]) for s, (_, sock) in zip(servers, listeners, strict=True)))

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        asyncio.run(main())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        registry.close()
        if fleet is not None:  # drained (parked into the store), or left running for this node's next daemon
            fleet.close(leave=on_exit != "leave")
        for _, sock in listeners:
            sock.close()
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
