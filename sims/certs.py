"""Certificates and keys for a deployment: a private CA, a SuperLink certificate, node key pairs.

``fedmerge certs DIR --host HOST ... --nodes N`` writes::

    DIR/ca.crt, DIR/ca.key          # the private CA (keep ca.key offline)
    DIR/server.pem, DIR/server.key  # the SuperLink's certificate for HOSTs, signed by the CA
    DIR/node-I, DIR/node-I.pub      # SuperNode I's key pair (OpenSSH format, ECDSA P-384)

SuperNodes get ``ca.crt`` (``--root-certificates``) and their own key pair;
the SuperLink gets ``ca.crt``, ``server.pem``, ``server.key``, and each
node's ``.pub`` is registered with ``flwr supernode register``.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmerge.atomic import atomic_write_text

#: Validity of the CA and the server certificate.
VALID_DAYS = 365


_CA_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _write_private(path: Path, text: str) -> None:
    atomic_write_text(path, text)
    path.chmod(0o600)


def write_certs(out: Path, hosts: Sequence[str], nodes: int) -> list[Path]:
    """Write a CA, a server certificate for ``hosts`` and ``nodes`` node key pairs to ``out``.

    Parameters
    ----------
    out : Path
        Directory (created); existing files of the same names are replaced.
    hosts : sequence of str
        Names and IP addresses the SuperLink is reached at (its certificate's
        subject alternative names); at least one.
    nodes : int
        Number of SuperNode key pairs, >= 0.

    Returns
    -------
    list of Path
        The files written.
    """
    if not hosts:
        raise ValueError("--host: got none; allowed: the SuperLink's names or IP addresses")
    for host in hosts:
        if not host or any(c.isspace() or c in "/:" for c in host):
            raise ValueError(f"--host: got {host!r}; allowed: a DNS name or an IP address")
    if nodes < 0:
        raise ValueError(f"--nodes: got {nodes}; allowed: >= 0")
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    until = now + datetime.timedelta(days=VALID_DAYS)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("fedmerge private CA"))
        .issuer_name(_name("fedmerge private CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_USAGE, critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    written = [out / "ca.crt", out / "ca.key", out / "server.pem", out / "server.key"]
    atomic_write_text(written[0], ca.public_bytes(serialization.Encoding.PEM).decode())
    _write_private(written[1], _pem_key(ca_key))
    atomic_write_text(written[2], server.public_bytes(serialization.Encoding.PEM).decode())
    _write_private(written[3], _pem_key(server_key))
    for i in range(nodes):
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ).decode()
        public = (
            key.public_key()
            .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            .decode()
        )
        _write_private(out / f"node-{i}", private)
        atomic_write_text(out / f"node-{i}.pub", public + "\n")
        written += [out / f"node-{i}", out / f"node-{i}.pub"]
    return written
