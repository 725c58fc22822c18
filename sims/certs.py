"""Certificates and keys for a deployment: a private CA, a SuperLink certificate, node key pairs.

``fedmerge certs DIR --host HOST ... --nodes N`` writes::

    DIR/ca.crt, DIR/ca.key          # the private CA (keep ca.key offline)
    DIR/server.pem, DIR/server.key  # the SuperLink's certificate for HOSTs, signed by the CA
    DIR/node-I, DIR/node-I.pub      # SuperNode I's key pair (OpenSSH format, ECDSA P-384)

SuperNodes get ``ca.crt`` (``--root-certificates``) and their own key pair;
the SuperLink gets ``ca.crt``, ``server.pem``, ``server.key``, and each
node's ``.pub`` is registered with ``flwr supernode register``.

A directory that holds any of these files already is refused unless
``--force``: a new CA makes the old ``ca.crt`` of every node useless, so
``--force`` replaces the whole set, stale node keys included.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmerge.atomic import atomic_write_text

#: Validity of the CA and the server certificate.
VALID_DAYS = 365

#: Most SuperNode key pairs one call writes. Each key pair is copied to its
#: node and each public key registered with ``flwr supernode register`` by
#: hand, so a real federation is far below this; the bound stops a typo (an
#: extra zero or three) from filling a disk with hundreds of thousands of files.
MAX_NODES = 10_000

#: The files of one set besides the node key pairs, in the order they are written.
_FIXED = ("ca.crt", "ca.key", "server.pem", "server.key")
_NODE_FILE = re.compile(r"node-([0-9]+)(\.pub)?")
#: One label of a DNS name (RFC 1123): letters, digits, inner hyphens, 1 to 63 characters.
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


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


def _check_host(host: str) -> None:
    """Raise unless ``host`` is an IP address (v4 or v6, no zone) or a DNS name."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        labels = host.split(".")
        # a last label of digits only is a mistyped IPv4 address ('10.0.0.256'), not a name
        if len(host) <= 253 and all(map(_LABEL.fullmatch, labels)) and not labels[-1].isdigit():
            return
    else:
        if not (isinstance(address, ipaddress.IPv6Address) and address.scope_id):
            return
    raise ValueError(
        f"--host: got {host!r}; allowed: a DNS name or an IP address (no port, no IPv6 zone)"
    )


def _names(nodes: int) -> list[str]:
    """The names of the files :func:`write_certs` writes for ``nodes`` nodes, in order."""
    return [*_FIXED, *(f"node-{i}{suffix}" for i in range(nodes) for suffix in ("", ".pub"))]


def _order(name: str) -> tuple[int, int, str]:
    node = _NODE_FILE.fullmatch(name)
    return (0, _FIXED.index(name), name) if node is None else (1, int(node[1]), name)


def _held(out: Path) -> list[os.DirEntry[str]]:
    """The entries of ``out`` that a set of certificates and keys has or would clash with."""
    if not out.exists():
        return []
    if not out.is_dir():
        raise ValueError(
            f"DIR: got {str(out)!r}, which is not a directory; allowed: a new or empty directory"
        )
    with os.scandir(out) as entries:
        held = [e for e in entries if e.name in _FIXED or _NODE_FILE.fullmatch(e.name)]
    return sorted(held, key=lambda e: _order(e.name))


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
    """Write a private key, ``0o600`` from the start (never readable by others)."""
    atomic_write_text(path, text, mode=0o600)


def write_certs(out: Path, hosts: Sequence[str], nodes: int, *, force: bool = False) -> list[Path]:
    """Write a CA, a server certificate for ``hosts`` and ``nodes`` node key pairs to ``out``.

    Every input is checked before anything is written. Private keys
    (``ca.key``, ``server.key``, ``node-I``) are ``0o600`` from their first
    byte on.

    Parameters
    ----------
    out : Path
        Directory (created). It may hold other files, but none of
        ``ca.crt``, ``ca.key``, ``server.pem``, ``server.key``, ``node-J``,
        ``node-J.pub`` (any J) unless ``force``.
    hosts : sequence of str
        Names and IP addresses (IPv4 or IPv6) the SuperLink is reached at (its
        certificate's subject alternative names); at least one, no ports.
    nodes : int
        Number of SuperNode key pairs, 0 to :data:`MAX_NODES`.
    force : bool (default: False)
        Replace the files of an earlier set in ``out`` and remove its
        ``node-J``, ``node-J.pub`` that this call does not write (J >=
        ``nodes``), so that ``out`` holds one consistent set. Nodes that hold
        the old ``ca.crt``, and node keys registered with a SuperLink, stop
        working.

    Returns
    -------
    list of Path
        The files written.

    Raises
    ------
    ValueError
        A bad host or number of nodes; ``out`` is not a directory, or holds an
        earlier set without ``force``, or (with ``force``) a directory in
        place of one of its files. Nothing is written then.
    TypeError
        ``hosts`` is a single str, or ``nodes`` not an int. Nothing is written then.
    """
    if isinstance(hosts, str):
        raise TypeError(f"hosts: got the str {hosts!r}; allowed: a sequence of names")
    if not hosts:
        raise ValueError("--host: got none; allowed: the SuperLink's names or IP addresses")
    for host in hosts:
        _check_host(host)
    if isinstance(nodes, bool) or not isinstance(nodes, int):
        raise TypeError(f"--nodes: got {nodes!r}; allowed: an int from 0 to {MAX_NODES}")
    if not 0 <= nodes <= MAX_NODES:
        raise ValueError(f"--nodes: got {nodes}; allowed: 0 to {MAX_NODES}")
    held = _held(out)
    if held and not force:
        shown = ", ".join(e.name for e in held[:4])
        if len(held) > 4:
            shown += f" and {len(held) - 4} more"
        raise ValueError(
            f"DIR: got {str(out)!r}, which holds certificates and keys already ({shown}); "
            "allowed: a new or empty directory, or --force to replace them (nodes that hold "
            "the old ca.crt, and the node keys registered with a SuperLink, stop working)"
        )
    for entry in held:
        if entry.is_dir(follow_symlinks=False):
            raise ValueError(
                f"DIR: got {str(out)!r}, which holds a directory named {entry.name}; allowed: "
                "a file of that name, which --force replaces, or none"
            )
    names = _names(nodes)
    keep = set(names)
    for entry in held:
        if entry.name not in keep:
            (out / entry.name).unlink(missing_ok=True)
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
    written = [out / name for name in names]
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
    return written
