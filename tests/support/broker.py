"""A real Mosquitto broker on a free loopback port, started and stopped by tests."""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from pathlib import Path

from simulators.children import die_with_parent, free_port

__all__ = ["Mosquitto", "free_port", "mosquitto_binary"]


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/sbin")
    if found is None:
        raise RuntimeError("mosquitto is not installed: run ./scripts/test (it installs it)")
    return found


class Mosquitto:
    """One broker process; ``stop()`` and ``start()`` keep the same port."""

    def __init__(self, workdir: Path, extra_conf: str = "", *, persistent: bool = False) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.extra_conf = extra_conf
        self.persistent = persistent
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "mosquitto.log"

    def _write_conf(self) -> Path:
        conf = self.workdir / "mosquitto.conf"
        # max_queued_messages: the default (1000) drops QoS 1 messages for slow
        # subscribers, which would look like data loss in the tests.
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            # As root, mosquitto drops to user "mosquitto", which cannot write
            # persistence into a private test directory: stay who we are.
            f"user {getpass.getuser()}\n"
            "allow_anonymous true\n"
            + (
                f"persistence true\npersistence_location {self.workdir}/\n"
                if self.persistent
                else "persistence false\n"
            )
            + "max_queued_messages 1000000\n"
            "max_inflight_messages 0\n"
            "log_type error\nlog_type warning\n"
            f"{self.extra_conf}\n"
        )
        return conf

    def start(self, timeout: float = 10.0) -> None:
        conf = self._write_conf()
        deadline = time.monotonic() + timeout
        while True:
            with self.log.open("ab") as log:
                self.proc = subprocess.Popen(
                    [mosquitto_binary(), "-c", str(conf)],
                    stdout=log,
                    stderr=log,
                    start_new_session=True,  # Ctrl-C in a demo must not kill it first
                    preexec_fn=die_with_parent,
                )
            if self._wait_listening(deadline):
                return
            # The port was taken between free_port() and bind: try another.
            self.stop()
            if time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not start; see {self.log}")
            self.port = free_port()
            conf = self._write_conf()

    def _wait_listening(self, deadline: float) -> bool:
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return True
            except OSError:
                time.sleep(0.02)
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
