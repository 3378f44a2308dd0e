"""A real etcd cluster on this machine, for the tests, the benchmarks and the demo.

``EtcdCluster(base, members=3).start()`` makes a CA, a server certificate per
member (for its loopback address), client certificates for cdpfs nodes and one
from a CA nobody trusts, then starts Debian's ``etcd`` once per member with TLS
and client-certificate authentication on both its client and peer ports, and
waits until every member reports healthy. ``stop(i)``/``start_member(i)`` take
one member away and bring it back (its data stays); ``close()`` kills every
member and, unless ``keep``, removes nothing (the caller owns ``base``).

Run as a program it starts a cluster and prints its endpoints and TLS files as
shell assignments, then waits until SIGTERM/SIGINT (the README's demo uses it):
``python bench/etcdcluster.py DIR``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from harness import HarnessError, free_port, stop_process

from cdpfs.ha.etcd import Tls

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


# In the child: SIGKILL when the thread that started it ends, so a test run that is
# killed leaves no etcd behind (Linux's PR_SET_PDEATHSIG, set by setpriv before it
# execs etcd; start members from the main thread, not from a worker thread that may
# end first). Not a preexec_fn: Python code between fork and exec can deadlock when
# other threads run (a test's writer threads did).
DIE_WITH_PARENT = ["setpriv", "--pdeathsig", "KILL", "--"]


def available() -> bool:
    return Path(ETCD).exists()


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


class Authority:
    """A CA that signs the cluster's server and client certificates."""

    def __init__(self, directory: Path, name: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.ca = directory / "ca.pem"
        self.ca.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, ips: list[str] = ()) -> Tls:
        """A certificate for ``name`` (server and client use; IP names for ``ips``)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder().subject_name(_name(name)).issuer_name(self.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
        )
        if ips:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_path, key_path = self.dir / f"{name}.pem", self.dir / f"{name}-key.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, key_path)
        return Tls(self.ca, cert_path, key_path)


@dataclass
class Member:
    name: str
    ip: str
    client_port: int
    peer_port: int
    data: Path
    tls: Tls
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"https://{self.ip}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"https://{self.ip}:{self.peer_port}"


class EtcdCluster:
    """``members`` etcd processes forming one cluster, TLS everywhere."""

    def __init__(self, base: Path, members: int = 3, ip: str = "127.0.0.1") -> None:
        self.base = base
        self.pki = Authority(base / "pki", "cdpfs test etcd CA")
        self.client = self.pki.issue("cdpfs-node")  # what cdpfs nodes authenticate with
        self.stranger = Authority(base / "pki-stranger", "nobody's CA").issue("stranger")
        self.members = [
            Member(f"e{i}", ip, free_port(), free_port(), base / f"e{i}.data",
                   self.pki.issue(f"e{i}", [ip]), base / f"e{i}.log")
            for i in range(members)
        ]

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def _args(self, m: Member) -> list[str]:
        cluster = ",".join(f"{o.name}={o.peer_url}" for o in self.members)
        return [
            ETCD, "--name", m.name, "--data-dir", str(m.data),
            "--listen-client-urls", m.endpoint, "--advertise-client-urls", m.endpoint,
            "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
            "--initial-cluster", cluster, "--initial-cluster-state", "new",
            "--initial-cluster-token", f"cdpfs-{self.base.name}",
            "--cert-file", str(m.tls.cert), "--key-file", str(m.tls.key),
            "--client-cert-auth", "--trusted-ca-file", str(self.pki.ca),
            "--peer-cert-file", str(m.tls.cert), "--peer-key-file", str(m.tls.key),
            "--peer-client-cert-auth", "--peer-trusted-ca-file", str(self.pki.ca),
            "--heartbeat-interval", "100", "--election-timeout", "1000",
            "--logger", "zap", "--log-outputs", "stderr",
        ]

    def start(self, timeout: float = 30.0) -> EtcdCluster:
        for i in range(len(self.members)):
            self.start_member(i, wait=False)
        for i in range(len(self.members)):
            self.wait_healthy(i, timeout)
        return self

    def start_member(self, i: int, wait: bool = True) -> None:
        m = self.members[i]
        with open(m.log, "ab") as out:
            m.proc = subprocess.Popen([*DIE_WITH_PARENT, *self._args(m)], stdout=out,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if wait:
            self.wait_healthy(i)

    def stop(self, i: int, sig: int = signal.SIGKILL) -> None:
        m = self.members[i]
        stop_process(m.proc, sig)
        m.proc = None

    def healthy(self, i: int) -> bool:
        m = self.members[i]
        ctx = ssl.create_default_context(cafile=str(self.pki.ca))
        ctx.load_cert_chain(str(self.client.cert), str(self.client.key))
        try:
            with urllib.request.urlopen(f"{m.endpoint}/health", context=ctx, timeout=2) as r:
                return json.loads(r.read()).get("health") == "true"
        except (OSError, ValueError):
            return False

    def wait_healthy(self, i: int, timeout: float = 30.0) -> None:
        m = self.members[i]
        end = time.monotonic() + timeout
        while True:
            # the process first: a member that could not listen must not pass for
            # healthy because another one answers on its port
            if m.proc is None or m.proc.poll() is not None:
                raise HarnessError(f"etcd member {m.name} exited:\n{m.log.read_text()[-2000:]}")
            if time.monotonic() > end:
                raise HarnessError(f"etcd member {m.name} not healthy in {timeout:.0f} s")
            if self.healthy(i):
                return
            time.sleep(0.1)

    def close(self) -> None:
        for i in range(len(self.members)):
            self.stop(i)


def main() -> int:
    base = Path(sys.argv[1])
    base.mkdir(parents=True, exist_ok=True)
    cluster = EtcdCluster(base).start()
    print(f"ETCD_ENDPOINTS={','.join(cluster.endpoints)}")
    print(f"ETCD_CA={cluster.client.ca}\nETCD_CERT={cluster.client.cert}\n"
          f"ETCD_KEY={cluster.client.key}", flush=True)
    stop = False

    def done(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, done)
    signal.signal(signal.SIGINT, done)
    try:
        while not stop:
            time.sleep(0.2)
    finally:
        cluster.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
