"""The daemon's HTTP/JSON API (FastAPI): typed request and response models, from which the OpenAPI document
(docs/openapi.json, checked by a test against the running server) is generated.

Every field is validated (unknown fields, wrong types and out-of-range values are 422 with the field named;
bodies over MAX_BODY are 413); a sandbox is addressed by its id or name and a request can only reach the
sandbox it names. Errors are JSON: {"detail": "one line", "hint": "what to do"}.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import json
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Annotated, Any

import psutil
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from pydantic import BaseModel, ConfigDict, Field

from memvisor import __version__, proto
from memvisor import policy as pol
from memvisor.errors import GuestError, MemvisorError
from memvisor.host import exporter, stats
from memvisor.service import templates
from memvisor.service.errors import Conflict, NotFound
from memvisor.service.peers import AUTH, FORWARDED, Forwarded, PeerAuth, Peers, PeerUnreachable
from memvisor.service.registry import Entry, Moved, Registry
from memvisor.service.supervisor import AdmissionRefused
from memvisor.service.templates import TemplateEntry
from memvisor.snapshot import metrics as snapshot_metrics
from memvisor.snapshot import park as park_
from memvisor.snapshot import seal, statedir, template

MAX_BODY = 1 << 20  # bytes of a request body (stdin included)
MAX_ARGS = 4096
Text = Annotated[str, Field(max_length=65536)]


class Unavailable(MemvisorError):
    """The daemon cannot take this request now (HTTP 503)."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateRequest(Strict):
    """A sandbox to boot: its policy in the TOML/JSON nesting of `memvisor run --json`'s "policy" (one source of
    truth: memvisor.policy.SETTINGS), and an optional name."""

    name: str | None = Field(default=None, max_length=63)
    policy: dict[str, dict[str, Any]] = Field(default_factory=dict)
    debug: bool = Field(default=False, description="boot the guest with kernel messages on its console (OOM "
                        "reports, panics with their stacks) and hung-task reports after 10 s")
    template: str | None = Field(default=None, max_length=30, description="start the sandbox as a clone of this "
                                 "template (docs/templates.md): its policy is the template's, so `policy` must be "
                                 "empty")


class TemplateRequest(Strict):
    """A template to make: of a running templatable sandbox (`source`), or of a new one booted with `policy`
    (templatable is implied) and warmed up by running `argv` in it (as root)."""

    name: str = Field(min_length=1, max_length=30)
    source: str | None = Field(default=None, max_length=63, description="id or name of a running sandbox "
                               "created with templatable on; it becomes the template (its VMM exits)")
    policy: dict[str, dict[str, Any]] = Field(default_factory=dict)
    argv: list[Text] | None = Field(default=None, min_length=1, max_length=MAX_ARGS)
    timeout: float | None = Field(default=None, gt=0, le=86400, description="seconds the warm-up may take")


class TemplateInfo(Strict):
    name: str
    created: float
    source: str | None  # the sandbox it was made of
    memory_mib: int
    policy: dict[str, dict[str, Any]]
    ram_bytes: int  # the guest RAM the template holds (one copy, shared by every clone)
    snapshot_bytes: int  # what its sealed files take on disk
    ram_loaded: bool  # whether this daemon holds its RAM in memory now
    resident_bytes: int  # host memory its RAM holds now: once, however many clones map it (0 if not loaded)
    clones: list[str]  # the sandboxes cloned from it, running or parked


class SandboxInfo(Strict):
    id: str
    name: str
    state: str
    created: float
    vmm_pid: int | None
    summary: str
    policy: dict[str, dict[str, Any]]
    execs: int
    supervisor: dict[str, Any] | None = None  # balloon target, floor, the last decision and its reason
    template: str | None = None  # the template it was cloned from
    parks: int = 0  # how often it was parked
    parked_at: float | None = None  # while parked: when (seconds since the epoch)
    snapshot_bytes: int | None = None  # while parked: what its sealed snapshot and kept disks hold on disk (blocks)
    problem: str | None = None  # while parked: why its snapshot cannot be resumed as it is (it stays parked)
    last_park_seconds: float | None = None
    last_resume_seconds: float | None = None
    lost: str | None = None  # state "lost": why nothing of it is left (its VMM and its snapshot are gone)
    node: str | None = None  # in a fleet: the node it runs on, or (parked) the node that parked it
    generation: int | None = None  # in a fleet: the generation its fence names
    # taken over from a daemon that died: {"at": seconds since the epoch, "ended": [[exec id, argv0], ...]}, the
    # commands in flight at the crash, which the guest ended
    recovered: dict[str, Any] | None = None


