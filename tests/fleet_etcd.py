"""A real etcd for the fleet's tests: Debian's /usr/bin/etcd on loopback, with a temporary data directory and free
ports, started in a fraction of a second and stopped by its pid. Also a throwaway PKI (a CA, etcd's server
certificate, a client certificate) for the TLS tests.

Not a skip when etcd is missing: the fleet is part of memvisor, so its tests fail and say how to install it.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from memvisor.fleet.errors import FleetError
from memvisor.fleet.etcd import Etcd, TLSFiles

START_TIMEOUT_S = 10.0


def etcd_binary() -> str:
    """The etcd server binary; a test failure (not a skip) naming the fix if it is not installed."""
    path = shutil.which("etcd") or ("/usr/bin/etcd" if os.access("/usr/bin/etcd", os.X_OK) else None)
    if path is None:
        pytest.fail("etcd is not installed: the fleet's tests need a real one (run `make deps`, which installs "
                    "Debian's etcd-server)", pytrace=False)
    return path


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class PKI:
    """A test CA, etcd's server certificate and key (for 127.0.0.1 and localhost), and a client's."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def client(self) -> TLSFiles:
        return TLSFiles(self.ca, self.client_cert, self.client_key)


def fleet_key(path: Path) -> Path:
    """A new fleet key file at `path` (32 random bytes, mode 0600)."""
    path.write_bytes(os.urandom(32))
    path.chmod(0o600)
    return path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
          *, ca: bool = False, server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = issuer if issuer else (name, key)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                                        critical=True)
    else:
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH] if server else [])
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(folder: Path, name: str = "memvisor-test") -> PKI:
    """A fresh CA in `folder` and the certificates it signs (EC P-256: quick to make)."""
    folder.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert(f"{name}-ca", ca_key, None, ca=True)
    pki = PKI(folder / "ca.crt", folder / "server.crt", folder / "server.key", folder / "client.crt",
              folder / "client.key")
    pki.ca.write_bytes(ca.public_bytes(pem))
    for cert_path, key_path, subject, server in ((pki.server_cert, pki.server_key, "etcd-server", True),
                                                 (pki.client_cert, pki.client_key, "memvisor-node", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert_path.write_bytes(_cert(subject, key, (ca.subject, ca_key), server=server).public_bytes(pem))
        _write_key(key_path, key)
    return pki


@dataclass
class EtcdServer:
    """One single-member etcd started by the tests; stop() ends it by its pid and removes its data."""

    folder: Path
    proc: subprocess.Popen[bytes]
    client_port: int
    peer_port: int
    pki: PKI | None = None
    stopped: bool = field(default=False)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def url(self) -> str:
        return f"etcd://{self.endpoint}"

    def client(self, timeout: float = 1.0) -> Etcd:
        return Etcd(self.url, self.pki.client() if self.pki else None, timeout=timeout)

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.folder / "etcd.log").read_text(errors="replace")[-2000:]
        return ""

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        """SIGTERM (SIGKILL after 5 s) by pid, then remove the data directory (~123 MB of preallocated WAL)."""
        if not self.stopped:
            self.stopped = True
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGCONT)
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        shutil.rmtree(self.folder / "data", ignore_errors=True)


def start_etcd(folder: Path, *, tls: bool = False) -> EtcdServer:
    """A new etcd with its data under `folder`, answering on a free loopback port (https with client
    certificates if `tls`); waits until it serves a quorum read."""
    binary = etcd_binary()
    folder.mkdir(parents=True, exist_ok=True)
    pki = make_pki(folder / "pki") if tls else None
    client_port, peer_port = free_port(), free_port()
    scheme = "https" if tls else "http"
    client_url, peer_url = f"{scheme}://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
    argv = [binary, "--name", "t", "--data-dir", str(folder / "data"),
            "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"t={peer_url}", "--initial-cluster-state", "new",
            "--heartbeat-interval", "10", "--election-timeout", "100",  # a leader in ~0.1 s; leases down to 1 s
            "--unsafe-no-fsync"]  # a test's data need not survive a power cut
    if pki:
        argv += ["--cert-file", str(pki.server_cert), "--key-file", str(pki.server_key), "--client-cert-auth",
                 "--trusted-ca-file", str(pki.ca)]
    with open(folder / "etcd.log", "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env={"PATH": "/usr/bin:/bin"})
    server = EtcdServer(folder, proc, client_port, peer_port, pki)
    deadline = time.monotonic() + START_TIMEOUT_S
    with server.client(timeout=0.5) as etcd:
        while True:
            try:
                etcd.check()
                return server
            except FleetError as exc:
                if proc.poll() is not None or time.monotonic() > deadline:
                    server.stop()
                    pytest.fail(f"etcd did not start ({exc}); its log:\n{server.log_tail()}", pytrace=False)
            time.sleep(0.02)


@contextlib.contextmanager
def running_etcd(folder: Path, *, tls: bool = False) -> Iterator[EtcdServer]:
    """start_etcd() for the length of a `with`; stopped by pid and its data removed after."""
    server = start_etcd(folder, tls=tls)
    try:
        yield server
    finally:
        server.stop()
