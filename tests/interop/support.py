"""Helpers for the interop suite: the emulator process, keys and CSRs, certificate checks, the
official SDK's MQTT clients (awsiotsdk over awscrt) and a hand-driven paho-mqtt client.

The fixtures in conftest.py build on these. Nothing here sleeps for a fixed time: every wait polls
a condition with a deadline and fails with a message that says what did not happen.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import select
import signal
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import cbor2
import paho.mqtt.client as paho
from awscrt import mqtt, mqtt_request_response
from awsiot import iotidentity, mqtt5_client_builder, mqtt_connection_builder
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# How long one network step (connect, SUBACK, a response) may take before the test fails. The
# emulator answers on loopback in milliseconds; the margin covers a loaded 2-core CI machine.
STEP_TIMEOUT = 15.0
# How long the emulator may take to bind its listeners and write emulator.json (first start
# generates a CA, a server and a claim certificate in a debug build).
START_TIMEOUT = 60.0

DEFAULT_TEMPLATE = "FleetTemplate"


def wait_for(what: str, condition: Callable[[], Any], timeout: float = STEP_TIMEOUT,
             interval: float = 0.02) -> Any:
    """Polls `condition` until it returns a truthy value (returned) or fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------------------------
# the emulator process


class EmulatorStartError(RuntimeError):
    """`fleetgw emulate aws` exited or did not write emulator.json in time."""


@dataclass
class Emulator:
    """A running `fleetgw emulate aws` process and what its emulator.json announced."""

    binary: str
    dir: Path
    args: list[str]
    process: subprocess.Popen | None = None
    info: dict = field(default_factory=dict)
    log_path: Path | None = None
    _log_file: Any = None

    # ---- lifecycle

    def start(self) -> "Emulator":
        """Starts the process and waits until it has written DIR/emulator.json."""
        self.dir.mkdir(parents=True, exist_ok=True)
        info_path = self.dir / "emulator.json"
        # A restart in the same DIR must announce its new ports: the old file is stale.
        info_path.unlink(missing_ok=True)
        self.log_path = self.dir.parent / f"{self.dir.name}.stderr.log"
        self._log_file = open(self.log_path, "ab")
        cmd = [self.binary, "emulate", "aws", "--dir", str(self.dir),
               "--mqtt", "127.0.0.1:0", "--api", "127.0.0.1:0", *self.args]
        self._log_file.write(f"$ {' '.join(cmd)}\n".encode())
        self._log_file.flush()
        self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                        stdout=self._log_file, stderr=self._log_file)

        def announced():
            if self.process.poll() is not None:
                raise EmulatorStartError(
                    f"fleetgw emulate aws exited with status {self.process.returncode} before "
                    f"writing {info_path}:\n{self.stderr()}")
            try:
                return json.loads(info_path.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                # not written yet (the emulator writes it atomically, but be safe)
                return None

        try:
            self.info = wait_for(f"{info_path} to be written", announced, timeout=START_TIMEOUT)
        except AssertionError as e:
            raise EmulatorStartError(f"{e}\n{self.stderr()}") from None
        return self

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 10 s."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def stderr(self) -> str:
        """What the process has logged so far (stdout and stderr)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    # ---- what emulator.json says

    @property
    def mqtt_host(self) -> str:
        return self.info["mqtt"].rsplit(":", 1)[0]

    @property
    def mqtt_port(self) -> int:
        return int(self.info["mqtt"].rsplit(":", 1)[1])

    @property
    def api(self) -> str:
        return self.info["api"].rstrip("/")

    @property
    def ca(self) -> str:
        return self.info["ca"]

    @property
    def claim_cert(self) -> str:
        return self.info["claimCert"]

    @property
    def claim_key(self) -> str:
        return self.info["claimKey"]

    # ---- inspection API

    def http(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """One request to the inspection API; returns (status, decoded JSON body or None)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.api + path, data=data, method=method,
                                     headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=STEP_TIMEOUT) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        if not raw:
            return status, None
        try:
            return status, json.loads(raw)
        except json.JSONDecodeError:
            return status, raw.decode(errors="replace")

    def get(self, path: str) -> Any:
        status, body = self.http("GET", path)
        assert status == 200, f"GET {path}: HTTP {status}: {body}"
        return body

    def things(self) -> list[dict]:
        return _listing(self.get("/things"), "things")

    def certificates(self) -> list[dict]:
        return _listing(self.get("/certificates"), "certificates")

    def messages(self) -> list[dict]:
        return _listing(self.get("/messages"), "messages")

    def certificate(self, certificate_id: str) -> dict | None:
        return next((c for c in self.certificates() if c.get("certificateId") == certificate_id),
                    None)

    def thing(self, thing_name: str) -> dict | None:
        return next((t for t in self.things() if t.get("thingName") == thing_name), None)


