"""Fixtures for the interop suite: a `fleetgw emulate aws` process per test (its binary comes from
$FLEETGW_BINARY, set by scripts/interop), and MQTT clients that are closed at teardown.

A test passes extra emulator options with `@pytest.mark.emulator_args("--tps", "1")`, or starts
more emulators (or restarts one in the same directory) through the `start_emulator` factory.
When a test fails, the output of every emulator it started is attached to the failure report.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from support import Emulator, Probe, SdkMqtt5, sdk_connection, STEP_TIMEOUT


def pytest_configure(config):
    binary = os.environ.get("FLEETGW_BINARY")
    if not binary:
        raise pytest.UsageError("FLEETGW_BINARY is not set: run the suite with "
                                "`scripts/interop target/debug/fleetgw`")
    if not os.access(binary, os.X_OK):
        raise pytest.UsageError(f"FLEETGW_BINARY={binary}: not an executable file")


@pytest.fixture(scope="session")
def fleetgw_binary() -> str:
    return os.path.abspath(os.environ["FLEETGW_BINARY"])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        for emu in getattr(item, "_fleetgw_emulators", []):
            report.sections.append((f"fleetgw emulate aws --dir {emu.dir}", emu.stderr()))
    return report


@pytest.fixture
def start_emulator(request, tmp_path, fleetgw_binary):
    """Factory: start_emulator(*args, dir=None) -> a started Emulator; all stopped at teardown."""
    started: list[Emulator] = []
    request.node._fleetgw_emulators = started

    def start(*args: str, dir: Path | None = None) -> Emulator:
        emu = Emulator(binary=fleetgw_binary, dir=dir or tmp_path / f"aws{len(started)}",
                       args=list(args))
        started.append(emu)
        return emu.start()

    yield start
    for emu in started:
        emu.stop()


@pytest.fixture
def emulator(request, start_emulator) -> Emulator:
    """One emulator with ports picked by the OS and the options of @emulator_args, if any."""
    marker = request.node.get_closest_marker("emulator_args")
    args = [str(a) for a in marker.args] if marker else []
    return start_emulator(*args)


@pytest.fixture
def clients():
    """Tracks the MQTT clients a test opens and closes them at teardown, in reverse order."""
    opened = _Clients()
    yield opened
    opened.close_all()


class _Clients:
    def __init__(self):
        self._closers = []

    def sdk(self, emu: Emulator, client_id: str, connect: bool = True, **creds):
        """The SDK's MQTT 3.1.1 connection (mqtt_connection_builder), connected."""
        conn = sdk_connection(emu, client_id, **creds)
        if connect:
            conn.connect().result(STEP_TIMEOUT)
            self._closers.append(lambda: conn.disconnect().result(STEP_TIMEOUT))
        return conn

    def sdk5(self, emu: Emulator, client_id: str, **creds) -> SdkMqtt5:
        """The SDK's MQTT 5 client (mqtt5_client_builder), started; wait_connected() to use."""
        client = SdkMqtt5(emu, client_id, **creds)
        self._closers.append(client.close)
        return client

    def probe(self, emu: Emulator, client_id: str, connect: bool = True, keepalive: int = 60,
              **kw) -> Probe:
        """A paho-mqtt client (connected unless connect=False)."""
        p = Probe(emu, client_id, **kw)
        self._closers.append(p.close)
        return p.connect(keepalive=keepalive) if connect else p

    def close_all(self):
        closers, self._closers = self._closers, []
        for close in reversed(closers):
            try:
                close()
            except Exception:  # noqa: BLE001 - a connection the server closed is fine here
                pass