class ExecRequest(Strict):
    """A command to run in the sandbox. The response streams NDJSON lines: {"stdout": base64}, {"stderr": base64},
    then one {"exit": {...}} (exit_code as `memvisor run` exits, code, signal, timed_out, oom_kills: processes of
    the command the guest's OOM killer ended)."""

    argv: list[Text] = Field(min_length=1, max_length=MAX_ARGS)
    env: dict[Text, Text] = Field(default_factory=dict, max_length=MAX_ARGS)
    cwd: Text | None = None
    root: bool = False
    stdin: str | None = Field(default=None, description="base64 of the bytes fed to the command's stdin")
    timeout: float | None = Field(default=None, gt=0, le=7 * 86400)


class HostStatus(Strict):
    budget_bytes: int | None  # the supervisor's budget (None: no supervisor)
    reserved_bytes: int  # the floors of the running sandboxes
    targets_bytes: int  # the sum of their balloon targets
    sandboxes: int
    committed_mib: int  # sum of the sandboxes' memory_mib
    resident_bytes: int  # sum of their VMMs' RSS (a template's pages count in each clone that maps them)
    templates_bytes: int = 0  # the loaded templates' RAM, once: what the budget counts for them
    memtotal_bytes: int
    memavailable_bytes: int


def info(entry: Entry, registry: Registry | None = None) -> SandboxInfo:
    process = entry.vm.process if entry.vm else None
    control = registry.supervisor.controls.get(entry.id) if registry and registry.supervisor else None
    meta = entry.parked
    return SandboxInfo(id=entry.id, name=entry.name, state=entry.state, created=entry.created,
                       vmm_pid=process.pid if process else None, summary=entry.policy.summary(),
                       policy=pol.to_json(entry.policy), execs=entry.execs,
                       supervisor=control.to_json() if control else None, parks=entry.parks,
                       template=entry.template,
                       parked_at=meta.parked_at if meta else None,
                       snapshot_bytes=meta.disk_bytes() if meta else None, problem=entry.problem,
                       last_park_seconds=entry.last_park.seconds if entry.last_park else None,
                       last_resume_seconds=entry.last_resume.seconds if entry.last_resume else None,
                       lost=entry.lost, recovered=entry.recovered,
                       node=registry.fleet.node if registry is not None and registry.fleet is not None else None)


def fleet_info(record: Any, entry: Entry | None = None) -> SandboxInfo:
    """A sandbox as the fleet's record shows it (parked in the store, lost, or elsewhere); with `entry`, what this
    daemon knew of it too (it just parked it)."""
    state = str(record.state)
    return SandboxInfo(id=record.id, name=record.name, state=state, created=entry.created if entry else record.updated,
                       vmm_pid=None, summary=f"{state} in the fleet (node {record.node or record.last_node})",
                       policy=pol.to_json(entry.policy) if entry else {}, execs=entry.execs if entry else 0,
                       parks=entry.parks if entry else 0, template=entry.template if entry else None,
                       last_park_seconds=entry.last_park.seconds if entry and entry.last_park else None,
                       node=record.node or record.last_node, generation=record.generation,
                       lost="its owner could not recover it" if state == "lost" else None)


def fleet_status(exc: MemvisorError) -> int | None:
    """The HTTP status of a fleet layer's error (None: not one): a fence another node won is 409, etcd out of
    reach or no node with room 503, a full store 507."""
    from memvisor.fleet import errors  # only a fleet daemon raises them: imported then, not by every daemon

    if isinstance(exc, errors.FenceLost):
        return 409
    if isinstance(exc, errors.NoSuchSandbox):
        return 404
    if isinstance(exc, errors.EtcdUnavailable | errors.LeaseLost | errors.PlacementRefused | PeerUnreachable):
        return 503
    if isinstance(exc, errors.StoreFull):
        return 507
    if isinstance(exc, errors.StoreError):  # a bundle refused (edited, replaced, not ours): it stays parked
        return 409
    if isinstance(exc, errors.FleetError):
        return 400 if isinstance(exc, errors.FleetConfigError) else 502
    return None