def _listing(body: Any, what: str) -> list[dict]:
    """The inspection API answers lists as bare JSON arrays."""
    assert isinstance(body, list), f"GET /{what}: expected a JSON array, got {body!r}"
    return body


# --------------------------------------------------------------------------------------------
# keys, CSRs and certificate checks


@dataclass
class DeviceKey:
    """A device's private key and a CSR for it."""

    key: ec.EllipticCurvePrivateKey
    key_pem: str
    csr_pem: str


def new_device_key(common_name: str) -> DeviceKey:
    """An ECDSA P-256 key and a CSR with CN = `common_name`, as a device would make them."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
           .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return DeviceKey(key, key_pem, csr.public_bytes(serialization.Encoding.PEM).decode())


def _spki(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def assert_issued_by_ca(cert_pem: str, ca_path: str) -> x509.Certificate:
    """The leaf in `cert_pem` is signed by the CA in `ca_path`, valid now, and a client cert."""
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    ca = x509.load_pem_x509_certificate(Path(ca_path).read_bytes())
    # Raises if the issuer name does not match or the signature does not verify with the CA key.
    cert.verify_directly_issued_by(ca)
    now = time.time()
    assert cert.not_valid_before_utc.timestamp() <= now + 300, "certificate not yet valid"
    assert now < cert.not_valid_after_utc.timestamp(), "certificate already expired"
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        assert not basic.ca, "a device certificate must not be a CA"
    except x509.ExtensionNotFound:
        pass
    return cert


def assert_cert_has_key(cert_pem: str, public_key) -> None:
    """The certificate carries exactly `public_key` (the CSR's or the returned private key's)."""
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    assert _spki(cert.public_key()) == _spki(public_key), \
        "certificate public key differs from the CSR / private key"


def public_key_of_private_pem(key_pem: str):
    return serialization.load_pem_private_key(key_pem.encode(), password=None).public_key()


def write_pem(directory: Path, name: str, pem: str) -> str:
    path = directory / name
    path.write_text(pem)
    os.chmod(path, 0o600)
    return str(path)


# --------------------------------------------------------------------------------------------
# the official SDK (awsiotsdk): MQTT 3.1.1 connection and MQTT 5 client


def sdk_connection(emu: Emulator, client_id: str, cert_path: str | None = None,
                   key_path: str | None = None, cert_pem: str | None = None,
                   key_pem: str | None = None) -> mqtt.Connection:
    """An SDK MQTT 3.1.1 connection to `localhost` (SNI localhost, strict hostname check)."""
    common = dict(endpoint="localhost", port=emu.mqtt_port, ca_filepath=emu.ca,
                  client_id=client_id, clean_session=False, keep_alive_secs=1200)
    if cert_pem is not None:
        return mqtt_connection_builder.mtls_from_bytes(cert_bytes=cert_pem.encode(),
                                                       pri_key_bytes=key_pem.encode(), **common)
    return mqtt_connection_builder.mtls_from_path(cert_filepath=cert_path or emu.claim_cert,
                                                  pri_key_filepath=key_path or emu.claim_key,
                                                  **common)


class SdkMqtt5:
    """The SDK's MQTT 5 client (mqtt5_client_builder), started and connected."""

    def __init__(self, emu: Emulator, client_id: str, cert_path: str | None = None,
                 key_path: str | None = None):
        self.connected: Future = Future()
        self.stopped = threading.Event()

        def on_success(data):
            if not self.connected.done():
                self.connected.set_result(data)

        def on_failure(data):
            if not self.connected.done():
                self.connected.set_exception(
                    ConnectionError(f"MQTT 5 connect failed: {data.exception}"))

        self.client = mqtt5_client_builder.mtls_from_path(
            endpoint="localhost", port=emu.mqtt_port, ca_filepath=emu.ca,
            cert_filepath=cert_path or emu.claim_cert, pri_key_filepath=key_path or emu.claim_key,
            client_id=client_id,
            on_lifecycle_connection_success=on_success,
            on_lifecycle_connection_failure=on_failure,
            on_lifecycle_stopped=lambda _data: self.stopped.set())
        self.client.start()

    def wait_connected(self, timeout: float = STEP_TIMEOUT) -> None:
        self.connected.result(timeout)

    def close(self) -> None:
        self.client.stop()
        self.stopped.wait(STEP_TIMEOUT)


