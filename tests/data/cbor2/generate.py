#!/usr/bin/env python3
"""CBOR test vectors for fleetgw's codec, written by another implementation (Python cbor2).

tests/codec_vectors.rs decodes every *.cbor file here and checks the field values, so these
bytes pin our decoder to what a third-party encoder produces, including indefinite-length
items that ciborium never writes itself.

Regenerate (from the repository root; the .cbor files are committed, rerun only on change):
    python3 -m venv target/vecvenv && target/vecvenv/bin/pip install cbor2
    target/vecvenv/bin/python tests/data/cbor2/generate.py
"""

import datetime
import os

import cbor2

HERE = os.path.dirname(os.path.abspath(__file__))

CSR = (
    "-----BEGIN CERTIFICATE REQUEST-----\n"
    "MIHnMIGOAgEAMBMxETAPBgNVBAMMCHNlbnNvci0xMFkwEwYHKoZIzj0CAQYIKoZI\n"
    "-----END CERTIFICATE REQUEST-----\n"
)
CERT = (
    "-----BEGIN CERTIFICATE-----\n"
    "MIIBeTCCAR+gAwIBAgIUc2Vuc29yLTEgY2VydGlmaWNhdGUwCgYIKoZIzj0EAwIw\n"
    "-----END CERTIFICATE-----\n"
)
KEY = (
    "-----BEGIN PRIVATE KEY-----\n"
    "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n"
    "-----END PRIVATE KEY-----\n"
)
TOKEN = "eyJ2ZXJzaW9uIjoiMjAxOS0xMS0yMCJ9.ownership-token"
CERT_ID = "8f3b2a7c0d1e4f5a6b7c8d9e0f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c"


def write(name, data):
    with open(os.path.join(HERE, name), "wb") as f:
        f.write(data)


def indefinite_text(*chunks):
    """An indefinite-length text string: 0x7f, definite-length chunks, break."""
    return b"\x7f" + b"".join(cbor2.dumps(c) for c in chunks) + b"\xff"


def indefinite_map(*pairs):
    """An indefinite-length map: 0xbf, already-encoded key/value items, break."""
    return b"\xbf" + b"".join(k + v for k, v in pairs) + b"\xff"


def main():
    write("create_from_csr_request.cbor", cbor2.dumps({"certificateSigningRequest": CSR}))
    write(
        "create_from_csr_response.cbor",
        cbor2.dumps(
            {
                "certificateOwnershipToken": TOKEN,
                "certificateId": CERT_ID,
                "certificatePem": CERT,
            }
        ),
    )
    write("create_keys_request.cbor", cbor2.dumps({}))
    write(
        "create_keys_response.cbor",
        cbor2.dumps(
            {
                "certificateId": CERT_ID,
                "certificatePem": CERT,
                "privateKey": KEY,
                "certificateOwnershipToken": TOKEN,
            }
        ),
    )
    write(
        "register_thing_request.cbor",
        cbor2.dumps(
            {
                "certificateOwnershipToken": TOKEN,
                "parameters": {"SerialNumber": "sensor-1", "DeviceLocation": "Kyōto"},
            }
        ),
    )
    write(
        "register_thing_response.cbor",
        cbor2.dumps(
            {"deviceConfiguration": {"Fallback": "true", "Region": "eu"}, "thingName": "sensor-1"}
        ),
    )
    write(
        "error_response.cbor",
        cbor2.dumps(
            {"statusCode": 400, "errorCode": "InvalidPayload", "errorMessage": "bad CSR"}
        ),
    )

    # Streaming encoders write maps and long strings as indefinite-length items; the CSR is
    # split into chunks, and one key is chunked too.
    half = len(CSR) // 2
    indefinite = indefinite_map(
        (cbor2.dumps("certificateSigningRequest"), indefinite_text(CSR[:half], CSR[half:], "")),
        (indefinite_text("client", "Version"), cbor2.dumps("1.2")),
    )
    assert cbor2.loads(indefinite) == {"certificateSigningRequest": CSR, "clientVersion": "1.2"}
    write("create_from_csr_request_indefinite.cbor", indefinite)

    nested = indefinite_map(
        (cbor2.dumps("certificateOwnershipToken"), indefinite_text(TOKEN[:10], TOKEN[10:])),
        (
            cbor2.dumps("parameters"),
            indefinite_map((cbor2.dumps("SerialNumber"), indefinite_text("sensor", "-1"))),
        ),
    )
    assert cbor2.loads(nested) == {
        "certificateOwnershipToken": TOKEN,
        "parameters": {"SerialNumber": "sensor-1"},
    }
    write("register_thing_request_indefinite.cbor", nested)

    # Fields a newer AWS (or another client) may add: every CBOR major type, a tag, nesting.
    write(
        "register_thing_response_unknown_fields.cbor",
        cbor2.dumps(
            {
                "schemaVersion": 3,
                "thingName": "sensor-1",
                "issuedAt": datetime.datetime(2026, 11, 23, 9, 0, tzinfo=datetime.timezone.utc),
                "deviceConfiguration": {"Fallback": "true"},
                "limits": {"tps": 50, "ratio": 0.5, "negative": -7, "big": 2**40},
                "flags": [True, False, None],
                "blob": b"\x00\x01\xfe\xff",
                "note": "x" * 300,
            }
        ),
    )


if __name__ == "__main__":
    main()