def template_info(entry: TemplateEntry) -> TemplateInfo:
    kept = entry.meta.sandbox
    created, source = kept.get("created"), kept.get("source")
    return TemplateInfo(name=entry.name, created=float(created) if isinstance(created, int | float) else 0.0,
                        source=source if isinstance(source, str) else None, memory_mib=entry.policy.memory_mib,
                        policy=pol.to_json(entry.policy), ram_bytes=template.ram_bytes(entry.meta),
                        snapshot_bytes=entry.meta.disk_bytes(), ram_loaded=entry.ram_fd is not None,
                        resident_bytes=templates.resident(entry),
                        clones=sorted(entry.clones))


def create_app(registry: Registry | None, token: str | None = None, peers: Peers | None = None,
               peer_auth: PeerAuth | None = None) -> FastAPI:
    """The API over `registry`; with `token`, every request must carry `Authorization: Bearer <token>` (the TCP
    listener; the unix socket is guarded by its file mode). Without a registry the app only describes itself
    (`memvisor serve --openapi`): every endpoint answers 503. `peers`: in a fleet, how this daemon forwards a
    request for a sandbox that runs on another node; `peer_auth`: how it checks what the others forward to it
    (service/peers.py: a MAC per request instead of the token)."""

    def sandboxes() -> Registry:
        if registry is None:
            raise Unavailable("this API object describes the API only; it serves no sandboxes")
        return registry

    app = FastAPI(title="memvisor", version=__version__,
                  description="Long-lived sandbox microVMs with a memory policy (memvisor serve).")

    expected = f"Bearer {token}".encode()

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            return JSONResponse({"detail": f"request body of {length} bytes is over the {MAX_BODY}-byte limit"},
                                status_code=413)
        if length is None and request.method in ("POST", "PUT", "PATCH"):
            return JSONResponse({"detail": "a request body needs a Content-Length"}, status_code=411)
        peer = request.headers.get(AUTH)
        if token is not None and peer is not None and peer_auth is not None:
            why = peer_auth.check(peer, request.method, request.url.path, await request.body())
            if why is not None:
                return JSONResponse({"detail": f"refused {why}"}, status_code=401)
        elif token is not None:
            # In constant time: `!=` stops at the first differing byte, and its timing tells the token byte by byte.
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return JSONResponse({"detail": "missing or wrong bearer token",
                                     "hint": "send Authorization: Bearer <the daemon's token>"}, status_code=401)
        return await call_next(request)

    @app.exception_handler(MemvisorError)
    async def memvisor_error(_request: Request, exc: MemvisorError) -> JSONResponse:
        # A damaged or stale snapshot is a conflict with the sandbox's state; a VMM or guest that fails is the
        # backend's fault, not the request's.
        status = 404 if isinstance(exc, NotFound) else \
            507 if isinstance(exc, park_.NoSpace) else \
            409 if isinstance(exc, Conflict | seal.SealError | statedir.StateError) else \
            503 if isinstance(exc, Unavailable | AdmissionRefused) else \
            502 if isinstance(exc, GuestError | park_.ParkError) else 400
        status = fleet_status(exc) or status
        body = {"detail": exc.message, "hint": exc.hint}
        if isinstance(exc, GuestError) and exc.console_tail:
            body["console_tail"] = exc.console_tail
        return JSONResponse(body, status_code=status)

    @app.exception_handler(Forwarded)
    async def forwarded(_request: Request, exc: Forwarded) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status)

    def elsewhere(request: Request, key: str) -> tuple[Registry, Any]:
        """Where sandbox `key` is when this daemon does not have it: its fleet record (NotFound without a fleet,
        or when the fleet has none)."""
        reg = sandboxes()
        if reg.fleet is None:
            raise NotFound(f"no sandbox {key!r}", hint="list them with `memvisor ps` or GET /v1/sandboxes")
        record = reg.fleet.find(key)
        if record is None:
            raise NotFound(f"no sandbox {key!r} in the fleet", hint="list them with `memvisor fleet ls`")
        return reg, record

    def owner(request: Request, record: Any) -> Any:
        """The live node that runs `record`'s sandbox, to forward to; Conflict if it is unreachable (its lease
        expired: the sandbox is never resumed elsewhere from an older state) or if this request was forwarded
        already."""
        reg = sandboxes()
        assert reg.fleet is not None
        if request.headers.get(FORWARDED) is not None or peers is None:
            raise Conflict(f"sandbox {record.id} is {record.state} on node {record.node}, not here")
        if record.node == reg.fleet.node:  # the fence says it is here, and this daemon has no such sandbox
            raise Conflict(f"sandbox {record.id} is {record.state} on this node ({record.node}) by the fleet's "
                           "record, but this daemon does not hold it", hint="it is being moved: try again")
        node = reg.fleet.node_record(record.node)
        if node is None:
            raise Conflict(f"sandbox {record.id} is {record.state} on node {record.node}, which is unreachable (its "
                           "lease expired): it is never resumed elsewhere from an older state",
                           hint=f"it comes back when node {record.node} does")
        return node

    def peers_call(request: Request, record: Any, method: str, path: str, body: Any) -> Forwarded:
        node = owner(request, record)
        assert peers is not None
        return peers.call(node, method, path, body)

    def local_or(request: Request, key: str, method: str, path: str, body: Any = None) -> Entry:
        """The sandbox here, or Forwarded (the owner's answer) when it runs on another node; a sandbox parked in
        the fleet is claimed here (NotFound, Conflict otherwise)."""
        reg = sandboxes()
        try:
            return reg.get(key)
        except NotFound:
            _, record = elsewhere(request, key)
        if str(record.state) == "parked":
            return reg.claim(key)
        raise peers_call(request, record, method, path, body)

    @app.post("/v1/sandboxes", status_code=201, response_model=SandboxInfo)
    def create(request: CreateRequest, http: Request) -> SandboxInfo:
        if request.template is not None and request.policy:
            raise MemvisorError("a clone's policy is its template's: send no policy with a template",
                                hint=f"GET /v1/templates/{request.template} shows it")
        policy = pol.merge(("request", pol.layer_from_mapping(request.policy, "request")))
        try:
            return info(sandboxes().create(policy, request.name, debug=request.debug,
                                           template_name=request.template), registry)
        except AdmissionRefused:
            reg = sandboxes()
            if reg.fleet is None or peers is None or http.headers.get(FORWARDED) is not None:
                raise
            # No room here: the node with the most room in the fleet gets it (503 naming the fleet's room if none).
            node = reg.fleet.place(policy.memory_mib << 20)
            raise peers.call(node, "POST", "/v1/sandboxes", request.model_dump()) from None

    @app.post("/v1/templates", status_code=201, response_model=TemplateInfo)
    def make_template(request: TemplateRequest) -> TemplateInfo:
        """Make a template: of a running templatable sandbox (`source`), or boot one with `policy` and warm it
        up with `argv` (exactly one of the two)."""
        if (request.source is None) == (request.argv is None):
            raise MemvisorError("give either source (a running sandbox) or argv (a warm-up command)",
                                hint="POST {\"name\": ..., \"source\": ID} or {\"name\": ..., \"argv\": [...]}")
        if request.source is not None:
            if request.policy:
                raise MemvisorError("policy goes with argv: a source sandbox has its own")
            return template_info(sandboxes().make_template(request.name, request.source))
        policy = pol.merge(("request", pol.layer_from_mapping(request.policy, "request")),
                           ("template", {"templatable": True}))
        assert request.argv is not None
        return template_info(sandboxes().template_from_command(request.name, policy, request.argv,
                                                               request.timeout))

    @app.get("/v1/templates", response_model=list[TemplateInfo])
    def list_templates() -> list[TemplateInfo]:
        return [template_info(t) for t in sandboxes().templates.list()]

    @app.get("/v1/templates/{name}", response_model=TemplateInfo)
    def inspect_template(name: str) -> TemplateInfo:
        return template_info(sandboxes().template(name))

    @app.delete("/v1/templates/{name}", response_model=TemplateInfo)
    def remove_template(name: str) -> TemplateInfo:
        """Remove a template (409 while sandboxes cloned from it run or are parked)."""
        return template_info(sandboxes().remove_template(name))

    @app.get("/v1/sandboxes", response_model=list[SandboxInfo])
    def list_sandboxes() -> list[SandboxInfo]:
        return [info(e, registry) for e in sandboxes().list()]

    @app.get("/v1/sandboxes/{key}", response_model=SandboxInfo)
    def inspect(key: str, http: Request) -> SandboxInfo:
        try:
            return info(sandboxes().get(key), registry)
        except NotFound:
            _, record = elsewhere(http, key)
        if str(record.state) in ("parked", "lost"):
            return fleet_info(record)
        raise peers_call(http, record, "GET", f"/v1/sandboxes/{record.id}", None)

    @app.delete("/v1/sandboxes/{key}", response_model=SandboxInfo)
    def stop(key: str, http: Request) -> SandboxInfo:
        try:
            return info(sandboxes().stop(key))
        except NotFound:
            reg, record = elsewhere(http, key)
        if str(record.state) == "parked":
            assert reg.ops is not None
            reg.ops.stop_parked(record)
            return fleet_info(record)
        raise peers_call(http, record, "DELETE", f"/v1/sandboxes/{record.id}", None)

    @app.post("/v1/sandboxes/{key}/park", response_model=SandboxInfo)
    def park(key: str, http: Request) -> SandboxInfo:
        """Park the sandbox: its state goes to a sealed snapshot on disk (in a fleet: the fleet's store) and its
        VMM exits (409 while commands run); the next exec or resume brings it back."""
        try:
            sandboxes().get(key)
        except NotFound:
            _, record = elsewhere(http, key)
            if str(record.state) == "parked":
                return fleet_info(record)
            raise peers_call(http, record, "POST", f"/v1/sandboxes/{record.id}/park", {}) from None
        entry = sandboxes().park(key)
        fleet = sandboxes().fleet
        record = fleet.find(entry.id) if fleet is not None else None
        return fleet_info(record, entry) if record is not None else info(entry, registry)

    @app.post("/v1/sandboxes/{key}/resume", response_model=SandboxInfo)
    def resume(key: str, http: Request) -> SandboxInfo:
        for attempt in range(2):  # a sandbox parked into the fleet while this waited is looked up once more
            entry = local_or(http, key, "POST", f"/v1/sandboxes/{key}/resume", {})
            try:
                return info(sandboxes().resume(entry.id), registry)
            except Moved:
                if attempt:
                    raise
        raise AssertionError("unreachable")

    @app.post("/v1/sandboxes/{key}/exec", response_model=None)
    def exec_(key: str, request: ExecRequest, http: Request) -> StreamingResponse | JSONResponse:
        try:  # before anything is claimed: a bad request never holds a sandbox
            stdin = base64.b64decode(request.stdin, validate=True) if request.stdin is not None else None
        except ValueError:
            raise MemvisorError("stdin is not valid base64") from None
        for attempt in range(2):  # a sandbox parked into the fleet while this waited is looked up once more
            try:
                entry = sandboxes().get(key)
            except NotFound:
                reg, record = elsewhere(http, key)
                if str(record.state) == "parked":
                    entry = reg.claim(key)
                else:
                    node = owner(http, record)
                    assert peers is not None
                    status, lines = peers.stream(node, f"/v1/sandboxes/{record.id}/exec", request.model_dump())
                    if status != 200:
                        body = b"".join(lines)
                        try:
                            return JSONResponse(json.loads(body or b"{}"), status_code=status)
                        except ValueError:
                            return JSONResponse({"detail": body.decode(errors="replace")[:400]}, status_code=status)
                    return StreamingResponse(lines, media_type="application/x-ndjson")
            try:
                return StreamingResponse(_stream(sandboxes(), entry, request, stdin),
                                         media_type="application/x-ndjson")
            except Moved:
                if attempt:
                    raise
        raise AssertionError("unreachable")

    @app.get("/v1/fleet")
    def fleet_view() -> dict[str, Any]:
        """The fleet (memvisor fleet ls): every node with its room and what a resume there must match, every
        sandbox wherever it is (`unreachable`: its node's lease expired)."""
        reg = sandboxes()
        if reg.fleet is None:
            raise MemvisorError("this daemon is not in a fleet", hint="start it with memvisor serve --fleet ...")
        return reg.fleet.describe()

    @app.post("/v1/fleet/nodes/{node}/drain")
    def drain(node: str, http: Request) -> dict[str, Any]:
        """Park every sandbox of node `node` into the fleet's store and release them (memvisor fleet drain): the
        next exec resumes each on whichever node it reaches."""
        reg = sandboxes()
        if reg.fleet is None:
            raise MemvisorError("this daemon is not in a fleet", hint="start it with memvisor serve --fleet ...")
        if node != reg.fleet.node:
            peer = reg.fleet.node_record(node)
            if peer is None or peers is None or http.headers.get(FORWARDED) is not None:
                raise NotFound(f"no live node {node!r} in the fleet", hint="memvisor fleet ls")
            raise peers.call(peer, "POST", f"/v1/fleet/nodes/{node}/drain", {})
        return reg.drain()

    @app.get("/v1/host", response_model=HostStatus)
    def host() -> HostStatus:
        entries = sandboxes().list()
        rss = 0
        for e in entries:
            try:
                rss += psutil.Process(e.vm.process.pid).memory_info().rss if e.vm and e.vm.process else 0
            except psutil.Error:
                pass
        figures = stats.host()
        sup = sandboxes().supervisor
        status = sup.status() if sup else {"budget_bytes": None, "reserved_bytes": 0, "targets_bytes": 0}
        return HostStatus(**status, sandboxes=len(entries), committed_mib=sum(e.policy.memory_mib for e in entries),
                          resident_bytes=rss, templates_bytes=sandboxes().templates.resident_bytes(),
                          memtotal_bytes=figures["memtotal_bytes"],
                          memavailable_bytes=figures["memavailable_bytes"])

    @app.get("/metrics", response_class=Response)
    def metrics() -> Response:
        metrics_registry = CollectorRegistry()
        metrics_registry.register(exporter.StatsCollector(lambda: _daemon_families(registry)))
        return Response(generate_latest(metrics_registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _daemon_families(registry: Registry | None) -> Iterator[Metric]:
    """The daemon's own figures beside the host's: its parked sandboxes (the state directory's), and the lost ones
    (nothing left to resume: docs/service.md, "A daemon that dies")."""
    if registry is None:
        return
    yield from snapshot_metrics.parked_families(registry.state)
    lost = [e for e in registry.list() if e.state == "lost"]
    yield GaugeMetricFamily("memvisor_lost_sandboxes", "Sandboxes the daemon could not recover after a crash (their "
                            "VMM and snapshot are gone); `memvisor stop ID` removes them", value=len(lost))


STREAM_END_TIMEOUT_S = 600.0  # how long an exec's end waits for a client that stopped reading


def _stream(registry: Registry, entry: Entry, request: ExecRequest, stdin: bytes | None) -> Iterator[bytes]:
    """Resume the sandbox if it is parked (here, so that a snapshot that cannot be resumed is an HTTP error, 409,
    not a line in a stream that began with 200), then run the command on a worker thread started now, and return
    the lines of its output as they come, then its exit."""
    resumed = registry.ensure_running(entry)  # holds the sandbox against parks until the worker's exec_done
    # Bounded (256 chunks of at most 64 KiB). The callbacks run on the sandbox's channel reader, which must
    # never wait for an HTTP client: output a slow or vanished client has not taken is dropped and counted.
    lines: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=256)
    dropped = [0]

    def emit(item: dict[str, Any]) -> None:
        try:
            lines.put_nowait(item)
        except queue.Full:
            dropped[0] += 1

    def out(data: bytes) -> None:
        emit({"stdout": base64.b64encode(data).decode()})

    def err(data: bytes) -> None:
        emit({"stderr": base64.b64encode(data).decode()})

    def work() -> None:
        try:
            try:
                vm = entry.running()
                result = vm.exec(list(request.argv), env=dict(request.env), cwd=request.cwd,
                                 uid=0 if request.root else None, stdin=stdin, timeout=request.timeout,
                                 on_stdout=out, on_stderr=err)
            finally:
                registry.exec_done(entry)
            entry.execs += 1
            end: dict[str, Any] = {"exit": {"exit_code": result.exit_code, "code": result.code,
                                            "signal": result.signal, "timed_out": result.timed_out,
                                            "oom_kills": result.oom_kills}}
            if resumed is not None:  # the sandbox was parked: this long went into resuming it first
                end["exit"]["resume_seconds"] = resumed
            if dropped[0]:
                end["exit"]["dropped_chunks"] = dropped[0]  # the client read too slowly to get them all
        except (MemvisorError, OSError, RuntimeError) as exc:
            end = {"error": str(exc)}
        entry.used = time.monotonic()
        for item in (end, None):  # this worker may wait for the client, but not for ever
            with contextlib.suppress(queue.Full):
                lines.put(item, timeout=STREAM_END_TIMEOUT_S)

    threading.Thread(target=work, name=f"exec-{entry.id}", daemon=True).start()

    def output() -> Iterator[bytes]:
        while (item := lines.get()) is not None:
            yield (json.dumps(item) + "\n").encode()

    return output()


assert proto.CHUNK * 2 < MAX_BODY  # a stdin body of MAX_BODY is a handful of frames
