"""Rejections on `/rejected` as `{"statusCode","errorCode","errorMessage"}`: bad and expired
ownership tokens, bad CSRs and payloads, unknown templates, missing parameters, pre-provisioning
denials and throttling. Every rejection must leave the connection open and serving, as AWS does.
"""

from __future__ import annotations

import base64
import json
import uuid

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from support import ConnectRefused, IdentityV1, new_device_key, wait_for, write_pem

CSR_JSON = "$aws/certificates/create-from-csr/json"
CSR_CBOR = "$aws/certificates/create-from-csr/cbor"
KEYS_JSON = "$aws/certificates/create/json"


def register_topic(template: str, fmt: str = "json") -> str:
    return f"$aws/provisioning-templates/{template}/provision/{fmt}"


def assert_error(error, status: int, code: str) -> None:
    """A modeled ErrorResponse (SDK) or a decoded /rejected document."""
    if isinstance(error, dict):
        assert set(error) >= {"statusCode", "errorCode", "errorMessage"}, error
        got = (error["statusCode"], error["errorCode"], error["errorMessage"])
    else:
        got = (error.status_code, error.error_code, error.error_message)
    assert got[:2] == (status, code), f"expected {status} {code}, got {got}"
    assert isinstance(got[2], str) and got[2], f"errorMessage is empty: {got}"


def serial() -> str:
    return "SN-" + uuid.uuid4().hex[:12].upper()


@pytest.fixture
def identity(emulator, clients) -> IdentityV1:
    return IdentityV1(clients.sdk(emulator, "claim-err-" + uuid.uuid4().hex[:8]))


def test_invalid_token(emulator, identity):
    assert_error(identity.register_thing("not-a-token", {"SerialNumber": serial()}).error(),
                 400, "InvalidCertificateOwnershipToken")
    assert_error(identity.register_thing("", {"SerialNumber": serial()}).error(),
                 400, "InvalidCertificateOwnershipToken")
    # A token that looks right but was altered.
    issued = identity.create_from_csr(new_device_key("tampered").csr_pem).ok()
    token = issued.certificate_ownership_token
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    assert_error(identity.register_thing(forged, {"SerialNumber": serial()}).error(),
                 400, "InvalidCertificateOwnershipToken")
    # ... and the genuine one still works on the same connection afterwards.
    assert identity.register_thing(token, {"SerialNumber": serial()}).ok().thing_name


@pytest.mark.emulator_args("--token-ttl", "1")
def test_expired_token_and_unactivated_certificate_deleted(emulator, identity):
    issued = identity.create_from_csr(new_device_key("expiring").csr_pem).ok()
    assert emulator.certificate(issued.certificate_id) is not None
    # The certificate is deleted when its token expires (never activated).
    wait_for(f"certificate {issued.certificate_id} to be deleted after its token expired",
             lambda: emulator.certificate(issued.certificate_id) is None, timeout=30)
    assert_error(identity.register_thing(issued.certificate_ownership_token,
                                         {"SerialNumber": serial()}).error(),
                 400, "InvalidCertificateOwnershipToken")
    assert not any(t.get("thingName", "").startswith("SN-") for t in emulator.things())


