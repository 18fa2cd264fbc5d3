"""Connection-level behaviour of the emulated IoT Core: responses go only to the requesting
connection (and only if it subscribed), per-certificate policy for claim and device certificates,
device telemetry recorded behind GET /messages, QoS 2 and oversized payloads, client-id takeover.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
from awscrt import mqtt, mqtt5
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from support import (STEP_TIMEOUT, ConnectRefused, IdentityV1, assert_cert_has_key, b64,
                     new_device_key, wait_for, write_pem)

CSR_JSON = "$aws/certificates/create-from-csr/json"


def csr_request(csr_pem: str) -> bytes:
    return json.dumps({"certificateSigningRequest": csr_pem}).encode()


def key_of(cert_pem: str):
    return x509.load_pem_x509_certificate(cert_pem.encode()).public_key()


def test_responses_go_only_to_the_requester(emulator, clients):
    a = clients.probe(emulator, "claim-a-" + uuid.uuid4().hex[:6])
    b = clients.probe(emulator, "claim-b-" + uuid.uuid4().hex[:6])
    a.subscribe_responses(CSR_JSON)
    b.subscribe_responses(CSR_JSON)

    key_a1, key_b, key_a2 = (new_device_key(n) for n in ("a1", "b", "a2"))
    kind, resp = a.request(CSR_JSON, csr_request(key_a1.csr_pem))
    assert kind == "accepted"
    assert_cert_has_key(resp["certificatePem"], key_a1.key.public_key())

    # Had A's response been routed to B as well, it would be queued on B's connection before B's
    # own request was even sent: B's first message must be its own response.
    kind, resp = b.request(CSR_JSON, csr_request(key_b.csr_pem))
    assert kind == "accepted"
    assert_cert_has_key(resp["certificatePem"], key_b.key.public_key())

    kind, resp = a.request(CSR_JSON, csr_request(key_a2.csr_pem))
    assert kind == "accepted"
    assert_cert_has_key(resp["certificatePem"], key_a2.key.public_key())
    assert a.pending_messages() == [] and b.pending_messages() == []


def test_concurrent_claim_connections_get_only_their_own_responses(emulator, clients):
    """Four connections with the same claim certificate pipeline five requests each at the same
    time; every connection gets exactly five responses, each for one of its own CSRs."""
    n_conn, n_req = 4, 5
    probes = [clients.probe(emulator, f"claim-par-{i}-{uuid.uuid4().hex[:6]}")
              for i in range(n_conn)]
    for p in probes:
        p.subscribe_responses(CSR_JSON)
    keys = [[new_device_key(f"par-{i}-{j}") for j in range(n_req)] for i in range(n_conn)]
    for p, own in zip(probes, keys):
        for k in own:
            p.publish(CSR_JSON, csr_request(k.csr_pem), qos=1)
    for p, own in zip(probes, keys):
        own_spki = {_spki(k.key.public_key()) for k in own}
        got = set()
        for _ in range(n_req):
            topic, body, qos = p.next_message()
            assert topic == CSR_JSON + "/accepted", (topic, body[:200])
            assert qos == 1, "responses to a QoS 1 subscription come at QoS 1"
            spki = _spki(key_of(json.loads(body)["certificatePem"]))
            assert spki in own_spki, f"{p.client_id} received a certificate for another connection"
            got.add(spki)
        assert got == own_spki
    for p in probes:  # nothing extra arrived: one more round trip each, then an empty queue
        p.ping()
        assert p.pending_messages() == []


def _spki(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def test_no_response_without_subscription(emulator, clients):
    """A request published before subscribing gets no response (AWS does not queue it)."""
    probe = clients.probe(emulator, "claim-nosub-" + uuid.uuid4().hex[:6])
    first, second = new_device_key("unsubscribed"), new_device_key("subscribed")
    mid = probe.publish(CSR_JSON, csr_request(first.csr_pem), qos=1)
    probe.wait_puback(mid)
    probe.subscribe_responses(CSR_JSON)
    kind, resp = probe.request(CSR_JSON, csr_request(second.csr_pem))
    assert kind == "accepted"
    # the first message to arrive answers the second request, not the first
    assert_cert_has_key(resp["certificatePem"], second.key.public_key())


def test_unsubscribe_stops_responses(emulator, clients):
    probe = clients.probe(emulator, "claim-unsub-" + uuid.uuid4().hex[:6])
    probe.subscribe_responses(CSR_JSON)
    kind, _ = probe.request(CSR_JSON, csr_request(new_device_key("u1").csr_pem))
    assert kind == "accepted"
    probe.unsubscribe(f"{CSR_JSON}/accepted", f"{CSR_JSON}/rejected")
    mid = probe.publish(CSR_JSON, csr_request(new_device_key("u2").csr_pem), qos=1)
    probe.wait_puback(mid)
    last = new_device_key("u3")
    probe.subscribe_responses(CSR_JSON)
    kind, resp = probe.request(CSR_JSON, csr_request(last.csr_pem))
    assert kind == "accepted"
    assert_cert_has_key(resp["certificatePem"], last.key.public_key())


def provision(emulator, clients, tmp_path, serial_number: str | None = None):
    """Runs CreateCertificateFromCsr + RegisterThing with the SDK; returns (thing, cert, key)."""
    identity = IdentityV1(clients.sdk(emulator, "claim-prov-" + uuid.uuid4().hex[:6]))
    device = new_device_key("device")
    issued = identity.create_from_csr(device.csr_pem).ok()
    sn = serial_number or "SN-" + uuid.uuid4().hex[:10].upper()
    registered = identity.register_thing(issued.certificate_ownership_token,
                                         {"SerialNumber": sn}).ok()
    cert = write_pem(tmp_path, f"{sn}.crt", issued.certificate_pem)
    key = write_pem(tmp_path, f"{sn}.key", device.key_pem)
    return registered.thing_name, cert, key


def test_pending_activation_certificate_refused(emulator, clients, tmp_path):
    identity = IdentityV1(clients.sdk(emulator, "claim-pending-" + uuid.uuid4().hex[:6]))
    device = new_device_key("pending")
    issued = identity.create_from_csr(device.csr_pem).ok()
    cert = write_pem(tmp_path, "pending.crt", issued.certificate_pem)
    key = write_pem(tmp_path, "pending.key", device.key_pem)

    with pytest.raises(ConnectRefused):
        clients.probe(emulator, "pending-device", cert_path=cert, key_path=key)
    # The official SDK is refused too.
    conn = clients.sdk(emulator, "pending-device", connect=False, cert_path=cert, key_path=key)
    with pytest.raises(Exception):
        conn.connect().result(STEP_TIMEOUT)
    # After RegisterThing the same certificate is accepted (as the thing's client id).
    registered = identity.register_thing(issued.certificate_ownership_token,
                                         {"SerialNumber": "SN-" + uuid.uuid4().hex[:8]}).ok()
    clients.probe(emulator, registered.thing_name, cert_path=cert, key_path=key)


def test_device_telemetry_recorded(emulator, clients, tmp_path):
    """After RegisterThing the device certificate connects with client id = thing name (official
    SDK, MQTT 3.1.1) and its QoS 1 publish is PUBACKed and listed by GET /messages."""
    thing, cert, key = provision(emulator, clients, tmp_path)
    conn = clients.sdk(emulator, thing, cert_path=cert, key_path=key)
    topic = f"dt/{thing}/telemetry"
    payload = json.dumps({"temperature": 21.5, "seq": 1}).encode()
    publish_future, _packet_id = conn.publish(topic, payload, mqtt.QoS.AT_LEAST_ONCE)
    publish_future.result(STEP_TIMEOUT)  # completes on PUBACK for QoS 1

    def recorded():
        return [m for m in emulator.messages() if m.get("clientId") == thing]
    mine = wait_for(f"GET /messages to list {thing}'s publish", recorded)
    assert len(mine) == 1, mine
    assert mine[0]["topic"] == topic
    assert b64(mine[0]["payloadBase64"]) == payload
    assert mine[0]["qos"] == 1
    stats = emulator.get("/stats")
    assert stats["clients"][thing]["messages"] == 1, stats
    assert stats["clients"][thing]["bytes"] == len(payload), stats


def test_device_messages_in_arrival_order(emulator, clients, tmp_path):
    thing, cert, key = provision(emulator, clients, tmp_path)
    probe = clients.probe(emulator, thing, cert_path=cert, key_path=key)
    mids = [probe.publish(f"dt/{thing}/telemetry/seq", str(i).encode(), qos=1) for i in range(20)]
    for mid in mids:
        probe.wait_puback(mid)
    mine = [m for m in emulator.messages() if m.get("clientId") == thing]
    assert [b64(m["payloadBase64"]) for m in mine] == [str(i).encode() for i in range(20)]


def test_device_client_id_must_be_thing_name(emulator, clients, tmp_path):
    thing, cert, key = provision(emulator, clients, tmp_path)
    with pytest.raises(ConnectRefused):
        clients.probe(emulator, thing + "-other", cert_path=cert, key_path=key)
    clients.probe(emulator, thing, cert_path=cert, key_path=key).ping(f"cmd/{thing}/#")


def test_claim_connection_cannot_publish_telemetry(emulator, clients):
    probe = clients.probe(emulator, "claim-telemetry-" + uuid.uuid4().hex[:6])
    mid = probe.publish("dt/claim/telemetry", b'{"sneaky":true}', qos=1)
    probe.wait_closed()
    assert mid not in probe.pubacks, "the forbidden publish was acknowledged"
    assert not any(m.get("topic") == "dt/claim/telemetry" for m in emulator.messages())


def test_claim_connection_cannot_subscribe_elsewhere(emulator, clients):
    probe = clients.probe(emulator, "claim-sub-" + uuid.uuid4().hex[:6])
    probe._call(lambda: probe.client.subscribe("dt/#", 1))
    probe.wait_closed()


def test_qos2_subscribe_granted_qos1_and_qos2_publish_closes(emulator, clients, tmp_path):
    thing, cert, key = provision(emulator, clients, tmp_path)
    probe = clients.probe(emulator, thing, cert_path=cert, key_path=key)
    codes = probe.subscribe(f"cmd/{thing}/#", qos=2)
    assert [int(c.value) for c in codes] == [1], codes
    probe.publish(f"dt/{thing}/telemetry", b"qos2", qos=2)
    probe.wait_closed()
    assert not any(b64(m["payloadBase64"]) == b"qos2" for m in emulator.messages())


def test_oversized_payload_closes(emulator, clients, tmp_path):
    thing, cert, key = provision(emulator, clients, tmp_path)
    probe = clients.probe(emulator, thing, cert_path=cert, key_path=key)
    # exactly 128 KiB is accepted, one byte more closes the connection
    ok = probe.publish(f"dt/{thing}/big", b"x" * (128 * 1024), qos=1)
    probe.wait_puback(ok)
    probe.publish(f"dt/{thing}/big", b"x" * (128 * 1024 + 1), qos=1)
    probe.wait_closed()
    sizes = [len(b64(m["payloadBase64"])) for m in emulator.messages() if m["clientId"] == thing]
    assert sizes == [128 * 1024], sizes


def test_same_client_id_takes_over(emulator, clients, tmp_path):
    thing, cert, key = provision(emulator, clients, tmp_path)
    first = clients.probe(emulator, thing, cert_path=cert, key_path=key)
    second = clients.probe(emulator, thing, cert_path=cert, key_path=key)
    first.wait_closed()
    mid = second.publish(f"dt/{thing}/telemetry", b"after-takeover", qos=1)
    second.wait_puback(mid)


def test_device_telemetry_over_mqtt5(emulator, clients, tmp_path):
    """The SDK's MQTT 5 client as a device: QoS 1 publish PUBACKed with success, then listed."""
    thing, cert, key = provision(emulator, clients, tmp_path)
    device = clients.sdk5(emulator, thing, cert_path=cert, key_path=key)
    device.wait_connected()
    topic = f"dt/{thing}/telemetry"
    done = device.client.publish(mqtt5.PublishPacket(topic=topic, payload=b'{"v":5}',
                                                     qos=mqtt5.QoS.AT_LEAST_ONCE))
    puback = done.result(STEP_TIMEOUT).puback
    assert puback is not None and puback.reason_code == mqtt5.PubackReasonCode.SUCCESS, puback
    mine = wait_for(f"GET /messages to list {thing}'s MQTT 5 publish",
                    lambda: [m for m in emulator.messages() if m.get("clientId") == thing])
    assert [(m["topic"], b64(m["payloadBase64"]), m["qos"]) for m in mine] == \
        [(topic, b'{"v":5}', 1)]


def test_keep_alive_enforced(emulator, clients):
    """A client that asked for keep-alive 1 s and then says nothing is disconnected (IoT Core
    allows 1.5 x the keep-alive), not before the keep-alive has passed."""
    probe = clients.probe(emulator, "claim-ka-" + uuid.uuid4().hex[:6], keepalive=1)
    probe.ping()
    probe.go_silent()
    silent_since = time.monotonic()
    wait_for("the server to close a connection silent past its keep-alive",
             probe.server_hung_up, timeout=10)
    elapsed = time.monotonic() - silent_since
    assert elapsed >= 1.0, f"closed after {elapsed:.2f}s, before the 1 s keep-alive elapsed"
    probe.resume()
    probe.wait_closed()
