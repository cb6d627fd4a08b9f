"""deploy/kubernetes, checked without an API server: every manifest is a Kubernetes object; the DaemonSet's
arguments, once the $(VAR)s are substituted from its env the way the kubelet does it, are ones `memvisor serve`
accepts (memvisor's own CLI parser); what they name (ConfigMap keys, Secret files, volumes) exists; the choices
docs/kubernetes.md explains hold (no liveness probe, one node at a time, the budget is the memory request); and the
keeper loop that runs the daemon restarts a crashed daemon without touching its VMMs and drains on SIGTERM."""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from memvisor.cli import build_parser

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
NAMESPACE = "memvisor-system"
# What the kubelet would put in the downward-API env vars, for the substitution.
FIELDS = {"spec.nodeName": "kvm-node-1", "status.hostIP": "10.0.0.7", "metadata.name": "memvisor-x7k2p",
          "metadata.namespace": NAMESPACE}
UNITS = {"": 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 10**3, "M": 10**6, "G": 10**9,
         "T": 10**12}


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    """Every YAML document under deploy/kubernetes, with its file."""
    docs = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        with path.open() as f:
            docs += [(path, doc) for doc in yaml.safe_load_all(f) if doc is not None]
    return docs


def find(kind: str, name: str) -> dict[str, Any]:
    hits = [doc for _, doc in manifests() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(hits) == 1, f"{len(hits)} {kind} named {name} under {DEPLOY}"
    return hits[0]


def daemonset() -> dict[str, Any]:
    return find("DaemonSet", "memvisor")


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = daemonset()["spec"]["template"]["spec"]
    return spec


def daemon() -> dict[str, Any]:
    container: dict[str, Any] = next(c for c in pod_spec()["containers"] if c["name"] == "memvisor")
    return container


def expand(text: str, lookup: Callable[[str], str | None]) -> str:
    """$(NAME) replaced as the kubelet does it (k8s.io/kubernetes third_party/forked/golang/expansion): `$$` is a
    literal `$`; a name it does not know, or an unclosed `$(`, is left as written."""
    out, i = [], 0
    while i < len(text):
        if text[i] != "$" or i + 1 == len(text):
            out.append(text[i])
            i += 1
        elif text[i + 1] == "$":
            out.append("$")
            i += 2
        elif text[i + 1] == "(" and (end := text.find(")", i + 2)) != -1:
            value = lookup(text[i + 2:end])
            out.append(text[i:end + 1] if value is None else value)
            i = end + 1
        else:
            out.append(text[i:i + 2])
            i += 2
    return "".join(out)


def quantity(text: str) -> int:
    """A Kubernetes quantity ("28Gi", "500M", "4") in its base unit."""
    match = re.fullmatch(r"(\d+)([KMGT]i|[kMGT])?", str(text))
    assert match, f"cannot read the quantity {text!r}"
    return int(match[1]) * UNITS[match[2] or ""]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    """The container's env as the kubelet resolves it: values (which may refer to earlier variables),
    ConfigMap keys (which must exist in the manifests), downward-API fields and resources."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        name, source = var["name"], var.get("valueFrom")
        if source is None:
            env[name] = expand(str(var.get("value", "")), env.get)
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            data = find("ConfigMap", ref["name"])["data"]
            assert ref["key"] in data, f"env {name}: ConfigMap {ref['name']} has no key {ref['key']!r}"
            env[name] = str(data[ref["key"]])
        elif "fieldRef" in source:
            env[name] = FIELDS[source["fieldRef"]["fieldPath"]]
        elif "resourceFieldRef" in source:
            ref = source["resourceFieldRef"]
            kind, _, resource = ref["resource"].partition(".")
            amount = quantity(container["resources"][kind][resource])
            env[name] = str(math.ceil(amount / quantity(ref.get("divisor", "1"))))
        else:
            raise AssertionError(f"env {name}: a source this test does not know: {source}")
    return env


def serve_args() -> list[str]:
    env = env_of(daemon())
    args = [expand(str(word), env.get) for word in daemon()["args"]]
    unresolved = [word for word in args if "$(" in word]
    assert not unresolved, f"$(VAR) the container's env does not define: {unresolved}"
    return args


def keeper_script() -> str:
    command = [str(word) for word in daemon()["command"]]
    assert command[:5] == ["tini", "--", "/bin/sh", "-c", command[4]] and len(command) == 6, command
    return command[4]


def test_every_manifest_is_a_kubernetes_object() -> None:
    docs = manifests()
    assert len(docs) >= 10
    for path, doc in docs:
        where = path.relative_to(DEPLOY)
        assert isinstance(doc, dict), f"{where}: a document that is not a mapping"
        assert isinstance(doc.get("apiVersion"), str) and isinstance(doc.get("kind"), str), where
        assert isinstance(doc.get("metadata"), dict) and doc["metadata"].get("name"), f"{where}: no metadata.name"
        if doc["kind"] not in ("Namespace", "NodeFeatureRule", "Kustomization") and path.parent == DEPLOY:
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{where}: {doc['kind']} outside {NAMESPACE}"


def test_the_daemonset_arguments_are_ones_memvisor_serve_accepts(capsys: pytest.CaptureFixture[str]) -> None:
    """Fails until `memvisor serve` has the fleet flags (--fleet, --node, --store, --fleet-key-file, --etcd-*,
    --advertise, --peer-ca, --tls-*): then every word the DaemonSet passes must parse."""
    args = serve_args()
    try:
        ns = build_parser().parse_args(["serve", *args])
    except SystemExit:
        ns = None
    if ns is None:
        pytest.fail(f"memvisor serve refuses the DaemonSet's arguments: {capsys.readouterr().err.strip()}\n"
                    f"  memvisor serve {' '.join(args)}")
    node_ip, port = FIELDS["status.hostIP"], find("ConfigMap", "memvisor-fleet")["data"]["api-port"]
    assert ns.command == "serve" and ns.on_exit == "park"  # SIGTERM drains into the store
    assert ns.node == FIELDS["spec.nodeName"]
    assert ns.listen == f"{node_ip}:{port}" and ns.advertise == f"https://{node_ip}:{port}"
    assert all(re.fullmatch(r"etcd://[a-z0-9.-]+:\d+", url) for url in ns.fleet.split(",")), ns.fleet
    # The budget is the memory request, in MiB: what the scheduler reserves is what the sandboxes may use.
    assert ns.budget == str(quantity(daemon()["resources"]["requests"]["memory"]) >> 20)


def test_what_the_arguments_name_exists() -> None:
    """Every file the daemon is pointed at is a key of a Secret mounted read-only at 0400; the socket is the
    node's (hostPath), where the readiness probe and MEMVISOR_SOCKET look for it; the store is on the shared
    ReadWriteMany claim; state and runtime directories are on the node's disk."""
    spec, container = pod_spec(), daemon()
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert all(m["name"] in volumes for c in spec["initContainers"] + spec["containers"]
               for m in c.get("volumeMounts", [])), "a volumeMount names no volume"
    secrets = {doc["metadata"]["name"]: doc for path, doc in manifests()
               if doc["kind"] == "Secret" and path.name == "secrets.example.yaml"}

    def mount_of(path: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
        """The key of the volume a file is, that volume, and its mount (a file mounted by subPath is the key
        itself: a real file, not the Secret volume's symlink into ..data/)."""
        if path in mounts and "subPath" in mounts[path]:
            return mounts[path]["subPath"], volumes[mounts[path]["name"]], mounts[path]
        base = max((m for m in mounts if path.startswith(m.rstrip("/") + "/")), key=len, default=None)
        assert base is not None, f"{path} is on no volume of the container"
        return path[len(base):].lstrip("/"), volumes[mounts[base]["name"]], mounts[base]

    args = serve_args()
    files = [args[i + 1] for i, word in enumerate(args)
             if word in ("--fleet-key-file", "--token-file", "--etcd-ca", "--etcd-cert", "--etcd-key",
                         "--tls-cert", "--tls-key", "--peer-ca")]
    assert len(files) == 8
    for path in files:
        key, volume, mount = mount_of(path)
        assert "secret" in volume and volume["secret"].get("defaultMode") == 0o400, (path, volume)
        assert mount.get("readOnly") is True, path
        assert key in secrets[volume["secret"]["secretName"]]["data"], f"{path}: no key {key!r} in the Secret"

    env = env_of(container)
    socket = args[args.index("--socket") + 1]
    assert env["MEMVISOR_SOCKET"] == socket and socket in container["readinessProbe"]["exec"]["command"]
    assert "hostPath" in mount_of(socket)[1]
    for name in ("MEMVISOR_STATE_DIR", "MEMVISOR_RUNTIME_DIR", "MEMVISOR_CACHE_DIR"):
        assert mount_of(env[name])[1]["hostPath"]["path"] == "/var/lib/memvisor", name  # on disk, kept
    claim = mount_of(args[args.index("--store") + 1] + "/x")[1]["persistentVolumeClaim"]["claimName"]
    assert find("PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]
    for init in spec["initContainers"]:
        env_of(init)  # its ConfigMap keys exist


def test_the_daemonset_choices() -> None:
    """What docs/kubernetes.md explains: KVM nodes only; privileged; the node's network; one node at a time and
    never two daemons on a node; no liveness probe (a restart would end every running sandbox unparked); time to
    park; priority the kubelet never evicts, with its quota; a memory limit above the budget."""
    ds, spec, container = daemonset(), pod_spec(), daemon()
    assert spec["nodeSelector"]["memvisor.io/kvm"] == "true"
    assert container["securityContext"]["privileged"] is True
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate",
                                            "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}
    assert all("livenessProbe" not in c for c in spec["containers"])
    assert spec["terminationGracePeriodSeconds"] >= 300
    assert spec["priorityClassName"] == "system-node-critical"
    quota = find("ResourceQuota", "memvisor-critical-pods")["spec"]["scopeSelector"]["matchExpressions"]
    assert quota == [{"operator": "In", "scopeName": "PriorityClass", "values": ["system-node-critical"]}]
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    assert quantity(limits["memory"]) >= quantity(requests["memory"]) * 1.05 and "cpu" not in limits
    assert spec["automountServiceAccountToken"] is False
    assert find("ServiceAccount", spec["serviceAccountName"])["automountServiceAccountToken"] is False


def test_kustomization_lists_every_manifest_but_the_templates() -> None:
    listed = find("Kustomization", "memvisor")["resources"]
    expected = sorted(p.name for p in DEPLOY.glob("*.yaml")
                      if p.name not in ("kustomization.yaml", "secrets.example.yaml"))
    assert sorted(listed) == expected


def test_the_keeper_script_is_not_touched_by_the_kubelets_substitution() -> None:
    """Kubernetes substitutes $(NAME) in the command too: the script's own $(...) must not name an env var."""
    script = keeper_script()
    assert expand(script, env_of(daemon()).get) == script
    assert 'memvisor serve "$@"' in script


FAKE_MEMVISOR = """#!/bin/sh
# `memvisor serve` as the keeper sees it: logs its words, leaves one long-lived "VMM" (started once, detached
# from our pipes), answers on the "socket" once its SIGTERM handler is in place, crashes once if told to.
echo "start $*" >> "$DIR/log"
echo $$ >> "$DIR/daemon.pids"
if [ ! -e "$DIR/vmm.pid" ]; then
    sleep 300 </dev/null >/dev/null 2>&1 &
    echo $! > "$DIR/vmm.pid"
fi
trap 'echo term >> "$DIR/log"; rm -f "$DIR/ready"; exit 0' TERM
if [ -e "$DIR/crash" ]; then
    rm "$DIR/crash"
    exit 7
fi
touch "$DIR/ready"
while :; do sleep 0.05; done
"""
FAKE_CURL = '#!/bin/sh\n[ -e "$DIR/ready" ]\n'


@contextlib.contextmanager
def keeper(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """The DaemonSet's keeper script, run by sh with a fake memvisor and curl first on PATH (not as PID 1: the
    reaping is tini's). Yields the process and the directory the fakes write to; kills what is left."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("memvisor", FAKE_MEMVISOR), ("curl", FAKE_CURL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "DIR": str(tmp_path),
           "MEMVISOR_SOCKET": str(tmp_path / "serve.sock")}
    with (tmp_path / "stderr").open("wb") as err:
        proc = subprocess.Popen(["sh", "-c", keeper_script(), "memvisor-keeper", "--budget", "100"],
                                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    try:
        yield proc, tmp_path
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in lines(tmp_path / "vmm.pid") + lines(tmp_path / "daemon.pids"):  # each by its pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def wait_for(what: str, check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"waited {timeout:g} s for {what}"
        time.sleep(0.02)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_keeper_restarts_a_crashed_daemon_and_its_vmm_runs_on(tmp_path: Path) -> None:
    (tmp_path / "crash").touch()
    with keeper(tmp_path) as (proc, d):
        wait_for("the daemon to crash and be started again", lambda: (d / "ready").exists())
        assert lines(d / "log") == ["start serve --budget 100"] * 2
        assert alive(int((d / "vmm.pid").read_text())), "the VMM died with the daemon"
        assert "memvisor serve ended (status 7)" in (d / "stderr").read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert lines(d / "log")[-1] == "term"  # the daemon itself got the SIGTERM: it drains
        assert alive(int((d / "vmm.pid").read_text()))  # the keeper leaves VMMs to memvisor (and the container)


def test_keeper_told_to_stop_between_daemons_starts_one_to_drain(tmp_path: Path) -> None:
    """SIGTERM while the keeper waits to restart a crashed daemon: the VMMs still run and nobody would park them,
    so it starts a daemon anyway (to adopt them), and sends it SIGTERM once it answers."""
    (tmp_path / "crash").touch()
    with keeper(tmp_path) as (proc, d):
        wait_for("the keeper's back-off", lambda: "starting it again" in (d / "stderr").read_text())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert lines(d / "log") == ["start serve --budget 100", "start serve --budget 100", "term"]
