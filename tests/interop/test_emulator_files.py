"""What `fleetgw emulate aws --dir DIR` leaves in DIR (emulator.json, ca.pem, claim credentials,
gateway.toml), the server certificate clients see, and that a restart keeps CA and state.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import ssl
import stat
import tomllib
import uuid
from pathlib import Path

from cryptography import x509

from support import IdentityV1, assert_issued_by_ca, new_device_key


def test_emulator_json_and_files(emulator):
    info = json.loads((emulator.dir / "emulator.json").read_text())
    assert set(info) >= {"mqtt", "api", "ca", "claimCert", "claimKey", "templates"}, info
    host, port = info["mqtt"].rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0, info["mqtt"]
    assert info["api"].startswith("http://127.0.0.1:") and not info["api"].endswith(":0"), info
    assert "FleetTemplate" in info["templates"]
    for key, name in (("ca", "ca.pem"), ("claimCert", "claim.pem"), ("claimKey", "claim.key")):
        assert Path(info[key]) == emulator.dir / name, (key, info[key])
        assert Path(info[key]).is_file()
    assert stat.S_IMODE((emulator.dir / "claim.key").stat().st_mode) == 0o600
    assert_issued_by_ca((emulator.dir / "claim.pem").read_text(), info["ca"])
    # emulator.json is the readiness signal: gateway.toml must already be there, complete.
    assert_gateway_toml(emulator)


def assert_gateway_toml(emulator) -> None:
    """DIR/gateway.toml points a gateway at this run of the emulator (the config keys of gateway.toml)."""
    config = tomllib.loads((emulator.dir / "gateway.toml").read_text())
    aws = config["cloud"]["aws"]
    assert config["cloud"]["provider"] == "aws"
    host, port = aws["endpoint"].rsplit(":", 1)
    assert host in ("localhost", "127.0.0.1") and int(port) == emulator.mqtt_port, aws
    assert (aws["ca"], aws["claim_cert"], aws["claim_key"]) == \
        (emulator.ca, emulator.claim_cert, emulator.claim_key), aws
    assert aws["template"] == "FleetTemplate"
    assert Path(config["gateway"]["state_dir"]).is_relative_to(emulator.dir), config["gateway"]


def test_server_certificate_sans(emulator):
    """The SDK checks DNS:localhost strictly (SNI localhost); paho connects by IP (no SNI)."""
    ctx = ssl.create_default_context(cafile=emulator.ca)
    ctx.load_cert_chain(emulator.claim_cert, emulator.claim_key)
    for server_hostname in ("localhost", "127.0.0.1"):
        with socket.create_connection((emulator.mqtt_host, emulator.mqtt_port), timeout=10) as s:
            with ctx.wrap_socket(s, server_hostname=server_hostname) as tls:
                der = tls.getpeercert(binary_form=True)
    cert = x509.load_der_x509_certificate(der)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)


def test_tls12_is_offered(emulator):
    ctx = ssl.create_default_context(cafile=emulator.ca)
    ctx.load_cert_chain(emulator.claim_cert, emulator.claim_key)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection((emulator.mqtt_host, emulator.mqtt_port), timeout=10) as s:
        with ctx.wrap_socket(s, server_hostname="localhost") as tls:
            assert tls.version() == "TLSv1.2"


def test_client_certificate_required(emulator):
    ctx = ssl.create_default_context(cafile=emulator.ca)  # no client certificate
    with socket.create_connection((emulator.mqtt_host, emulator.mqtt_port), timeout=10) as s:
        try:
            with ctx.wrap_socket(s, server_hostname="localhost") as tls:
                # TLS 1.3: the server's refusal arrives after the client's handshake completes
                tls.sendall(b"\x10\x00")
                assert tls.recv(1) == b"", "server served a client without a certificate"
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            pass


def test_restart_keeps_ca_claim_and_things(start_emulator, clients, tmp_path):
    first = start_emulator(dir=tmp_path / "aws")
    ca, claim = Path(first.ca).read_bytes(), Path(first.claim_cert).read_bytes()
    identity = IdentityV1(clients.sdk(first, "claim-restart-" + uuid.uuid4().hex[:6]))
    issued = identity.create_from_csr(new_device_key("restart").csr_pem).ok()
    sn = "SN-" + uuid.uuid4().hex[:10].upper()
    thing = identity.register_thing(issued.certificate_ownership_token,
                                    {"SerialNumber": sn}).ok().thing_name
    clients.close_all()
    first.stop()

    second = start_emulator(dir=tmp_path / "aws")
    # new ports, and gateway.toml (written before emulator.json) points at them
    assert_gateway_toml(second)
    assert Path(second.ca).read_bytes() == ca
    assert Path(second.claim_cert).read_bytes() == claim
    assert second.thing(thing) is not None, second.things()
    cert = second.certificate(issued.certificate_id)
    assert cert is not None and cert["status"] == "ACTIVE", cert
