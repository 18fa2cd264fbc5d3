"""The official AWS IoT Device SDK (awsiotsdk) provisions devices against the emulator over JSON:
IotIdentityClient on the SDK's MQTT 3.1.1 connection, and IotIdentityClientV2 (the
request-response client that subscribes, waits for SUBACKs and unsubscribes per API) on both the
MQTT 5 client of the SDK's current fleet-provisioning sample and the MQTT 3.1.1 connection.
"""

from __future__ import annotations

import uuid

import pytest
from awscrt import mqtt
from awsiot import V2ServiceException, iotidentity

from support import (DEFAULT_TEMPLATE, STEP_TIMEOUT, IdentityV1, assert_cert_has_key,
                     assert_issued_by_ca, identity_v2, new_device_key, public_key_of_private_pem,
                     v2_result)


def serial() -> str:
    return "SN-" + uuid.uuid4().hex[:12].upper()


def assert_registered(emulator, response, serial_number: str, certificate_id: str) -> None:
    """RegisterThing named a thing after the serial, returned a deviceConfiguration object, and
    the emulator now shows the thing and the certificate ACTIVE."""
    thing_name = response.thing_name
    assert thing_name, "RegisterThing returned no thingName"
    assert serial_number in thing_name, \
        f"thingName {thing_name!r} is not derived from SerialNumber {serial_number!r}"
    assert isinstance(response.device_configuration, dict), response.device_configuration
    assert response.device_configuration, "FleetTemplate's deviceConfiguration is empty"
    assert emulator.thing(thing_name) is not None, \
        f"GET /things does not list {thing_name}: {emulator.things()}"
    cert = emulator.certificate(certificate_id)
    assert cert is not None, f"GET /certificates does not list {certificate_id}"
    assert cert["status"] == "ACTIVE", cert


def test_v1_create_certificate_from_csr_then_register_thing(emulator, clients):
    conn = clients.sdk(emulator, "claim-" + uuid.uuid4().hex[:8])
    identity = IdentityV1(conn)
    device = new_device_key("device-csr")

    issued = identity.create_from_csr(device.csr_pem).ok()
    assert issued.certificate_id and issued.certificate_ownership_token
    assert_issued_by_ca(issued.certificate_pem, emulator.ca)
    assert_cert_has_key(issued.certificate_pem, device.key.public_key())
    pending = emulator.certificate(issued.certificate_id)
    assert pending is not None and pending["status"] == "PENDING_ACTIVATION", pending

    sn = serial()
    registered = identity.register_thing(issued.certificate_ownership_token,
                                         {"SerialNumber": sn}).ok()
    assert_registered(emulator, registered, sn, issued.certificate_id)

    # Same token again: the same answer and no second thing (a retry after a lost response).
    again = identity.register_thing(issued.certificate_ownership_token,
                                    {"SerialNumber": sn}).ok()
    assert again.thing_name == registered.thing_name
    assert again.device_configuration == registered.device_configuration
    assert [t["thingName"] for t in emulator.things()].count(registered.thing_name) == 1


def test_v1_create_keys_and_certificate_then_register_thing(emulator, clients):
    conn = clients.sdk(emulator, "claim-" + uuid.uuid4().hex[:8])
    identity = IdentityV1(conn)

    issued = identity.create_keys().ok()
    assert issued.private_key and issued.certificate_id and issued.certificate_ownership_token
    assert_issued_by_ca(issued.certificate_pem, emulator.ca)
    assert_cert_has_key(issued.certificate_pem, public_key_of_private_pem(issued.private_key))

    sn = serial()
    registered = identity.register_thing(issued.certificate_ownership_token,
                                         {"SerialNumber": sn}).ok()
    assert_registered(emulator, registered, sn, issued.certificate_id)

    # The device uses the returned key and certificate as they came (from memory, not files).
    device = clients.sdk(emulator, registered.thing_name, cert_pem=issued.certificate_pem,
                         key_pem=issued.private_key)
    topic = f"dt/{registered.thing_name}/telemetry"
    done, _packet_id = device.publish(topic, b'{"boot":1}', mqtt.QoS.AT_LEAST_ONCE)
    done.result(STEP_TIMEOUT)
    assert [(m["topic"], m["qos"]) for m in emulator.messages()
            if m["clientId"] == registered.thing_name] == [(topic, 1)]


def test_v1_token_redeemed_on_another_connection(emulator, clients):
    """One claim certificate, two connections (different client ids) at once; the token from one
    is redeemed on the other, as a fleet of workers behind one claim does."""
    first = IdentityV1(clients.sdk(emulator, "claim-a-" + uuid.uuid4().hex[:6]))
    second = IdentityV1(clients.sdk(emulator, "claim-b-" + uuid.uuid4().hex[:6]))
    device = new_device_key("device-two-conns")

    issued = first.create_from_csr(device.csr_pem).ok()
    sn = serial()
    registered = second.register_thing(issued.certificate_ownership_token,
                                       {"SerialNumber": sn}).ok()
    assert_registered(emulator, registered, sn, issued.certificate_id)


def _v2_flow(emulator, protocol_client) -> None:
    identity = identity_v2(protocol_client)
    device = new_device_key("device-v2")

    issued = v2_result(identity.create_certificate_from_csr(
        iotidentity.CreateCertificateFromCsrRequest(certificate_signing_request=device.csr_pem)),
        "CreateCertificateFromCsr")
    assert_issued_by_ca(issued.certificate_pem, emulator.ca)
    assert_cert_has_key(issued.certificate_pem, device.key.public_key())

    keys = v2_result(identity.create_keys_and_certificate(
        iotidentity.CreateKeysAndCertificateRequest()), "CreateKeysAndCertificate")
    assert_issued_by_ca(keys.certificate_pem, emulator.ca)
    assert_cert_has_key(keys.certificate_pem, public_key_of_private_pem(keys.private_key))

    for cert in (issued, keys):
        sn = serial()
        registered = v2_result(identity.register_thing(iotidentity.RegisterThingRequest(
            template_name=DEFAULT_TEMPLATE,
            certificate_ownership_token=cert.certificate_ownership_token,
            parameters={"SerialNumber": sn})), "RegisterThing")
        assert_registered(emulator, registered, sn, cert.certificate_id)


def test_v2_over_mqtt5(emulator, clients):
    """The SDK's current sample: mqtt5_client_builder + IotIdentityClientV2."""
    client = clients.sdk5(emulator, "claim-v2-5-" + uuid.uuid4().hex[:6])
    client.wait_connected()
    _v2_flow(emulator, client.client)


def test_v2_over_mqtt311(emulator, clients):
    conn = clients.sdk(emulator, "claim-v2-3-" + uuid.uuid4().hex[:6])
    _v2_flow(emulator, conn)


def test_v2_rejection_is_a_modeled_error(emulator, clients):
    """A rejected request surfaces as V2ServiceException carrying the /rejected document."""
    client = clients.sdk5(emulator, "claim-v2-err-" + uuid.uuid4().hex[:6])
    client.wait_connected()
    identity = identity_v2(client.client)
    with pytest.raises(V2ServiceException) as err:
        v2_result(identity.register_thing(iotidentity.RegisterThingRequest(
            template_name=DEFAULT_TEMPLATE, certificate_ownership_token="not-a-token",
            parameters={"SerialNumber": serial()})), "RegisterThing")
    modeled = err.value.modeled_error
    assert modeled is not None, err.value
    assert (modeled.status_code, modeled.error_code) == (400, "InvalidCertificateOwnershipToken"), \
        (modeled.status_code, modeled.error_code, modeled.error_message)
    assert modeled.error_message
