"""Certificates and SuperNode keys for the Flower deployment (`medfdd federation certs` / `keys`)."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key, load_ssh_public_key

from medfdd import exit_codes
from medfdd.cli import main
from medfdd.federation.flower import deploy
from medfdd.federation.flower.pki import PkiError, check_public_key, make_site_keys, make_tls


def test_server_certificate_is_signed_by_the_ca_for_the_given_hosts(tmp_path):
    files = make_tls(tmp_path, hosts=["127.0.0.1", "localhost", "coordinator.example.org"])
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    srv = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    srv.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not srv.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "coordinator.example.org"]
    key = load_pem_private_key(files.server_key.read_bytes(), None)
    assert key.public_key().public_numbers() == srv.public_key().public_numbers()
    for private in (files.ca_key, files.server_key):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(files.ca_cert.stat().st_mode) == 0o644


def test_site_keys_are_ecdsa_p384_openssh(tmp_path):
    keys = make_site_keys(tmp_path, "hospital-a")
    priv = load_ssh_private_key(keys.private_key.read_bytes(), None)
    pub = load_ssh_public_key(keys.public_key.read_bytes())
    assert isinstance(priv, ec.EllipticCurvePrivateKey) and priv.curve.name == "secp384r1"
    assert priv.public_key().public_numbers() == pub.public_numbers()
    assert keys.public_key.read_text().split()[0] == "ecdsa-sha2-nistp384"
    assert keys.public_key.read_text().split()[2] == "hospital-a"
    assert stat.S_IMODE(keys.private_key.stat().st_mode) == 0o600
    assert check_public_key(keys.public_key) == "ecdsa-secp384r1"


def test_nothing_is_overwritten_and_bad_inputs_are_typed_errors(tmp_path):
    make_site_keys(tmp_path, "hospital-a")
    with pytest.raises(PkiError, match="already exists"):
        make_site_keys(tmp_path, "hospital-a")
    make_site_keys(tmp_path, "hospital-a", force=True)
    with pytest.raises(PkiError, match="site id"):
        make_site_keys(tmp_path, "../etc/x")
    make_tls(tmp_path / "c")
    with pytest.raises(PkiError, match="already exists"):
        make_tls(tmp_path / "c")
    (tmp_path / "rsa.pub").write_text("ssh-rsa AAAA garbage\n")
    with pytest.raises(PkiError, match="OpenSSH public key"):
        check_public_key(tmp_path / "rsa.pub")


def test_cli_writes_certs_and_keys(tmp_path, capsys):
    assert main(["federation", "certs", "--out", str(tmp_path / "certs"), "--host", "10.1.2.3"]) == 0
    srv = x509.load_pem_x509_certificate((tmp_path / "certs" / "server.pem").read_bytes())
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]
    assert main(["federation", "keys", "--out", str(tmp_path / "keys"), "--site", "hospital-b"]) == 0
    assert (tmp_path / "keys" / "hospital-b.pub").is_file()
    assert main(["federation", "keys", "--out", str(tmp_path / "keys"), "--site", "hospital-b"]) == exit_codes.RUNTIME_ERROR


def test_process_arguments_are_secure_by_default(tmp_path):
    files = make_tls(tmp_path / "certs")
    keys = make_site_keys(tmp_path, "hospital-a")
    (tmp_path / "a.yaml").write_text("site_id: hospital-a\n")
    link = deploy.superlink_argv(host="127.0.0.1", port=9093, certs=tmp_path / "certs")
    assert "--enable-supernode-auth" in link and "--insecure" not in link
    assert link[link.index("--ssl-certfile") + 1] == str(files.server_cert)
    assert "--disable-runtime-dependency-installation" in link
    with pytest.raises(deploy.FlowerDeployError, match="certificate"):
        deploy.superlink_argv(port=9093)
    node = deploy.supernode_argv(site_config=tmp_path / "a.yaml", superlink="127.0.0.1:9093",
                                 security=deploy.Security(files.ca_cert), private_key=keys.private_key)
    assert node[node.index("--auth-supernode-private-key") + 1] == str(keys.private_key)
    assert node[node.index("--root-certificates") + 1] == str(files.ca_cert)
    assert f'site-config="{tmp_path / "a.yaml"}"' in node and "--insecure" not in node
    with pytest.raises(deploy.FlowerDeployError, match="CA certificate"):
        deploy.Security()
    with pytest.raises(deploy.FlowerDeployError, match="private key"):
        deploy.supernode_argv(site_config=tmp_path / "a.yaml", superlink="127.0.0.1:9093",
                              security=deploy.Security(files.ca_cert), private_key=None)
    insecure = deploy.supernode_argv(site_config=tmp_path / "a.yaml", superlink="127.0.0.1:9093",
                                     security=deploy.Security(insecure=True), private_key=None)
    assert "--insecure" in insecure
    with pytest.raises(deploy.FlowerDeployError, match="HOST:PORT"):
        deploy.parse_address("no-port")


def test_connection_is_added_without_touching_other_connections(tmp_path):
    import tomllib

    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text('[superlink]\ndefault = "mine"\n\n[superlink.mine]\naddress = "x:1"\n')
    files = make_tls(tmp_path / "certs")
    env = {"FLWR_HOME": str(home)}
    deploy.write_connection("127.0.0.1:9093", deploy.Security(files.ca_cert), env=env)
    cfg = tomllib.loads((home / "config.toml").read_text())
    assert cfg["superlink"]["default"] == "mine" and cfg["superlink"]["mine"] == {"address": "x:1"}
    assert cfg["superlink"]["medfdd"] == {"address": "127.0.0.1:9093", "root-certificates": str(files.ca_cert)}


def test_insecure_mode_is_explicit_and_loud(tmp_path):
    from argparse import Namespace

    from rich.console import Console

    from medfdd.federation.flower import cli as flower_cli

    console = Console(record=True, width=200)
    sec = flower_cli._security(Namespace(insecure=True, root_certificates=None), console)
    assert sec.insecure and "INSECURE MODE" in console.export_text()
    quiet = Console(record=True, width=200)
    with pytest.raises(deploy.FlowerDeployError, match="CA certificate"):  # no silent fallback to insecure
        flower_cli._security(Namespace(insecure=False, root_certificates=None), quiet)
    assert "INSECURE" not in quiet.export_text()
    assert main(["coordinator", "superlink", "--port", "9093"]) == exit_codes.RUNTIME_ERROR  # neither --certs nor --insecure


def test_register_needs_a_valid_site_id_for_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    files = make_tls(tmp_path / "certs")
    keys = make_site_keys(tmp_path, "hospital-a")
    bare = tmp_path / "bare.pub"
    bare.write_text(" ".join(keys.public_key.read_text().split()[:2]) + "\n")  # no comment: no site id
    args = ["--superlink", "127.0.0.1:1", "--root-certificates", str(files.ca_cert)]
    assert main(["coordinator", "register", str(bare), *args]) == exit_codes.RUNTIME_ERROR
    assert main(["coordinator", "register", str(bare), "--site", "../x", *args]) == exit_codes.RUNTIME_ERROR
