"""Replication credentials: each store's own key and certificate, and the peers it trusts.

Every connection between a primary and a replica is TLS 1.3 with mutual
certificate checks. ``keygen`` gives a store a P-256 key and a self-signed
certificate (``STORE/tls/node.key``, ``node.crt``); ``trust`` adds a peer's
certificate to ``STORE/tls/trusted/``. A side accepts exactly the certificates it
trusts (each one is its own trust anchor: pinning, no CA to compromise).
TLS 1.3's fresh key exchange per connection makes a replayed handshake fail.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import os
import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ..errors import CdpfsError
from ..names import check_name
from ..system import fsync_dir, read_small_file

log = logging.getLogger(__name__)

TLS_DIR = "tls"
MAX_CERT = 64 * 1024  # bytes: a PEM certificate is 1-2 KiB; more is a wrong file


def tls_dir(store: Path) -> Path:
    return Path(store) / TLS_DIR


def fingerprint(pem: bytes) -> str:
    """SHA-256 of a certificate's DER form, as colon-separated hex (what peers compare)."""
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    digest = hashlib.sha256(der).hexdigest()
    return ":".join(digest[i:i + 2] for i in range(0, 16, 2)) + "..." + digest[-8:]


def keygen(store: Path, name: str, *, force: bool = False) -> Path:
    """Make the store's key and self-signed certificate; return the certificate's path."""
    d = tls_dir(store)
    key_path, cert_path = d / "node.key", d / "node.crt"
    if key_path.exists() and not force:
        raise CdpfsError(f"{key_path}: exists already (use --force to replace it)")
    if Path(store).exists() and not Path(store).is_dir():
        raise CdpfsError(f"{store}: exists and is not a directory (a store, or where one "
                         "is to be made)")
    try:
        Path(store).mkdir(parents=True, exist_ok=True)
        d.mkdir(mode=0o700, exist_ok=True)
        (d / "trusted").mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise CdpfsError(f"{exc.filename or d}: cannot make the TLS directory: "
                         f"{exc.strerror}") from None

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"cdpfs {name}")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    log.info("made the TLS identity of %s: %s", store, fingerprint(cert_path.read_bytes()))
    return cert_path


def trust(store: Path, cert_file: Path, name: str) -> str:
    """Trust the peer certificate in the file ``cert_file`` under ``name``; return its
    fingerprint. Only a regular file of at most ``MAX_CERT`` bytes is read (a FIFO
    given by mistake is refused, not waited on)."""
    check_name(name)
    try:
        pem = read_small_file(cert_file, MAX_CERT)
    except OSError as exc:
        raise CdpfsError(f"{cert_file}: cannot read: {exc.strerror}") from None
    except ValueError as exc:
        raise CdpfsError(f"{cert_file}: {exc}: not a PEM certificate") from None
    return trust_pem(store, pem, name, str(cert_file))


def trust_pem(store: Path, pem: bytes, name: str, source: str = "certificate") -> str:
    """Trust the PEM certificate ``pem`` under ``name`` (a peer name: ``check_name``);
    return its fingerprint. The file appears whole or not at all (written aside and
    renamed), so a peer never sees half a certificate."""
    check_name(name)
    try:
        fp = fingerprint(pem)
    except ValueError as exc:
        raise CdpfsError(f"{source}: not a PEM certificate ({exc})") from None
    d = tls_dir(store) / "trusted"
    if not d.is_dir():
        raise CdpfsError(f"{store}: no TLS identity yet (run 'cdpfs replica keygen "
                         f"{store}')")
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, d / f"{name}.crt")
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(d)
    return fp


def trusted_names(store: Path) -> list[str]:
    d = tls_dir(store) / "trusted"
    return sorted(p.stem for p in d.glob("*.crt")) if d.is_dir() else []


def _context(store: Path, purpose: ssl.Purpose, peer: str | None = None) -> ssl.SSLContext:
    d = tls_dir(store)
    trusted = sorted((d / "trusted").glob("*.crt")) if (d / "trusted").is_dir() else []
    if peer is not None:
        trusted = [p for p in trusted if p.stem == peer]
        if not trusted:
            raise CdpfsError(f"{store} trusts no certificate named {peer!r} (run 'cdpfs "
                             f"replica trust {store} CERT --name {peer}')")
    if not (d / "node.key").exists():
        raise CdpfsError(f"{store}: no TLS identity (run 'cdpfs replica keygen {store}')")
    if not trusted:
        raise CdpfsError(f"{store}: trusts no peer yet (run 'cdpfs replica trust {store} "
                         "PEER.crt')")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH
                         else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # peers are pinned by certificate, not by name
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(d / "node.crt", d / "node.key")
    ctx.load_verify_locations(cadata="".join(p.read_text() for p in trusted))
    return ctx


def server_context(store: Path) -> ssl.SSLContext:
    """TLS for the side that listens: requires a trusted client certificate."""
    return _context(store, ssl.Purpose.CLIENT_AUTH)


def client_context(store: Path, peer: str) -> ssl.SSLContext:
    """TLS for the side that connects to replica ``peer``: requires exactly the
    certificate trusted under that name."""
    return _context(store, ssl.Purpose.SERVER_AUTH, peer)
