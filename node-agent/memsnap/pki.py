"""memsnap's own PKI: one CA on the host, a certificate per node and per client identity, and
the TLS contexts and peer identities that the agents' mutual TLS is made of.

A certificate's subject says who holds it: CN is the name (``node-1``, ``admin``), O says
what it is (NODE_ORG or CLIENT_ORG). Node certificates also carry DNS:<name> and IP:<address>
and serve both ends (an agent serves with it, and a node's own tools call other agents with
it); client certificates can only be clients, so they cannot impersonate an agent.

Files are root-only: the CA directory is 0700, every file in it and every key 0600.
"""
from __future__ import annotations

import datetime
import fcntl
import ipaddress
import os
import re
import ssl
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PKI_DIR = Path(os.environ.get("MEMSNAP_PKI_DIR", "/var/lib/memsnap/pki"))
NODE_ORG = "memsnap:node"
CLIENT_ORG = "memsnap:client"
CA_DAYS, LEAF_DAYS = 3650, 365
RENEW_BEFORE = datetime.timedelta(days=30)  # client_files() re-issues a certificate this close to its end
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # a DNS label, as Kubernetes names nodes


class PkiError(Exception):
    """A certificate or key is missing, unreadable or does not fit."""


@dataclass(frozen=True)
class Credentials:
    """A key and its certificate, PEM, in memory (written out only where they are used)."""

    cert: bytes
    key: bytes


@dataclass(frozen=True)
class TlsFiles:
    """Where one identity's certificate, key and the CA certificate are."""

    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True)
class Peer:
    """Who is at the other end of a verified connection."""

    name: str
    role: str  # "node" or "client"

    @property
    def is_node(self) -> bool:
        return self.role == "node"


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name or ""):
        raise ValueError(f"invalid identity name {name!r}: lowercase letters, digits and '-', "
                         f"at most 63, as a DNS label")
    return name


# ---- the CA ------------------------------------------------------------------------------

class CA:
    """The memsnap CA: signs node and client certificates."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey):
        self.cert, self.key = cert, key

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def new(cls, name: str = "memsnap CA") -> CA:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (_builder(subject, subject, key.public_key(), CA_DAYS)
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                               critical=True)
                .sign(key, hashes.SHA256()))
        return cls(cert, key)

    @classmethod
    def ensure(cls, directory: Path = PKI_DIR) -> CA:
        """The CA in directory (ca.crt, ca.key), made on first use. Safe to race: under a lock."""
        with _locked(directory):
            if not (directory / "ca.crt").exists():
                ca = cls.new()
                _write_private(directory / "ca.key", _key_pem(ca.key))
                _write_private(directory / "ca.crt", ca.cert_pem)  # last: its presence means complete
                return ca
            return cls.load(directory)

    @classmethod
    def load(cls, directory: Path = PKI_DIR) -> CA:
        try:
            cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
            key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
        except (OSError, ValueError) as exc:
            raise PkiError(f"cannot load the memsnap CA from {directory}: {exc}") from None
        return cls(cert, key)

    def issue_node(self, name: str, address: str) -> Credentials:
        """Key and certificate for node `name` at `address`: CN, DNS and IP name the node."""
        sans = [x509.DNSName(check_name(name)), x509.IPAddress(ipaddress.ip_address(address))]
        return self._issue(name, NODE_ORG, sans, [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])

    def issue_client(self, name: str) -> Credentials:
        """Key and certificate for a client identity (``admin``, ``operator``, ``cli``)."""
        return self._issue(check_name(name), CLIENT_ORG, [], [ExtendedKeyUsageOID.CLIENT_AUTH])

    def _issue(self, name: str, org: str, sans: list[x509.GeneralName], usages) -> Credentials:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                             x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (_builder(subject, self.cert.subject, key.public_key(), LEAF_DAYS)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                                  critical=True)
                   .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                                  critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return Credentials(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))

    def signed(self, cert_pem: bytes) -> bool:
        """Whether this CA signed the certificate (and it is not about to expire)."""
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
            cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return cert.not_valid_after_utc - _now() > RENEW_BEFORE


def client_files(name: str, directory: Path = PKI_DIR) -> TlsFiles:
    """Files of client identity `name` on the host (clients/NAME.{crt,key}), issued on first use
    and again when they near their end or the CA changed."""
    ca = CA.ensure(directory)
    files = TlsFiles(directory / "clients" / f"{check_name(name)}.crt",
                     directory / "clients" / f"{name}.key", directory / "ca.crt")
    with _locked(directory):
        if not (files.cert.exists() and files.key.exists() and ca.signed(files.cert.read_bytes())):
            write_credentials(ca.issue_client(name), files)
    return files


def write_credentials(creds: Credentials, files: TlsFiles, ca_pem: bytes | None = None) -> None:
    """Write an identity's files root-only (key first, so a cert never stands without it);
    the CA certificate too when given."""
    _write_private(files.key, creds.key)
    if ca_pem is not None:
        _write_private(files.ca, ca_pem)
    _write_private(files.cert, creds.cert)


# ---- TLS contexts ------------------------------------------------------------------------

def server_context(files: TlsFiles, require_client_cert: bool = True) -> ssl.SSLContext:
    """An agent's context: its node certificate, client certificates checked against the CA.

    With require_client_cert=False a client without a certificate still connects (open routes,
    bearer token); one that shows a certificate the CA did not sign is refused in the handshake.
    """
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=_readable(files.ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, files)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """A client's context: shows its certificate, trusts only the memsnap CA, and checks that the
    server's certificate names the host it was asked for (pass server_hostname=NODE)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=_readable(files.ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, files)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


# ---- identities --------------------------------------------------------------------------

def peer_of(peercert: dict | None) -> Peer | None:
    """The identity in a verified peer certificate (ssl's getpeercert() form), None without one."""
    if not peercert:
        return None
    attrs = {k: v for rdn in peercert.get("subject", ()) for k, v in rdn}
    name, org = attrs.get("commonName", ""), attrs.get("organizationName", "")
    if org == NODE_ORG:
        dns = {v for k, v in peercert.get("subjectAltName", ()) if k == "DNS"}
        return Peer(name, "node") if name in dns else None  # a node certificate names itself twice
    if org == CLIENT_ORG:
        return Peer(name, "client")
    return None


def request_peer(request) -> Peer | None:
    """The verified client identity of an aiohttp request (None: plain, or no certificate)."""
    transport = request.transport
    return peer_of(transport.get_extra_info("peercert")) if transport is not None else None


def identity_of(cert_pem: bytes) -> Peer:
    """Whose certificate this is (for a client to say who it is, e.g. X-Memsnap-Node)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    org = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    name = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    role = "node" if org and org[0].value == NODE_ORG else "client"
    return Peer(str(name[0].value) if name else "", role)


# ---- helpers -----------------------------------------------------------------------------

def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _builder(subject: x509.Name, issuer: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
    now = _now()
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))  # clocks of other nodes may lag
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_private(path: Path, data: bytes) -> None:
    """Write atomically, 0600 in a 0700 directory."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp: 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    fd = os.open(directory / ".lock", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _readable(path: Path) -> str:
    if not os.access(path, os.R_OK):
        raise PkiError(f"cannot read {path}")
    return str(path)


def _load_chain(ctx: ssl.SSLContext, files: TlsFiles) -> None:
    try:
        ctx.load_cert_chain(_readable(files.cert), _readable(files.key))
    except ssl.SSLError as exc:
        raise PkiError(f"{files.cert} and {files.key} do not make a certificate and key: {exc.reason or exc}") from None
