"""The CBOR flavour of the fleet-provisioning API, driven with paho-mqtt + cbor2 (the SDK speaks
only JSON): requests as definite-length maps and as hand-built indefinite-length maps (0xbf ...
0xff, what streaming CBOR encoders emit), and responses that are CBOR maps on the /cbor topics.
paho connects by IP address without SNI, so these tests also check the server certificate's IP SAN.
"""

from __future__ import annotations

import uuid

import cbor2
import paho.mqtt.client as paho
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from support import (DEFAULT_TEMPLATE, assert_cert_has_key, assert_issued_by_ca,
                     new_device_key)

CSR_TOPIC = "$aws/certificates/create-from-csr/cbor"
KEYS_TOPIC = "$aws/certificates/create/cbor"
REGISTER_TOPIC = f"$aws/provisioning-templates/{DEFAULT_TEMPLATE}/provision/cbor"


def indefinite_map(pairs: list[tuple[str, object]]) -> bytes:
    """A CBOR map of indefinite length: 0xbf, key/value items, the 0xff break."""
    body = b"".join(cbor2.dumps(k) + (v if isinstance(v, bytes) else cbor2.dumps(v))
                    for k, v in pairs)
    return b"\xbf" + body + b"\xff"


def claim_probe(emulator, clients, *topics):
    probe = clients.probe(emulator, "claim-cbor-" + uuid.uuid4().hex[:8])
    for topic in topics:
        probe.subscribe_responses(topic)
    return probe


def assert_cbor_map(raw: bytes) -> None:
    assert raw and 0xA0 <= raw[0] <= 0xBF, f"response is not a CBOR map: {raw[:16].hex()}"


def test_cbor_create_from_csr_definite_map_and_register(emulator, clients):
    probe = claim_probe(emulator, clients, CSR_TOPIC, REGISTER_TOPIC)
    device = new_device_key("cbor-definite")

    probe.publish(CSR_TOPIC, cbor2.dumps({"certificateSigningRequest": device.csr_pem}))
    topic, raw, _ = probe.next_message()
    assert topic == CSR_TOPIC + "/accepted", (topic, raw[:200])
    assert_cbor_map(raw)
    issued = cbor2.loads(raw)
    assert set(issued) >= {"certificateId", "certificatePem", "certificateOwnershipToken"}
    assert_issued_by_ca(issued["certificatePem"], emulator.ca)
    assert_cert_has_key(issued["certificatePem"], device.key.public_key())

    sn = "SN-CBOR-" + uuid.uuid4().hex[:8].upper()
    probe.publish(REGISTER_TOPIC, cbor2.dumps({
        "certificateOwnershipToken": issued["certificateOwnershipToken"],
        "parameters": {"SerialNumber": sn}}))
    topic, raw, _ = probe.next_message()
    assert topic == REGISTER_TOPIC + "/accepted", (topic, cbor2.loads(raw))
    assert_cbor_map(raw)
    registered = cbor2.loads(raw)
    assert sn in registered["thingName"]
    assert isinstance(registered["deviceConfiguration"], dict)
    assert emulator.thing(registered["thingName"]) is not None


def test_cbor_indefinite_length_maps(emulator, clients):
    """Indefinite-length maps for the CSR request and for RegisterThing (nested parameters too)."""
    probe = claim_probe(emulator, clients, CSR_TOPIC, REGISTER_TOPIC)
    device = new_device_key("cbor-indefinite")

    payload = indefinite_map([("certificateSigningRequest", device.csr_pem)])
    assert payload[0] == 0xBF and payload[-1] == 0xFF
    kind, issued = probe.request(CSR_TOPIC, payload)
    assert kind == "accepted", issued
    assert_cert_has_key(issued["certificatePem"], device.key.public_key())

    sn = "SN-INDEF-" + uuid.uuid4().hex[:8].upper()
    payload = indefinite_map([
        ("certificateOwnershipToken", issued["certificateOwnershipToken"]),
        ("parameters", indefinite_map([("SerialNumber", sn)])),
    ])
    kind, registered = probe.request(REGISTER_TOPIC, payload)
    assert kind == "accepted", registered
    assert sn in registered["thingName"]
    assert emulator.thing(registered["thingName"]) is not None
    cert = emulator.certificate(issued["certificateId"])
    assert cert is not None and cert["status"] == "ACTIVE", cert


def test_cbor_create_keys_empty_and_empty_map(emulator, clients):
    """CreateKeysAndCertificate: the documented empty payload and an empty CBOR map (0xa0)."""
    probe = claim_probe(emulator, clients, KEYS_TOPIC)
    ids = set()
    for payload in (b"", b"\xa0", b"\xbf\xff"):
        kind, issued = probe.request(KEYS_TOPIC, payload)
        assert kind == "accepted", (payload, issued)
        key = load_pem_private_key(issued["privateKey"].encode(), password=None)
        assert_issued_by_ca(issued["certificatePem"], emulator.ca)
        assert_cert_has_key(issued["certificatePem"], key.public_key())
        ids.add(issued["certificateId"])
    assert len(ids) == 3, "each request must create a new certificate"


def test_json_create_keys_empty_payload(emulator, clients):
    """The seed documents an empty payload for CreateKeysAndCertificate; the SDK sends {}."""
    topic = "$aws/certificates/create/json"
    probe = claim_probe(emulator, clients, topic)
    for payload in (b"", b"{}"):
        kind, issued = probe.request(topic, payload)
        assert kind == "accepted", (payload, issued)
        assert issued["privateKey"].startswith("-----BEGIN")


def test_cbor_over_mqtt5(emulator, clients):
    """The same CBOR exchange from a non-SDK MQTT 5 client (paho, protocol 5)."""
    probe = clients.probe(emulator, "claim-cbor5-" + uuid.uuid4().hex[:8],
                          protocol=paho.MQTTv5)
    probe.subscribe_responses(CSR_TOPIC)
    probe.subscribe_responses(REGISTER_TOPIC)
    device = new_device_key("cbor-mqtt5")
    kind, issued = probe.request(CSR_TOPIC, indefinite_map(
        [("certificateSigningRequest", device.csr_pem)]))
    assert kind == "accepted", issued
    assert_cert_has_key(issued["certificatePem"], device.key.public_key())
    sn = "SN-CBOR5-" + uuid.uuid4().hex[:8].upper()
    kind, registered = probe.request(REGISTER_TOPIC, cbor2.dumps({
        "certificateOwnershipToken": issued["certificateOwnershipToken"],
        "parameters": {"SerialNumber": sn}}))
    assert kind == "accepted", registered
    assert registered["thingName"] == sn
