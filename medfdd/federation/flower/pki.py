"""Certificates and SuperNode keys for a Flower deployment, made with the `cryptography` package.

- `make_tls`: a consortium CA and a SuperLink server certificate signed by it (subjectAltName = the addresses the
  sites dial, 127.0.0.1 and localhost by default). The sites get only `ca.crt`; `ca.key` stays with the coordinator.
- `make_site_keys`: one hospital's ECDSA P-384 key pair in OpenSSH format (what `flower-supernode
  --auth-supernode-private-key` reads and `flwr supernode register` accepts). The private key never leaves the site;
  the coordinator registers the `.pub` file.

Private keys are written with mode 0600, atomically; nothing is overwritten unless asked.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from medfdd.errors import MedfddError
from medfdd.io import atomic_write_bytes

DEFAULT_HOSTS = ("127.0.0.1", "localhost")


class PkiError(MedfddError):
    """Certificates or keys cannot be written or read as asked."""


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class SiteKeys:
    private_key: Path
    public_key: Path


def _write(path: Path, data: bytes, *, private: bool, force: bool) -> Path:
    if path.exists() and not force:
        raise PkiError(str(path), "already exists", "choose another --out folder or pass --force to replace it")
    atomic_write_bytes(path, data)  # mkstemp: created 0600
    if not private:
        os.chmod(path, 0o644)
    return path


def _san(hosts: tuple[str, ...] | list[str]):
    from cryptography import x509

    names = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def make_tls(out: Path, *, hosts: tuple[str, ...] | list[str] = DEFAULT_HOSTS, days: int = 365,
             force: bool = False) -> TlsFiles:
    """Write ca.crt, ca.key, server.pem and server.key under `out` (server cert for `hosts`, signed by the CA)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not hosts:
        raise PkiError("--host", "no host name or IP address for the server certificate",
                       "pass the address the sites dial, e.g. --host coordinator.example.org")
    if days < 1:
        raise PkiError("--days", f"{days} is not a positive number of days", "pass e.g. --days 365")
    out = Path(out)
    files = TlsFiles(out / "ca.crt", out / "ca.key", out / "server.pem", out / "server.key")
    for f in (files.ca_cert, files.ca_key, files.server_cert, files.server_key):
        if f.exists() and not force:
            raise PkiError(str(f), "already exists", "choose another --out folder or pass --force to replace it")
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    until = now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "medfdd consortium"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "medfdd consortium CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now).not_valid_after(until)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA384()))

    srv_key = ec.generate_private_key(ec.SECP384R1())
    srv_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "medfdd consortium"),
                          x509.NameAttribute(NameOID.COMMON_NAME, str(hosts[0]))])
    srv_cert = (x509.CertificateBuilder().subject_name(srv_name).issuer_name(ca_name)
                .public_key(srv_key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now).not_valid_after(until)
                .add_extension(_san(list(hosts)), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                               critical=False)
                .sign(ca_key, hashes.SHA384()))

    pem = serialization.Encoding.PEM
    key_fmt = dict(encoding=pem, format=serialization.PrivateFormat.PKCS8,
                   encryption_algorithm=serialization.NoEncryption())
    _write(files.ca_key, ca_key.private_bytes(**key_fmt), private=True, force=force)
    _write(files.ca_cert, ca_cert.public_bytes(pem), private=False, force=force)
    _write(files.server_key, srv_key.private_bytes(**key_fmt), private=True, force=force)
    _write(files.server_cert, srv_cert.public_bytes(pem), private=False, force=force)
    return files


def make_site_keys(out: Path, site_id: str, *, force: bool = False) -> SiteKeys:
    """Write `<site_id>` (private, OpenSSH, 0600) and `<site_id>.pub` (OpenSSH, comment = site_id) under `out`."""
    import re

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from medfdd.config import SITE_ID_PATTERN

    if not re.match(SITE_ID_PATTERN, site_id):
        raise PkiError("--site", f"{site_id!r} is not a valid site id (pattern {SITE_ID_PATTERN})",
                       "use the site_id of the site config, e.g. hospital-a")
    out = Path(out)
    keys = SiteKeys(out / site_id, out / f"{site_id}.pub")
    for f in (keys.private_key, keys.public_key):
        if f.exists() and not force:
            raise PkiError(str(f), "already exists", "choose another --out folder or pass --force to replace it")
    key = ec.generate_private_key(ec.SECP384R1())
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(keys.private_key, priv, private=True, force=force)
    _write(keys.public_key, pub + f" {site_id}\n".encode(), private=False, force=force)
    return keys


def check_public_key(path: Path) -> str:
    """The key type of an OpenSSH public key file (only ECDSA keys are accepted by Flower's SuperNode auth)."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    path = Path(path)
    if not path.is_file():
        raise PkiError(str(path), "public key file not found", "pass the .pub file written by `medfdd federation keys`")
    try:
        key = load_ssh_public_key(path.read_bytes())
    except (ValueError, TypeError) as e:
        raise PkiError(str(path), f"not an OpenSSH public key ({e})",
                       "pass the .pub file written by `medfdd federation keys`") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise PkiError(str(path), f"a {type(key).__name__}, not an ECDSA key",
                       "make the key with `medfdd federation keys` (ECDSA P-384)")
    return f"ecdsa-{key.curve.name}"
