"""``sims.certs.write_certs``: no silent overwrite, keys private from their first byte, hosts."""

from __future__ import annotations

import ipaddress
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fedmerge.atomic import atomic_write
from sims import certs
from sims.certs import write_certs
from sims.cli import main

PRIVATE = {"ca.key", "server.key"}


def _snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every entry of ``directory`` (hidden ones too): its bytes (none for a folder) and mode."""
    return {
        p.name: (p.read_bytes() if p.is_file() else b"", stat.S_IMODE(p.stat().st_mode))
        for p in directory.iterdir()
    }


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def no_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail at the first file write_certs writes (a refused call writes none)."""

    def refuse(path: Path, text: str, **kwargs: object) -> None:
        raise AssertionError(f"wrote {path}")

    monkeypatch.setattr(certs, "atomic_write_text", refuse)


@pytest.fixture
def modes_at_rename(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Record, for every rename, the permissions the temp file has just before it."""
    seen: dict[str, int] = {}
    replace = os.replace

    def spy(src: str, dst: str) -> None:
        seen[Path(dst).name] = stat.S_IMODE(os.stat(src).st_mode)
        replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    return seen


# --- defect 1: an existing set is refused without force, replaced whole with it ---


def test_second_call_without_force_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "c1"
    write_certs(out, ["127.0.0.1"], 2)
    before = _snapshot(out)
    assert set(before) == {"ca.crt", "ca.key", "server.pem", "server.key"} | {
        f"node-{i}{s}" for i in range(2) for s in ("", ".pub")
    }
    with pytest.raises(ValueError) as refused:
        write_certs(out, ["127.0.0.1"], 1)
    line = str(refused.value)
    assert "\n" not in line
    assert line.startswith(f"DIR: got {str(out)!r}, which holds")
    assert "(ca.crt, ca.key, server.pem, server.key and 4 more)" in line
    assert "; allowed: a new or empty directory, or --force to replace them" in line
    assert _snapshot(out) == before  # byte for byte, no new file, no temp file


def test_any_node_key_alone_is_refused(tmp_path: Path, no_writes: None) -> None:
    (tmp_path / "node-7.pub").write_text("ssh-ed25519 AAAA old\n")
    with pytest.raises(ValueError, match=r"^DIR: got .*\(node-7\.pub\); allowed: "):
        write_certs(tmp_path, ["link"], 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node-7.pub"]


def test_cli_refuses_a_second_run_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "c1")
    assert main(["certs", out, "--host", "127.0.0.1", "--nodes", "2"]) == 0
    before = _snapshot(tmp_path / "c1")
    capsys.readouterr()
    assert main(["certs", out, "--host", "127.0.0.1", "--nodes", "1"]) == 2
    err = capsys.readouterr().err
    assert "DIR: got" in err and "ca.key" in err
    assert _snapshot(tmp_path / "c1") == before


def test_force_replaces_the_set_and_removes_stale_node_keys(tmp_path: Path) -> None:
    write_certs(tmp_path, ["127.0.0.1"], 3)
    (tmp_path / "notes.txt").write_text("mine")
    old = _snapshot(tmp_path)
    written = write_certs(tmp_path, ["127.0.0.1"], 1, force=True)
    new = _snapshot(tmp_path)
    kept = {"ca.crt", "ca.key", "server.pem", "server.key", "node-0", "node-0.pub"}
    assert set(new) == kept | {"notes.txt"}
    assert sorted(p.name for p in written) == sorted(kept)
    assert new["notes.txt"] == old["notes.txt"]
    for name in kept:
        assert new[name][0] != old[name][0], name
    ca = x509.load_pem_x509_certificate(new["ca.crt"][0])
    x509.load_pem_x509_certificate(new["server.pem"][0]).verify_directly_issued_by(ca)
    private = serialization.load_ssh_private_key(new["node-0"][0], None)
    public = serialization.load_ssh_public_key(new["node-0.pub"][0])
    assert private.public_key().public_numbers() == public.public_numbers()  # type: ignore[union-attr]


def test_force_refuses_a_directory_in_place_of_a_key(tmp_path: Path) -> None:
    write_certs(tmp_path, ["link"], 1)
    (tmp_path / "node-5").mkdir()
    before = _snapshot(tmp_path)
    with pytest.raises(
        ValueError, match=r"^DIR: got .*, which holds a directory named node-5; allowed: "
    ):
        write_certs(tmp_path, ["link"], 0, force=True)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("existing", [False, True])
def test_new_or_empty_directory_needs_no_force(tmp_path: Path, existing: bool) -> None:
    out = tmp_path / "a" / "b"
    if existing:
        out.mkdir(parents=True)
    written = write_certs(out, ["link.example"], 2)
    assert sorted(p.name for p in written) == sorted(p.name for p in out.iterdir())
    assert len(written) == 4 + 2 * 2


def test_a_file_as_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "c").write_text("x")
    with pytest.raises(ValueError, match=r"^DIR: got .*, which is not a directory; allowed: "):
        write_certs(tmp_path / "c", ["link"], 0)


# --- defect 2: private keys are never readable by others ---


def test_private_keys_are_private_before_the_rename(
    tmp_path: Path, umask_022: None, modes_at_rename: dict[str, int]
) -> None:
    write_certs(tmp_path, ["127.0.0.1"], 2)
    private = PRIVATE | {"node-0", "node-1"}
    assert set(modes_at_rename) == private | {"ca.crt", "server.pem", "node-0.pub", "node-1.pub"}
    for name, mode in modes_at_rename.items():
        final = stat.S_IMODE((tmp_path / name).stat().st_mode)
        if name in private:
            assert mode & 0o077 == 0, (name, oct(mode))
            assert final == 0o600, (name, oct(final))
        else:
            assert mode == final == 0o666 & ~0o022, (name, oct(mode))


def test_atomic_write_mode_applies_to_the_temp_file(
    tmp_path: Path, umask_022: None, modes_at_rename: dict[str, int]
) -> None:
    path = tmp_path / "key"
    path.write_text("old")
    path.chmod(0o644)
    while_open: list[int] = []

    def write(f: object) -> None:
        f.write(b"secret")  # type: ignore[attr-defined]
        while_open.append(stat.S_IMODE(os.fstat(f.fileno()).st_mode))  # type: ignore[attr-defined]

    atomic_write(path, write, mode=0o600)
    assert while_open == [0o600]
    assert modes_at_rename == {"key": 0o600}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == b"secret"


# --- defect 3: IPv6 addresses are hosts; ports and spaces are not ---


def test_ipv6_hosts_are_in_the_certificate(tmp_path: Path) -> None:
    write_certs(tmp_path, ["::1", "fd00::5", "127.0.0.1", "link.example"], 0)
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.IPv6Address("::1"),
        ipaddress.IPv6Address("fd00::5"),
        ipaddress.IPv4Address("127.0.0.1"),
    ]
    assert san.get_values_for_type(x509.DNSName) == ["link.example"]


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1:9091",
        "[::1]:9091",
        "[::1]",
        "a b",
        " link",
        "link/x",
        "",
        "fe80::1%eth0",
        "10.0.0.256",
        "a..b",
        "-link.example",
        "link_x",
        "l\u00efnk",
    ],
)
def test_bad_hosts_are_refused_before_anything_is_written(
    tmp_path: Path, no_writes: None, host: str
) -> None:
    out = tmp_path / "c"
    with pytest.raises(ValueError) as refused:
        write_certs(out, ["link.example", host], 1)
    assert str(refused.value) == (
        f"--host: got {host!r}; allowed: a DNS name or an IP address (no port, no IPv6 zone)"
    )
    assert not out.exists()


def test_a_single_str_is_not_a_list_of_hosts(tmp_path: Path, no_writes: None) -> None:
    with pytest.raises(TypeError, match=r"^hosts: got the str 'link'"):
        write_certs(tmp_path / "c", "link", 1)
    assert not (tmp_path / "c").exists()


# --- defect 4: the number of nodes is bounded ---


@pytest.mark.parametrize("nodes", [-1, 10_001, 100_000_000])
def test_nodes_out_of_range_are_refused_before_anything_is_written(
    tmp_path: Path, no_writes: None, nodes: int
) -> None:
    out = tmp_path / "c"
    with pytest.raises(ValueError) as refused:
        write_certs(out, ["link"], nodes)
    assert str(refused.value) == f"--nodes: got {nodes}; allowed: 0 to 10000"
    assert not out.exists()


@pytest.mark.parametrize("nodes", [2.0, True, "2"])
def test_nodes_must_be_an_int(tmp_path: Path, no_writes: None, nodes: object) -> None:
    with pytest.raises(TypeError, match=r"^--nodes: got .*; allowed: an int from 0 to 10000$"):
        write_certs(tmp_path / "c", ["link"], nodes)  # type: ignore[arg-type]
    assert not (tmp_path / "c").exists()
