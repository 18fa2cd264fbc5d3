"""The user guide's Python device (docs/src/devices.md, the block marked `python-device`) runs as
printed against a gateway (`fleetgw run`) provisioning with the AWS emulator: in `open` mode with
a generated key, and in `symmetric-key` mode with a SAS token from its device key. It must end with
its certificate (and key) on disk, a thing in the emulator, and its three telemetry messages
delivered there. It runs here because this venv has paho-mqtt 2.x.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from support import assert_issued_by_ca, b64, wait_for

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "src" / "devices.md"
MARKER = "<!-- doc-test: python-device"


def guide_device() -> str:
    """The block after the marker, as a reader copies it."""
    text = GUIDE.read_text()
    start = text.index(MARKER)
    block = text[text.index("```python\n", start) + len("```python\n"):]
    return block[:block.index("\n```")] + "\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gateway(emulator, fleetgw_binary, tmp_path):
    """`fleetgw run` against the emulator on a free port; yields a starter taking --set options."""
    started = []

    def start(*overrides: str) -> int:
        port = free_port()
        cmd = [fleetgw_binary, "run", "--config", str(emulator.dir / "gateway.toml"),
               "--set", f"downstream.listen=127.0.0.1:{port}"]
        for o in overrides:
            cmd += ["--set", o]
        log = open(tmp_path / "gateway.log", "ab")
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        started.append(proc)

        def listening():
            assert proc.poll() is None, (tmp_path / "gateway.log").read_text()
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0
        wait_for("the gateway's broker to listen", listening, timeout=60)
        return port

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(timeout=30)


def run_device(tmp_path: Path, port: int, device_id: str, device_key: str | None = None):
    script = tmp_path / "device.py"
    script.write_text(guide_device())
    env = dict(os.environ, FLEETGW_HOST="127.0.0.1", FLEETGW_PORT=str(port), DEVICE_ID=device_id)
    if device_key:
        env["DEVICE_KEY"] = device_key
    return subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=90)


def assert_delivered(emulator, tmp_path: Path, device_id: str, out) -> None:
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"provisioned as thing {device_id}" in out.stdout, out.stdout
    assert "sent 3 messages" in out.stdout, out.stdout
    cert = (tmp_path / f"{device_id}.crt").read_text()
    assert_issued_by_ca(cert, emulator.ca)
    assert oct((tmp_path / f"{device_id}.key").stat().st_mode & 0o777) == "0o600"
    assert emulator.thing(device_id) is not None

    def messages():
        got = [json.loads(b64(m["payloadBase64"])) for m in emulator.messages()
               if m.get("topic") == f"dt/{device_id}/telemetry"]
        return got if len(got) >= 3 else None
    got = wait_for("the device's telemetry in the emulator", messages)
    assert sorted(m["seq"] for m in got) == [0, 1, 2], got


def test_the_guide_device_provisions_in_open_mode(emulator, gateway, tmp_path):
    port = gateway("admission.mode=open")
    out = run_device(tmp_path, port, "py-dev-1")
    assert_delivered(emulator, tmp_path, "py-dev-1", out)


def test_the_guide_device_provisions_with_a_sas_token(emulator, gateway, tmp_path):
    group_key = base64.b64encode(os.urandom(32)).decode()
    port = gateway("admission.mode=symmetric-key", f"admission.group_key={group_key}")
    device_id = "py-dev-2"
    device_key = base64.b64encode(
        hmac.new(base64.b64decode(group_key), device_id.encode(), hashlib.sha256).digest()).decode()
    out = run_device(tmp_path, port, device_id, device_key)
    assert_delivered(emulator, tmp_path, device_id, out)

    # and a wrong key is refused with the documented code, nothing provisioned
    wrong = base64.b64encode(os.urandom(32)).decode()
    refused = run_device(tmp_path, port, "py-dev-3", wrong)
    assert refused.returncode != 0
    assert "InvalidSignature" in refused.stdout + refused.stderr, refused.stdout + refused.stderr
    assert emulator.thing("py-dev-3") is None
