#!/usr/bin/env python3
"""Baseline of `fleetgw bench provision`: the per-device fleet provisioning flow users script
today with the official AWS IoT Device SDK for Python (awsiotsdk), against the same emulator.

For every device: one claim connection (mutual TLS with the claim certificate, client id unique
per device), subscribe to the accepted/rejected topics of CreateCertificateFromCsr and
RegisterThing, publish CreateCertificateFromCsr with a fresh P-256 CSR, then RegisterThing with
the ownership token, then disconnect. `--workers 1` runs the devices one after another (a
provisioning script), `--workers W` runs W of them at once from a thread pool.

Runs from the pinned interop venv (tests/interop/requirements.txt, target/interop-venv; see
scripts/interop). Prints one JSON object on stdout:
{"devices","provisioned","failed","workers","seconds","devicesPerSecond","firstError"}.
"""
from __future__ import annotations

import argparse
import json
import queue
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from awscrt import mqtt
from awsiot import iotidentity, mqtt_connection_builder
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

STEP_TIMEOUT = 30.0


def csr_pem(name: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def next_response(responses: queue.Queue, what: str):
    try:
        kind, response = responses.get(timeout=STEP_TIMEOUT)
    except queue.Empty:
        raise RuntimeError(f"no response to {what} within {STEP_TIMEOUT:.0f}s") from None
    if kind != "accepted":
        raise RuntimeError(f"{what} rejected: {response}")
    return response


def provision_one(args: argparse.Namespace, n: int) -> None:
    client_id = f"sdk-{args.run}-{n}"
    conn = mqtt_connection_builder.mtls_from_path(
        endpoint="localhost", port=args.port, ca_filepath=args.ca, client_id=client_id,
        cert_filepath=args.claim_cert, pri_key_filepath=args.claim_key, clean_session=True,
        keep_alive_secs=60)
    conn.connect().result(STEP_TIMEOUT)
    try:
        client = iotidentity.IotIdentityClient(conn)
        responses: queue.Queue = queue.Queue()
        ok = lambda r: responses.put(("accepted", r))  # noqa: E731
        err = lambda r: responses.put(("rejected", r))  # noqa: E731
        csr_req = iotidentity.CreateCertificateFromCsrSubscriptionRequest()
        reg_req = iotidentity.RegisterThingSubscriptionRequest(template_name=args.template)
        for subscribe, request, cb in (
                (client.subscribe_to_create_certificate_from_csr_accepted, csr_req, ok),
                (client.subscribe_to_create_certificate_from_csr_rejected, csr_req, err),
                (client.subscribe_to_register_thing_accepted, reg_req, ok),
                (client.subscribe_to_register_thing_rejected, reg_req, err)):
            fut, _ = subscribe(request=request, qos=mqtt.QoS.AT_LEAST_ONCE, callback=cb)
            fut.result(STEP_TIMEOUT)
        client.publish_create_certificate_from_csr(
            iotidentity.CreateCertificateFromCsrRequest(
                certificate_signing_request=csr_pem(client_id)),
            mqtt.QoS.AT_LEAST_ONCE).result(STEP_TIMEOUT)
        issued = next_response(responses, "CreateCertificateFromCsr")
        client.publish_register_thing(
            iotidentity.RegisterThingRequest(
                template_name=args.template,
                certificate_ownership_token=issued.certificate_ownership_token,
                parameters={"SerialNumber": client_id}),
            mqtt.QoS.AT_LEAST_ONCE).result(STEP_TIMEOUT)
        next_response(responses, "RegisterThing")
    finally:
        conn.disconnect().result(STEP_TIMEOUT)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True, help="the emulator's MQTT port")
    p.add_argument("--ca", required=True)
    p.add_argument("--claim-cert", required=True)
    p.add_argument("--claim-key", required=True)
    p.add_argument("--template", default="FleetTemplate")
    p.add_argument("--devices", type=int, required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--run", default=uuid.uuid4().hex[:8], help="label in the client ids")
    args = p.parse_args()
    if args.devices < 1 or args.workers < 1:
        p.error("--devices and --workers must be at least 1")

    failed = 0
    first_error = None
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        futures = [pool.submit(provision_one, args, n) for n in range(1, args.devices + 1)]
        for f in futures:
            try:
                f.result()
            except Exception as e:  # a failed device is counted, the run goes on
                failed += 1
                first_error = first_error or f"{type(e).__name__}: {e}"
    seconds = time.monotonic() - start
    provisioned = args.devices - failed
    json.dump({"devices": args.devices, "provisioned": provisioned, "failed": failed,
               "workers": args.workers, "seconds": seconds,
               "devicesPerSecond": provisioned / seconds if seconds > 0 else 0.0,
               "firstError": first_error}, sys.stdout)
    print()
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