def identity_v2(protocol_client) -> iotidentity.IotIdentityClientV2:
    """IotIdentityClientV2 (request-response client) on an SDK MQTT 3.1.1 or MQTT 5 client."""
    options = mqtt_request_response.ClientOptions(
        max_request_response_subscriptions=2, max_streaming_subscriptions=2,
        operation_timeout_in_seconds=int(STEP_TIMEOUT))
    return iotidentity.IotIdentityClientV2(protocol_client, options)


def v2_result(future: Future, what: str):
    """The result of an IotIdentityClientV2 operation. The client's own operation timeout
    (STEP_TIMEOUT) fires first; the extra margin only guards against a hung client."""
    try:
        return future.result(STEP_TIMEOUT + 10)
    except TimeoutError:
        raise AssertionError(f"IotIdentityClientV2 {what}: no result within "
                             f"{STEP_TIMEOUT + 10:.0f}s") from None


@dataclass
class Outcome:
    """A response to one fleet-provisioning request: accepted (response) or rejected (error)."""

    accepted: Any = None
    rejected: Any = None

    def ok(self):
        assert self.rejected is None, (
            f"request rejected: {self.rejected.status_code} {self.rejected.error_code}: "
            f"{self.rejected.error_message}")
        assert self.accepted is not None
        return self.accepted

    def error(self):
        assert self.accepted is None, f"request unexpectedly accepted: {self.accepted}"
        assert self.rejected is not None
        return self.rejected


class IdentityV1:
    """The SDK's IotIdentityClient (publish + subscribe API) on an MQTT 3.1.1 connection.

    Subscribes to an API's accepted and rejected topics (waiting for both SUBACKs) before its
    first request, as the SDK samples do, then returns the next response on either topic.
    """

    def __init__(self, connection: mqtt.Connection):
        self.client = iotidentity.IotIdentityClient(connection)
        self.responses: queue.Queue = queue.Queue()
        self.subscribed: set[str] = set()

    def _subscribe(self, api: str, accepted, rejected, request) -> None:
        if api in self.subscribed:
            return
        on_ok = lambda r: self.responses.put(("accepted", r))  # noqa: E731
        on_err = lambda r: self.responses.put(("rejected", r))  # noqa: E731
        for subscribe, cb in ((accepted, on_ok), (rejected, on_err)):
            fut, _topic = subscribe(request=request, qos=mqtt.QoS.AT_LEAST_ONCE, callback=cb)
            granted = fut.result(STEP_TIMEOUT)
            assert granted in (mqtt.QoS.AT_LEAST_ONCE, mqtt.QoS.AT_MOST_ONCE), granted
        self.subscribed.add(api)

    def _next(self, what: str, timeout: float) -> Outcome:
        try:
            kind, response = self.responses.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no response to {what} within {timeout:.0f}s") from None
        return Outcome(accepted=response) if kind == "accepted" else Outcome(rejected=response)

    def create_from_csr(self, csr_pem: str, timeout: float = STEP_TIMEOUT) -> Outcome:
        c = self.client
        self._subscribe("csr", c.subscribe_to_create_certificate_from_csr_accepted,
                        c.subscribe_to_create_certificate_from_csr_rejected,
                        iotidentity.CreateCertificateFromCsrSubscriptionRequest())
        c.publish_create_certificate_from_csr(
            iotidentity.CreateCertificateFromCsrRequest(certificate_signing_request=csr_pem),
            mqtt.QoS.AT_LEAST_ONCE).result(STEP_TIMEOUT)
        return self._next("CreateCertificateFromCsr", timeout)

    def create_keys(self, timeout: float = STEP_TIMEOUT) -> Outcome:
        c = self.client
        self._subscribe("keys", c.subscribe_to_create_keys_and_certificate_accepted,
                        c.subscribe_to_create_keys_and_certificate_rejected,
                        iotidentity.CreateKeysAndCertificateSubscriptionRequest())
        c.publish_create_keys_and_certificate(iotidentity.CreateKeysAndCertificateRequest(),
                                              mqtt.QoS.AT_LEAST_ONCE).result(STEP_TIMEOUT)
        return self._next("CreateKeysAndCertificate", timeout)

    def register_thing(self, token: str, parameters: dict | None,
                       template: str = DEFAULT_TEMPLATE, timeout: float = STEP_TIMEOUT) -> Outcome:
        c = self.client
        self._subscribe(f"register:{template}", c.subscribe_to_register_thing_accepted,
                        c.subscribe_to_register_thing_rejected,
                        iotidentity.RegisterThingSubscriptionRequest(template_name=template))
        c.publish_register_thing(
            iotidentity.RegisterThingRequest(template_name=template,
                                             certificate_ownership_token=token,
                                             parameters=parameters),
            mqtt.QoS.AT_LEAST_ONCE).result(STEP_TIMEOUT)
        return self._next("RegisterThing", timeout)