def test_bad_csr(emulator, identity, clients):
    assert_error(identity.create_from_csr("not a CSR").error(), 400, "InvalidCsr")
    # A well-formed CSR whose signature does not verify (one byte of the signature flipped).
    good = new_device_key("bad-signature").csr_pem
    der = bytearray(x509.load_pem_x509_csr(good.encode()).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01
    b64 = base64.encodebytes(bytes(der)).decode()
    bad = f"-----BEGIN CERTIFICATE REQUEST-----\n{b64}-----END CERTIFICATE REQUEST-----\n"
    assert_error(identity.create_from_csr(bad).error(), 400, "InvalidCsr")
    # The connection is still served.
    assert identity.create_from_csr(good).ok().certificate_pem


def test_malformed_payloads(emulator, clients):
    probe = clients.probe(emulator, "claim-malformed-" + uuid.uuid4().hex[:6])
    probe.subscribe_responses(CSR_JSON)
    probe.subscribe_responses(CSR_CBOR)
    for topic, payload in [
        (CSR_JSON, b"{not json"),
        (CSR_JSON, b""),
        (CSR_JSON, json.dumps({"certificateSigningRequest": 42}).encode()),
        (CSR_CBOR, b"\xff\x00garbage"),
        (CSR_CBOR, cbor2.dumps({"certificateSigningRequest": 42})),
        (CSR_CBOR, b"\xbf\x78"),  # indefinite map cut short
    ]:
        kind, body = probe.request(topic, payload)
        assert kind == "rejected", (topic, payload, body)
        assert (body.get("statusCode"), body.get("errorCode")) == (400, "InvalidPayload"), \
            (topic, payload, body)
        assert_error(body, 400, "InvalidPayload")
    # JSON rejections are JSON and CBOR rejections CBOR (probe.request decodes per topic); the
    # connection survived all of that:
    kind, body = probe.request(CSR_JSON, json.dumps(
        {"certificateSigningRequest": new_device_key("after-garbage").csr_pem}).encode())
    assert kind == "accepted", body


@pytest.mark.parametrize("topic,payload", [
    pytest.param(CSR_JSON, json.dumps(["certificateSigningRequest"]).encode(), id="json-array"),
    pytest.param(CSR_CBOR, cbor2.dumps(["certificateSigningRequest"]), id="cbor-array"),
])
def test_payload_that_is_not_a_map(emulator, clients, topic, payload):
    probe = clients.probe(emulator, "claim-array-" + uuid.uuid4().hex[:6])
    probe.subscribe_responses(topic)
    kind, body = probe.request(topic, payload)
    assert kind == "rejected", body
    assert_error(body, 400, "InvalidPayload")


def test_unknown_template(emulator, identity):
    issued = identity.create_from_csr(new_device_key("unknown-template").csr_pem).ok()
    assert_error(identity.register_thing(issued.certificate_ownership_token,
                                         {"SerialNumber": serial()},
                                         template="NoSuchTemplate").error(),
                 404, "ResourceNotFound")


def test_missing_parameter(emulator, identity):
    issued = identity.create_from_csr(new_device_key("missing-param").csr_pem).ok()
    token = issued.certificate_ownership_token
    assert_error(identity.register_thing(token, {}).error(), 400, "InvalidParameters")
    assert_error(identity.register_thing(token, None).error(), 400, "InvalidParameters")
    assert_error(identity.register_thing(token, {"serialnumber": serial()}).error(),
                 400, "InvalidParameters")
    # The token was not spent by the failed attempts.
    registered = identity.register_thing(token, {"SerialNumber": serial()}).ok()
    assert emulator.thing(registered.thing_name) is not None


def test_denied_serial_builtin_template(emulator, identity):
    """The built-in FleetTemplate's pre-provisioning hook refuses serials starting `denied-`."""
    issued = identity.create_from_csr(new_device_key("denied").csr_pem).ok()
    error = identity.register_thing(issued.certificate_ownership_token,
                                    {"SerialNumber": "denied-0001"}).error()
    assert_error(error, 403, "AccessDenied")
    assert emulator.thing("denied-0001") is None
    cert = emulator.certificate(issued.certificate_id)
    assert cert is None or cert["status"] == "PENDING_ACTIVATION", cert


PLANT_TEMPLATES = {
    "templates": [{
        "templateName": "PlantTemplate",
        "templateBody": {
            "Parameters": {
                "SerialNumber": {"Type": "String"},
                "Site": {"Type": "String", "Default": "berlin"},
            },
            "Resources": {
                "thing": {
                    "Type": "AWS::IoT::Thing",
                    "Properties": {
                        "ThingName": {"Fn::Join": ["-", ["plant", {"Ref": "Site"},
                                                         {"Ref": "SerialNumber"}]]},
                        "AttributePayload": {"site": {"Ref": "Site"}},
                    },
                },
                "certificate": {
                    "Type": "AWS::IoT::Certificate",
                    "Properties": {"CertificateId": {"Ref": "AWS::IoT::Certificate::Id"},
                                   "Status": "Active"},
                },
                "policy": {"Type": "AWS::IoT::Policy",
                           "Properties": {"PolicyName": "PlantDevicePolicy"}},
            },
            "DeviceConfiguration": {
                "site": {"Ref": "Site"},
                "uplink": {"Fn::Join": ["/", ["plant", {"Ref": "SerialNumber"}]]},
            },
        },
        "preProvisioningHook": {"deny": {"SerialNumber": ["SN-STOLEN-0001", "blocked-*"]}},
    }, {
        # templateBody as the AWS CLI passes it: a string holding the JSON
        "templateName": "QuarantineTemplate",
        "templateBody": json.dumps({
            "Parameters": {"SerialNumber": {"Type": "String"}},
            "Resources": {
                "thing": {"Type": "AWS::IoT::Thing",
                          "Properties": {"ThingName": {"Ref": "SerialNumber"}}},
                "certificate": {"Type": "AWS::IoT::Certificate",
                                "Properties": {"CertificateId":
                                               {"Ref": "AWS::IoT::Certificate::Id"},
                                               "Status": "Inactive"}},
            },
        }),
    }],
}


@pytest.fixture
def plant_emulator(start_emulator, tmp_path):
    path = tmp_path / "templates.json"
    path.write_text(json.dumps(PLANT_TEMPLATES))
    return start_emulator("--templates", str(path))


def test_templates_file_and_denied_serial(plant_emulator, clients):
    emu = plant_emulator
    assert "PlantTemplate" in emu.info["templates"], emu.info
    identity = IdentityV1(clients.sdk(emu, "claim-plant-" + uuid.uuid4().hex[:6]))

    for denied in ("SN-STOLEN-0001", "blocked-42"):
        issued = identity.create_from_csr(new_device_key(denied).csr_pem).ok()
        error = identity.register_thing(issued.certificate_ownership_token,
                                        {"SerialNumber": denied},
                                        template="PlantTemplate").error()
        assert_error(error, 403, "AccessDenied")
    assert emu.things() == []

    issued = identity.create_from_csr(new_device_key("plant-ok").csr_pem).ok()
    sn = serial()
    registered = identity.register_thing(issued.certificate_ownership_token,
                                         {"SerialNumber": sn, "Site": "lyon"},
                                         template="PlantTemplate").ok()
    assert registered.thing_name == f"plant-lyon-{sn}"
    assert registered.device_configuration == {"site": "lyon", "uplink": f"plant/{sn}"}
    thing = emu.thing(registered.thing_name)
    assert thing is not None
    assert thing.get("attributes", {}).get("site", "lyon") == "lyon", thing

    # the Default of an omitted parameter applies
    issued = identity.create_from_csr(new_device_key("plant-default").csr_pem).ok()
    sn = serial()
    registered = identity.register_thing(issued.certificate_ownership_token,
                                         {"SerialNumber": sn}, template="PlantTemplate").ok()
    assert registered.thing_name == f"plant-berlin-{sn}"


@pytest.mark.emulator_args("--tps", "1")
def test_throttled(emulator, clients):
    """With --tps 1 a burst of CreateKeysAndCertificate requests gets some 429 Throttling
    answers; every request gets exactly one answer and the connection stays open."""
    probe = clients.probe(emulator, "claim-tps-" + uuid.uuid4().hex[:6])
    probe.subscribe_responses(KEYS_JSON)
    burst = 6
    for _ in range(burst):
        probe.publish(KEYS_JSON, b"{}", qos=1)
    answers = [probe.next_message() for _ in range(burst)]
    kinds = [topic.rsplit("/", 1)[1] for topic, _body, _qos in answers]
    assert "accepted" in kinds, kinds
    assert "rejected" in kinds, kinds
    for topic, body, _qos in answers:
        if topic.endswith("/rejected"):
            assert_error(json.loads(body), 429, "Throttling")
    # The bucket refills: a later request is served on the same connection.
    def served():
        kind, _ = probe.request(KEYS_JSON, b"{}")
        return kind == "accepted"
    wait_for("a request to be accepted after the burst", served, timeout=20, interval=0.5)


def test_template_with_inactive_certificate(plant_emulator, clients, tmp_path):
    """Status Inactive: RegisterThing succeeds and creates the thing, but the certificate stays
    unusable (INACTIVE) and the device is refused."""
    emu = plant_emulator
    identity = IdentityV1(clients.sdk(emu, "claim-quarantine-" + uuid.uuid4().hex[:6]))
    device = new_device_key("quarantine")
    issued = identity.create_from_csr(device.csr_pem).ok()
    sn = serial()
    registered = identity.register_thing(issued.certificate_ownership_token,
                                         {"SerialNumber": sn},
                                         template="QuarantineTemplate").ok()
    assert registered.thing_name == sn
    assert emu.thing(sn) is not None
    cert = emu.certificate(issued.certificate_id)
    assert cert is not None and cert["status"] == "INACTIVE", cert
    cert_path = write_pem(tmp_path, "q.crt", issued.certificate_pem)
    key_path = write_pem(tmp_path, "q.key", device.key_pem)
    with pytest.raises(ConnectRefused):
        clients.probe(emu, sn, cert_path=cert_path, key_path=key_path)
