"""The official Azure IoT device SDK for Python (azure-iot-device 2.14, MQTT on 8883) against
`fleetgw emulate azure`: ProvisioningDeviceClient with a symmetric key and with an X.509
certificate from the emulator's group CA, then IoTHubDeviceClient.send_message to the hub the
registration names, the message (with its properties) visible on the inspection API, a
cloud-to-device message received by the SDK, and a wrong key refused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import threading
import urllib.request
from pathlib import Path

import pytest
from azure.iot.device import IoTHubDeviceClient, Message, ProvisioningDeviceClient, X509

WAIT = 15


def api(emu, method: str, path: str, body: bytes | None = None):
    req = urllib.request.Request(emu.info["api"] + path, data=body, method=method)
    with urllib.request.urlopen(req, timeout=WAIT) as resp:
        return json.loads(resp.read() or b"null")


def derived_key(group_key_b64: str, registration_id: str) -> str:
    digest = hmac.new(base64.b64decode(group_key_b64), registration_id.encode(), hashlib.sha256)
    return base64.b64encode(digest.digest()).decode()


def dps_host(emu) -> str:
    return emu.info["dpsMqtt"].rsplit(":", 1)[0]


def new_messages(emu, after: int) -> list[dict]:
    return api(emu, "GET", f"/messages?after={after}")


def last_seq(emu) -> int:
    msgs = api(emu, "GET", "/messages")
    return msgs[-1]["seq"] if msgs else 0


def send_and_check(emu, client: IoTHubDeviceClient, device_id: str, body: str):
    after = last_seq(emu)
    client.connect()
    msg = Message(body)
    msg.message_id = f"mid-{device_id}"
    msg.content_type = "application/json"
    msg.content_encoding = "utf-8"
    msg.custom_properties["a b/c"] = "d&e"
    client.send_message(msg)
    received = new_messages(emu, after)
    assert len(received) == 1, received
    m = received[0]
    assert m["deviceId"] == device_id
    assert m["clientId"] == device_id
    assert m["transport"] == "mqtt"
    assert base64.b64decode(m["payloadBase64"]).decode() == body
    assert m["properties"]["$.mid"] == f"mid-{device_id}"
    assert m["properties"]["$.ct"] == "application/json"
    assert m["properties"]["a b/c"] == "d&e"


def test_symmetric_key_registration_then_telemetry_and_cloud_to_device(emulator):
    info = emulator.info
    key = derived_key(info["groups"]["symmetricKey"]["primaryKey"], "sdk-sym-1")
    prov = ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host=dps_host(emulator), registration_id="sdk-sym-1",
        id_scope=info["idScope"], symmetric_key=key,
        server_verification_cert=emulator.ca_pem)
    result = prov.register()
    assert result.status == "assigned", result
    state = result.registration_state
    assert state.assigned_hub == info["hubHost"] == "127.0.0.3"
    assert state.device_id == "sdk-sym-1"
    assert state.sub_status == "initialAssignment"
    assert state.created_date_time and state.last_update_date_time and state.etag
    # The SDK polled the operation (its body is a single space) until it was assigned.
    assert api(emulator, "GET", "/stats")["dps"]["polls"] >= 1
    regs = api(emulator, "GET", "/registrations")
    assert {"registrationId": "sdk-sym-1", "deviceId": "sdk-sym-1", "assignedHub": "127.0.0.3",
            "status": "assigned", "attestation": "symmetricKey"} in regs

    client = IoTHubDeviceClient.create_from_symmetric_key(
        symmetric_key=key, hostname=state.assigned_hub, device_id=state.device_id,
        server_verification_cert=emulator.ca_pem)
    try:
        send_and_check(emulator, client, "sdk-sym-1", '{"temperature": 21}')

        got = threading.Event()
        seen = {}

        def on_message(message):
            seen["data"] = message.data
            seen["props"] = dict(message.custom_properties)
            got.set()

        client.on_message_received = on_message
        # The handler subscribes; keep sending until the subscription is in place.
        for _ in range(30):
            api(emulator, "POST", "/devices/sdk-sym-1/messages?cmd=blink", b"on")
            if got.wait(0.5):
                break
        assert got.is_set(), "no cloud-to-device message reached the SDK"
        assert seen["data"] == b"on"
        assert seen["props"].get("cmd") == "blink"
    finally:
        client.shutdown()


def make_device_cert(emu, tmp: Path, cn: str) -> tuple[Path, Path]:
    group = emu.info["groups"]["x509"]
    key, csr, cert, ext = (tmp / f"{cn}.key.pem", tmp / f"{cn}.csr", tmp / f"{cn}.pem",
                           tmp / "ext.cnf")
    ext.write_text("basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    subprocess.run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key), "-subj",
                    f"/CN={cn}", "-out", str(csr)], check=True, capture_output=True)
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", group["caCert"],
                    "-CAkey", group["caKey"], "-CAcreateserial", "-CAserial", str(tmp / "serial"),
                    "-days", "30", "-extfile", str(ext), "-out", str(cert)],
                   check=True, capture_output=True)
    chain = tmp / f"{cn}-full-chain.pem"
    chain.write_text(cert.read_text() + Path(group["caCert"]).read_text())
    return chain, key


def test_x509_registration_then_telemetry(emulator, tmp_path):
    info = emulator.info
    chain, key = make_device_cert(emulator, tmp_path, "sdk-x509-1")
    x509 = X509(cert_file=str(chain), key_file=str(key))
    prov = ProvisioningDeviceClient.create_from_x509_certificate(
        provisioning_host=dps_host(emulator), registration_id="sdk-x509-1",
        id_scope=info["idScope"], x509=x509, server_verification_cert=emulator.ca_pem)
    result = prov.register()
    assert result.status == "assigned", result
    state = result.registration_state
    assert state.assigned_hub == "127.0.0.3"
    assert state.device_id == "sdk-x509-1"
    regs = api(emulator, "GET", "/registrations")
    assert any(r["registrationId"] == "sdk-x509-1" and r["attestation"] == "x509" for r in regs)

    client = IoTHubDeviceClient.create_from_x509_certificate(
        x509=x509, hostname=state.assigned_hub, device_id=state.device_id,
        server_verification_cert=emulator.ca_pem)
    try:
        send_and_check(emulator, client, "sdk-x509-1", '{"temperature": 30}')
    finally:
        client.shutdown()


def test_a_key_not_derived_from_the_group_key_is_refused(emulator):
    info = emulator.info
    wrong = derived_key(base64.b64encode(b"not the group key").decode(), "sdk-bad-1")
    prov = ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host=dps_host(emulator), registration_id="sdk-bad-1",
        id_scope=info["idScope"], symmetric_key=wrong,
        server_verification_cert=emulator.ca_pem)
    with pytest.raises(Exception):
        prov.register()
    stats = api(emulator, "GET", "/stats")
    assert any("signature" in r["reason"] for r in stats["recentRefusals"]), stats
    assert all(r["registrationId"] != "sdk-bad-1" for r in api(emulator, "GET", "/registrations"))
