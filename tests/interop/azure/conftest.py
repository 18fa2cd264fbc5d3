"""Fixtures for the Azure interop suite: one `fleetgw emulate azure` process for the session
(its binary comes from $FLEETGW_BINARY, set by scripts/interop), with DPS and IoT Hub both on
port 8883 (the only MQTT port the SDK uses) of two loopback addresses, 127.0.0.2 and 127.0.0.3.
When a test fails, the emulator's log is attached to the report.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

START_TIMEOUT = 30


def pytest_configure(config):
    binary = os.environ.get("FLEETGW_BINARY")
    if not binary:
        raise pytest.UsageError("FLEETGW_BINARY is not set: run the suite with "
                                "`scripts/interop target/debug/fleetgw`")


class AzureEmulator:
    def __init__(self, binary: str, dir: Path):
        self.dir = dir
        self.log_path = dir.parent / "emulator.log"
        self._log = open(self.log_path, "ab")
        cmd = [binary, "emulate", "azure", "--dir", str(dir),
               "--dps-mqtt", "127.0.0.2:8883", "--dps-https", "127.0.0.2:0",
               "--hub-mqtt", "127.0.0.3:8883", "--hub-https", "127.0.0.3:0",
               "--api", "127.0.0.1:0", "--assigning-ms", "500"]
        self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log,
                                        stderr=self._log)
        info_path = dir / "emulator.json"
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"fleetgw emulate azure exited with {self.process.returncode}:"
                                   f"\n{self.log()}")
            try:
                self.info = json.loads(info_path.read_text())
                break
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{info_path} not written in {START_TIMEOUT} s:\n{self.log()}")
            time.sleep(0.05)
        self.ca_pem = Path(self.info["ca"]).read_text()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()


_running: list[AzureEmulator] = []


@pytest.fixture(scope="session")
def emulator(tmp_path_factory) -> AzureEmulator:
    emu = AzureEmulator(os.path.abspath(os.environ["FLEETGW_BINARY"]),
                        tmp_path_factory.mktemp("azure") / "dir")
    _running.append(emu)
    yield emu
    emu.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        for emu in _running:
            report.sections.append(("fleetgw emulate azure", emu.log()))
    return report