# --------------------------------------------------------------------------------------------
# a hand-driven MQTT client (paho-mqtt): raw payloads, CBOR, and policy violations


class ConnectRefused(Exception):
    """The server refused or dropped the connection before a successful CONNACK."""


class Probe:
    """A paho-mqtt client run by its own loop thread that never reconnects.

    It connects by IP address (no SNI, the server certificate's IP SAN is checked), records every
    message, SUBACK, PUBACK and the disconnect, so tests can assert exactly what the server did.

    Only the loop thread touches the client once connected: paho writes to the socket from the
    calling thread when it does not run its own loop, and an SSL socket written by two threads
    at once sends corrupt records. Test-thread calls are therefore handed to the loop thread.
    """

    def __init__(self, emu: Emulator, client_id: str, cert_path: str | None = None,
                 key_path: str | None = None, protocol=paho.MQTTv311):
        ctx = ssl.create_default_context(cafile=emu.ca)
        ctx.load_cert_chain(cert_path or emu.claim_cert, key_path or emu.claim_key)
        self.emu = emu
        self.client_id = client_id
        # paho refuses clean_session for MQTT 5 (it has clean_start on connect instead)
        session = {} if protocol == paho.MQTTv5 else {"clean_session": True}
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=protocol, **session)
        self.client.tls_set_context(ctx)
        self.messages: queue.Queue = queue.Queue()
        self.connack: Future = Future()
        self.closed = threading.Event()
        self.disconnect_reason = None
        self.subacks: dict[int, list] = {}
        self.pubacks: set[int] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._commands: queue.Queue = queue.Queue()
        self._silent = threading.Event()

        def on_connect(_c, _u, _flags, reason_code, _props):
            if not self.connack.done():
                self.connack.set_result(reason_code)

        def on_disconnect(_c, _u, _flags, reason_code, _props):
            self.disconnect_reason = reason_code
            self.closed.set()
            if not self.connack.done():
                self.connack.set_exception(
                    ConnectRefused(f"connection closed before CONNACK ({reason_code})"))

        def on_subscribe(_c, _u, mid, reason_codes, _props):
            with self._lock:
                self.subacks[mid] = list(reason_codes)

        def on_publish(_c, _u, mid, _rc, _props):
            with self._lock:
                self.pubacks.add(mid)

        def on_message(_c, _u, msg):
            self.messages.put((msg.topic, bytes(msg.payload), msg.qos))

        self.client.on_connect = on_connect
        self.client.on_disconnect = on_disconnect
        self.client.on_subscribe = on_subscribe
        self.client.on_publish = on_publish
        self.client.on_message = on_message

    def connect(self, timeout: float = STEP_TIMEOUT, keepalive: int = 60) -> "Probe":
        """Connects and waits for a successful CONNACK; raises ConnectRefused otherwise."""
        try:
            self.client.connect(self.emu.mqtt_host, self.emu.mqtt_port, keepalive=keepalive)
        except (OSError, ssl.SSLError) as e:
            raise ConnectRefused(f"TLS/TCP connect failed: {e!r}") from e
        self._thread = threading.Thread(target=self._loop, name=f"paho-{self.client_id}",
                                        daemon=True)
        self._thread.start()
        try:
            code = self.connack.result(timeout)
        except TimeoutError:
            raise ConnectRefused(f"no CONNACK within {timeout:.0f}s") from None
        if code.is_failure:
            raise ConnectRefused(f"CONNACK refused: {code}")
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._run_commands()
            if self._silent.is_set():
                # neither read nor write (no PINGREQ): the server must see an idle client
                self._stop.wait(0.01)
                continue
            try:
                rc = self.client.loop(timeout=0.01)
            except (OSError, ssl.SSLError):
                rc = paho.MQTT_ERR_CONN_LOST
            if rc != paho.MQTT_ERR_SUCCESS:
                self.closed.set()
                if not self.connack.done():
                    self.connack.set_exception(ConnectRefused(f"connection lost before CONNACK "
                                                              f"({paho.error_string(rc)})"))
                break
        self._run_commands()

    def _run_commands(self) -> None:
        while True:
            try:
                done, fn = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                done.set_result(fn())
            except Exception as e:  # noqa: BLE001 - handed back to the calling thread
                done.set_exception(e)

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Runs `fn` on the loop thread (directly once the loop has ended: no socket left)."""
        thread = self._thread
        if thread is None or not thread.is_alive() or threading.current_thread() is thread:
            return fn()
        done: Future = Future()
        self._commands.put((done, fn))
        if not thread.is_alive():  # ended between the check and the put
            self._run_commands()
        return done.result(STEP_TIMEOUT)

    def go_silent(self) -> None:
        """Stops all traffic, PINGREQs included, until resume()."""
        self._silent.set()

    def resume(self) -> None:
        self._silent.clear()

    def server_hung_up(self) -> bool:
        """While silent: whether the server has closed its side (the socket reads EOF or a
        TLS close_notify, so it turns readable although the client sent nothing)."""
        sock = self.client.socket()
        return sock is None or bool(select.select([sock], [], [], 0)[0])

    def subscribe(self, topic: str, qos: int = 1) -> list:
        """Subscribes and waits for the SUBACK; returns its reason codes."""
        rc, mid = self._call(lambda: self.client.subscribe(topic, qos))
        assert rc == paho.MQTT_ERR_SUCCESS, f"subscribe {topic}: {paho.error_string(rc)}"
        return wait_for(f"SUBACK for {topic}", lambda: self._suback(mid))

    def _suback(self, mid: int):
        with self._lock:
            return self.subacks.get(mid)

    def unsubscribe(self, *topics: str) -> None:
        self._call(lambda: self.client.unsubscribe(list(topics)))

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> int:
        """Publishes; returns the message id (see wait_puback)."""
        info = self._call(lambda: self.client.publish(topic, payload, qos=qos))
        return info.mid

    def wait_puback(self, mid: int, timeout: float = STEP_TIMEOUT) -> None:
        def acked():
            with self._lock:
                return mid in self.pubacks
        wait_for(f"PUBACK for message {mid}", acked, timeout)

    def next_message(self, timeout: float = STEP_TIMEOUT) -> tuple[str, bytes, int]:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.client_id}: no message within {timeout:.0f}s") from None

    def pending_messages(self) -> list[tuple[str, bytes, int]]:
        out = []
        while True:
            try:
                out.append(self.messages.get_nowait())
            except queue.Empty:
                return out

    def wait_closed(self, timeout: float = STEP_TIMEOUT) -> None:
        """Waits until the server has closed the connection."""
        assert self.closed.wait(timeout), \
            f"{self.client_id}: the server did not close the connection within {timeout:.0f}s"

    def ping(self, topic: str = "$aws/certificates/create/json/accepted") -> None:
        """Proves the connection is still open and served: a SUBACK round trip on `topic`."""
        assert not self.closed.is_set(), f"{self.client_id}: connection was closed"
        self.subscribe(topic)
        assert not self.closed.is_set(), f"{self.client_id}: connection was closed"

    def close(self) -> None:
        if not self.closed.is_set():
            try:
                self._call(self.client.disconnect)
            except Exception:  # noqa: BLE001 - best effort at teardown
                pass
        self._stop.set()
        if self._thread is not None:
            self._thread.join(STEP_TIMEOUT)
        try:
            self.client.socket() and self.client.socket().close()
        except Exception:  # noqa: BLE001
            pass

    # ---- fleet-provisioning over raw payloads

    def request(self, topic: str, payload: bytes, timeout: float = STEP_TIMEOUT
                ) -> tuple[str, Any]:
        """Publishes a request and returns ("accepted"|"rejected", decoded response).

        The caller has subscribed to `topic/accepted` and `topic/rejected` first.
        """
        self.publish(topic, payload, qos=1)
        got_topic, body, _qos = self.next_message(timeout)
        assert got_topic in (f"{topic}/accepted", f"{topic}/rejected"), \
            f"response to {topic} arrived on {got_topic}"
        decoded = cbor2.loads(body) if topic.endswith("/cbor") else json.loads(body)
        return got_topic.rsplit("/", 1)[1], decoded

    def subscribe_responses(self, topic: str) -> None:
        for suffix in ("accepted", "rejected"):
            codes = self.subscribe(f"{topic}/{suffix}", 1)
            assert not codes[0].is_failure, f"SUBACK for {topic}/{suffix}: {codes}"


def b64(payload_base64: str) -> bytes:
    return base64.b64decode(payload_base64)
