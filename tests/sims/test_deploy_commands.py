"""``fedmerge certs``, ``superlink``, ``supernode``: files and command lines, no processes."""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sims.certs import write_certs
from sims.cli import main
from sims.deploy import (
    check_node_config,
    check_port_free,
    is_loopback,
    superlink_command,
    supernode_command,
)
from sims.warm import SOCKET_ENV, warm_environment


def test_certs_chain_hosts_and_node_keys(tmp_path: Path) -> None:
    assert main(["certs", str(tmp_path), "--host", "link.example", "--host", "10.0.0.5",
                 "--nodes", "2"]) == 0  # fmt: skip
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)  # raises unless the CA signed it
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["link.example"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = serialization.load_pem_private_key((tmp_path / "server.key").read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()  # type: ignore[union-attr]
    for i in range(2):
        private = serialization.load_ssh_private_key((tmp_path / f"node-{i}").read_bytes(), None)
        public = serialization.load_ssh_public_key((tmp_path / f"node-{i}.pub").read_bytes())
        assert private.public_key().public_numbers() == public.public_numbers()  # type: ignore[union-attr]
        assert (tmp_path / f"node-{i}").stat().st_mode & 0o077 == 0
    assert not (tmp_path / "node-2").exists()
    assert (tmp_path / "ca.key").stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("hosts", [[], ["a b"], ["h:9091"]])
def test_certs_refuse_bad_hosts(tmp_path: Path, hosts: list[str]) -> None:
    with pytest.raises(ValueError, match=r"^--host: got"):
        write_certs(tmp_path, hosts, 1)


def test_superlink_command_tls_and_auth_by_default(tmp_path: Path) -> None:
    write_certs(tmp_path, ["127.0.0.1"], 0)
    cmd = superlink_command(certs=tmp_path, host="0.0.0.0", port=9091)
    assert Path(cmd[0]).name == "flower-superlink"
    assert cmd[1:] == [
        "--host", "0.0.0.0", "--port", "9091",
        "--ssl-ca-certfile", str(tmp_path / "ca.crt"),
        "--ssl-certfile", str(tmp_path / "server.pem"),
        "--ssl-keyfile", str(tmp_path / "server.key"),
        "--enable-supernode-auth",
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"^--certs: got '.*missing/ca.crt', which is not a file"):
        superlink_command(certs=tmp_path / "missing", host="0.0.0.0", port=9091)


def test_flowers_programs_come_through_a_warm_process_only_when_one_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(SOCKET_ENV, raising=False)
    venv_bin = Path(sys.executable).parent
    link = superlink_command(certs=None, host="127.0.0.1", port=9091, insecure=True, auth=False)
    node = supernode_command(
        superlink="127.0.0.1:9091",
        node_config="partition-id=0",
        certs=None,
        key=None,
        insecure=True,
    )
    assert [link[0], node[0]] == [
        str(venv_bin / "flower-superlink"), str(venv_bin / "flower-supernode")
    ]  # fmt: skip
    env, _ = warm_environment(tmp_path, {})
    monkeypatch.setenv(SOCKET_ENV, env[SOCKET_ENV])
    link = superlink_command(certs=None, host="127.0.0.1", port=9091, insecure=True, auth=False)
    node = supernode_command(
        superlink="127.0.0.1:9091",
        node_config="partition-id=0",
        certs=None,
        key=None,
        insecure=True,
    )
    shims = Path(env["PATH"].split(os.pathsep)[0])
    assert [link[0], node[0]] == [
        str(shims / "flower-superlink"), str(shims / "flower-supernode")
    ]  # fmt: skip
    assert (shims / "flower-supernode").read_text().startswith(f"#!{sys.executable} -S\n")


def test_insecure_only_on_loopback_unless_forced() -> None:
    cmd = superlink_command(certs=None, host="127.0.0.1", port=9091, insecure=True, auth=False)
    assert cmd[1:] == ["--host", "127.0.0.1", "--port", "9091", "--insecure"]
    with pytest.raises(ValueError, match=r"^--insecure: got --host 0.0.0.0; allowed: loopback"):
        superlink_command(certs=None, host="0.0.0.0", port=9091, insecure=True)
    assert "--insecure" in superlink_command(
        certs=None, host="0.0.0.0", port=9091, insecure=True, force=True, auth=False
    )
    with pytest.raises(ValueError, match=r"^--insecure: got --superlink 10.1.2.3"):
        supernode_command(
            superlink="10.1.2.3:9091", node_config="partition-id=0", certs=None, key=None,
            insecure=True,
        )  # fmt: skip
    assert [is_loopback(h) for h in ("localhost", "::1", "127.0.0.2", "10.0.0.1", "x")] == [
        True, True, True, False, False,
    ]  # fmt: skip


def test_insecure_with_supernode_authentication_is_refused_before_flower_starts() -> None:
    """Flower refused it only once started: exit code 104 and a paragraph."""
    with pytest.raises(ValueError, match=r"^--insecure: got it without --no-auth; allowed: "):
        superlink_command(certs=None, host="127.0.0.1", port=9091, insecure=True)


@pytest.mark.parametrize("host", ["bad host", "192.0.2.1"])
def test_a_host_that_cannot_be_listened_on_is_named_not_the_port(host: str) -> None:
    """A bad --host used to be reported as '--port: got 9091, which another process holds'."""
    with pytest.raises(ValueError) as refused:
        check_port_free(host, 9091, "--port")
    assert str(refused.value).startswith(f"--host: got {host!r} (")
    assert "allowed: an address of this machine" in str(refused.value)


def test_supernode_command_with_key(tmp_path: Path) -> None:
    write_certs(tmp_path, ["link"], 1)
    cmd = supernode_command(
        superlink="link:9091", node_config="partition-id=0 data-dir='/d'", certs=tmp_path,
        key=tmp_path / "node-0", port=9100,
    )  # fmt: skip
    assert cmd[1:] == [
        "--superlink", "link:9091", "--node-config", "partition-id=0 data-dir='/d'",
        "--root-certificates", str(tmp_path / "ca.crt"),
        "--auth-supernode-private-key", str(tmp_path / "node-0"),
        "--port", "9100",
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"^--superlink: got 'link'; allowed: HOST:PORT"):
        supernode_command(superlink="link", node_config="", certs=tmp_path, key=None)
    with pytest.raises(ValueError, match=r"^--key: got"):
        supernode_command(
            superlink="link:1", node_config="partition-id=0", certs=tmp_path,
            key=tmp_path / "node-9",
        )  # fmt: skip


@pytest.mark.parametrize(
    ("node_config", "needle"),
    [
        ("garbage", "in which 'garbage' is no key=value pair"),
        ("partition-id=0 junk", "in which 'junk' is no key=value pair"),
        ("", "got partition-id None in ''"),
        ("data-dir='/d'", "got partition-id None"),
        ("partition-id=-1", "got partition-id -1"),
        ("partition-id='0'", "got partition-id '0'"),
        ("partition-id=x", "got 'partition-id=x' (Invalid value"),
        ("missing.toml", "got 'missing.toml' ("),
    ],
)
def test_a_node_config_flower_would_misread_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, node_config: str, needle: str
) -> None:
    """Flower keeps the key=value pairs it finds: `garbage` was an empty config, and the
    node joined without the partition-id its ClientApp needs."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as refused:
        supernode_command(
            superlink="127.0.0.1:9091", node_config=node_config, certs=None, key=None,
            insecure=True,
        )  # fmt: skip
    line = str(refused.value)
    assert line.startswith("--node-config: ") and needle in line, line
    assert "allowed: space-separated key=value pairs with partition-id" in line


def test_a_node_config_file_reads_as_flowers_does(tmp_path: Path) -> None:
    (tmp_path / "node.toml").write_text("partition-id = 3\ndata-dir = '/srv/d'\n")
    assert check_node_config(str(tmp_path / "node.toml")) == {
        "partition-id": 3, "data-dir": "/srv/d"
    }  # fmt: skip
    assert check_node_config("partition-id=2 num-partitions=10 data-dir=\"/a b\"") == {
        "partition-id": 2, "num-partitions": 10, "data-dir": "/a b"
    }  # fmt: skip


def test_cli_refuses_insecure_off_loopback_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["superlink", "--insecure"]) == 2
    assert "--insecure: got --host 0.0.0.0" in capsys.readouterr().err


def test_the_deployment_commands_import_neither_pytorch_nor_flower(tmp_path: Path) -> None:
    """``fedmerge supernode``, ``superlink``, ``certs``, ``status`` and ``federation down``
    run in a process that never imports PyTorch, Flower, NumPy or the scenario configs
    (they start in a blink)."""
    import json
    import subprocess
    import sys

    from sims.local_federation import STATE_FILE

    fed = tmp_path / "fed"  # a federation whose processes are all gone
    fed.mkdir()
    (fed / STATE_FILE).write_text(json.dumps({"processes": []}))

    script = (
        "import sys\n"
        "from sims.cli import main\n"
        f"main(['certs', {str(tmp_path)!r}, '--host', '127.0.0.1', '--nodes', '1'])\n"
        f"main(['status', {str(tmp_path)!r}])\n"
        f"assert main(['federation', 'down', {str(fed)!r}]) == 0\n"
        "for argv in (['supernode', '--help'], ['superlink', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = ('torch', 'flwr', 'numpy', 'ray', 'strategies.config', 'sims.commands')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
    assert (tmp_path / "node-0.pub").is_file()  # the commands did run
    assert not (fed / STATE_FILE).exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"superlink": "link:99999"}, "--superlink: got 'link:99999'; allowed: HOST:PORT, PORT 1 to "
      "65535"),
     ({"superlink": "link:0"}, "--superlink: got 'link:0'; allowed: HOST:PORT"),
     ({"port": -5}, "--port: got -5; allowed: 1 to 65535"),
     ({"port": 70000}, "--port: got 70000; allowed: 1 to 65535")],
)  # fmt: skip
def test_supernode_command_refuses_ports_out_of_range(
    tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    args: dict[str, object] = {"superlink": "link:9091", "node_config": "", "certs": None,
                               "key": None, "insecure": True, "force": True, **kwargs}  # fmt: skip
    with pytest.raises(ValueError) as err:
        supernode_command(**args)  # type: ignore[arg-type]
    assert str(err.value).startswith(message)


@pytest.mark.parametrize("command", ["supernode", "superlink"])
def test_a_port_that_another_process_holds_is_refused_before_flower_starts(
    command: str,
) -> None:
    """Flower would find out only when it listens (a traceback), and a SuperNode's ClientApp
    process would meanwhile serve the node that holds the port. Each in a child process: a
    check that let it through would start Flower's programs (or become one, by exec)."""
    import socket
    import subprocess

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        argv = {
            "supernode": ["supernode", "--superlink", "127.0.0.1:9091", "--insecure",
                          "--node-config", "partition-id=0", "--port", str(port)],
            "superlink": ["superlink", "--insecure", "--no-auth", "--host", "127.0.0.1",
                          "--port", str(port)],
        }[command]  # fmt: skip
        run = subprocess.run(
            [sys.executable, "-m", "sims.cli", *argv], cwd=Path(__file__).resolve().parents[2],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stderr.startswith(
        f"fedmerge: error: --port: got {port}, which another process holds on 127.0.0.1 "
        "(Address already in use); allowed: a free port"
    )
    assert len(run.stderr.splitlines()) == 1 and run.stdout == ""
