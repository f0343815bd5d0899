"""Hot reload: what changed between two configs, who asked, and the audit records.

The running gateway (``gateway.daemon``) re-reads its config on SIGHUP or on
``gateway reload``. This module holds the parts that do not need the running
objects:

* :func:`diff_configs`: devices added, removed and changed; gateway-level
  fields changed, split into those applied live and those that need a restart.
* Who asked. SIGHUP is blocked in every thread (:func:`block_sighup`, called
  before any thread starts) and consumed by one thread with ``sigtimedwait``
  (:class:`HupListener`), so the sender's uid and pid (``si_uid``, ``si_pid``)
  are known. ``gateway reload`` also leaves a request file
  ``<state_dir>/reload-<its pid>.request`` (mode 0600) with ``--reason`` and
  ``--user``; the daemon matches it by the signal's ``si_pid``, records the
  file owner's uid, deletes it and answers in ``reload-<pid>.result``.
* The audit records of the gateway stream ``$gateway``: ``$start``,
  ``$reload`` (applied, or ``q=bad`` when refused) and ``$stop``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import signal
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from pydantic import BaseModel

from gateway.config import Config, DeviceConfig
from gateway.errors import GatewayError
from gateway.record import FORMAT_VERSION, GOOD, Record

GATEWAY_STREAM: Final = "$gateway"  # device ids cannot start with "$": no collision
EV_RELOAD: Final = "$reload"
PID_FILE: Final = "gateway.pid"
# Gateway-level fields a reload applies without a restart; any other change to
# [gateway], [broker] or [outbox] is refused with "restart needed".
LIVE_FIELDS: Final = frozenset({"gateway.shutdown_timeout"})
_MAX_TEXT = 2000


@dataclass(frozen=True)
class ConfigDiff:
    """What a reload would change."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)  # e.g. "broker.host"

    @property
    def restart_needed(self) -> list[str]:
        return [s for s in self.sections if s not in LIVE_FIELDS]

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.sections)

    def describe(self) -> str:
        parts = [
            f"{what} {', '.join(ids)}"
            for what, ids in (
                ("added", self.added),
                ("removed", self.removed),
                ("changed", self.changed),
                ("settings", self.sections),
            )
            if ids
        ]
        return "; ".join(parts) or "no change"


def _changed_fields(prefix: str, old: BaseModel, new: BaseModel) -> list[str]:
    # SecretStr compares by value, so a new password shows as changed without
    # its value appearing anywhere.
    return [
        f"{prefix}.{name}"
        for name in type(old).model_fields
        if getattr(old, name) != getattr(new, name)
    ]


def active_devices(cfg: Config) -> dict[str, DeviceConfig]:
    return {d.id: d for d in cfg.devices if d.enabled}


def diff_configs(old: Config, new: Config) -> ConfigDiff:
    """Devices added/removed/changed (disabled counts as absent) and changed settings."""
    a, b = active_devices(old), active_devices(new)
    return ConfigDiff(
        added=sorted(b.keys() - a.keys()),
        removed=sorted(a.keys() - b.keys()),
        changed=sorted(i for i in a.keys() & b.keys() if a[i] != b[i]),
        sections=_changed_sections(old, new),
    )


def _changed_sections(old: Config, new: Config) -> list[str]:
    # Every top-level section but the devices, so that a section added later
    # is compared too (and needs a restart until it is listed in LIVE_FIELDS).
    out: list[str] = []
    for name in type(old).model_fields:
        if name in ("devices", "source", "source_sha256"):
            continue
        a, b = getattr(old, name), getattr(new, name)
        if isinstance(a, BaseModel) and isinstance(b, BaseModel) and type(a) is type(b):
            out += _changed_fields(name, a, b)
        elif a != b:
            out.append(name)
    return out


# -- who asked -------------------------------------------------------------------------


def block_sighup() -> None:
    """Block SIGHUP in this thread and every thread started after it.

    Call before any thread exists (the outbox's SQLite thread, asyncio's
    executor): a thread that does not block SIGHUP could receive it and the
    process would die of it, or the listener would miss the sender.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})


def sighup_blocked() -> bool:
    return signal.SIGHUP in signal.pthread_sigmask(signal.SIG_BLOCK, set())


class HupListener:
    """A thread that takes SIGHUP with ``sigtimedwait`` and hands (uid, pid) to the loop."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, callback: Callable[[int, int], None]
    ) -> None:
        self._loop = loop
        self._callback = callback
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sighup", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            info = signal.sigtimedwait({signal.SIGHUP}, 0.5)
            # CPython returns an empty siginfo (si_signo 0) instead of None when
            # the wait is interrupted (EINTR) past its deadline, which happens
            # under ptrace: py-spy sampling the process caused "reloads".
            if info is not None and info.si_signo == signal.SIGHUP and not self._done.is_set():
                with contextlib.suppress(RuntimeError):  # loop closed meanwhile
                    self._loop.call_soon_threadsafe(self._callback, info.si_uid, info.si_pid)

    def stop(self) -> None:
        self._done.set()
        self._thread.join(2.0)


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


@dataclass(frozen=True)
class Who:
    """Who asked for a reload: the signal's sender and, from ``gateway reload``, its request."""

    sender_uid: int | None = None
    sender_pid: int | None = None
    request: dict[str, Any] | None = None

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.sender_uid is not None:
            out["sender"] = {
                "uid": self.sender_uid,
                "user": user_name(self.sender_uid),
                "pid": self.sender_pid,
            }
        if self.request is not None:
            out["request"] = self.request
        return out

    def describe(self) -> str:
        who = []
        if self.request is not None:
            who.append(f"{self.request.get('user')!s} ({self.request.get('reason')!s})")
        if self.sender_uid is not None:
            who.append(f"signal from uid {self.sender_uid} pid {self.sender_pid}")
        return ", ".join(who) or "in-process request"


def request_path(state_dir: Path, pid: int) -> Path:
    return state_dir / f"reload-{pid}.request"


def result_path(state_dir: Path, pid: int) -> Path:
    return state_dir / f"reload-{pid}.result"


def _write_private(path: Path, data: dict[str, Any]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f)


def take_request(state_dir: Path, pid: int) -> dict[str, Any] | None:
    """The request file left by ``gateway reload`` (pid ``pid``), deleted once read.

    Blocking (file I/O): call it in a thread. The owner's uid is recorded, and
    a file that is not private (mode wider than 0600) or not JSON is reported
    as such instead of its claims.
    """
    path = request_path(state_dir, pid)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return {"error": f"{path}: cannot read: {exc.strerror or exc}"}
    try:
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            raw = f.read(64 * 1024)
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
    out: dict[str, Any] = {"file_uid": st.st_uid, "file_user": user_name(st.st_uid)}
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISREG(st.st_mode) or mode & 0o077:
        out["error"] = f"{path}: mode {mode:04o} is not private; its content is ignored"
        return out
    try:
        data = json.loads(raw)
    except ValueError:
        out["error"] = f"{path}: not JSON; its content is ignored"
        return out
    if isinstance(data, dict):
        for key in ("user", "reason"):
            if isinstance(data.get(key), str):
                out[key] = data[key][:_MAX_TEXT]
    return out


def write_result(state_dir: Path, pid: int, ok: bool, message: str) -> None:
    """Answer ``gateway reload`` (pid ``pid``). Blocking: call it in a thread."""
    path = result_path(state_dir, pid)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    _write_private(path, {"ok": ok, "message": message[:_MAX_TEXT]})


def write_pid_file(state_dir: Path) -> Path:
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / PID_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{os.getpid()}\n")
    tmp.replace(path)
    return path


def remove_pid_file(state_dir: Path) -> None:
    path = state_dir / PID_FILE
    with contextlib.suppress(OSError, ValueError):
        if int(path.read_text().strip()) == os.getpid():
            path.unlink()


def running_pid(state_dir: Path) -> int:
    """The pid of the gateway running with ``state_dir``; GatewayError when there is none."""
    path = state_dir / PID_FILE
    try:
        pid = int(path.read_text().strip())
    except FileNotFoundError:
        raise GatewayError(
            f"{path}: no running gateway found (no pid file: is `gateway run` running with "
            "this config's state_dir?)"
        ) from None
    except (OSError, ValueError) as exc:
        raise GatewayError(f"{path}: no running gateway found ({exc})") from None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise GatewayError(f"{path}: gateway pid {pid} is not running (stale pid file)") from None
    except PermissionError:
        pass  # running as another user: the SIGHUP itself will say if we may signal it
    return pid


def request_reload(
    state_dir: Path, *, reason: str | None, user: str | None, timeout: float = 30.0
) -> tuple[bool, str]:
    """``gateway reload``: leave a request, SIGHUP the daemon, wait for its answer."""
    pid = running_pid(state_dir)
    me = os.getpid()
    req, res = request_path(state_dir, me), result_path(state_dir, me)
    with contextlib.suppress(FileNotFoundError):
        res.unlink()
    try:
        _write_private(req, {"reason": reason, "user": user, "ts": time.time_ns()})
    except OSError as exc:
        raise GatewayError(
            f"{req}: cannot write the reload request: {exc.strerror or exc} "
            "(run as the gateway's user, e.g. sudo -u gateway gateway reload ...)"
        ) from None
    try:
        os.kill(pid, signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                answer = json.loads(res.read_text(encoding="utf-8"))
            except (FileNotFoundError, ValueError):
                time.sleep(0.05)
                continue
            res.unlink()
            return bool(answer.get("ok")), str(answer.get("message", ""))
        raise GatewayError(f"gateway pid {pid} did not answer the reload within {timeout:g} s")
    except PermissionError:
        raise GatewayError(f"not allowed to signal gateway pid {pid}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            req.unlink()


# -- audit records -----------------------------------------------------------------------


def audit_record(
    gateway_id: str, tag: str, val: str, info: dict[str, Any], *, q: str = GOOD
) -> Record:
    """An event of the gateway stream (chained like any record by ``Outbox.submit``)."""
    return {
        "v": FORMAT_VERSION,
        "gw": gateway_id,
        "dev": GATEWAY_STREAM,
        "tag": tag,
        "val": val[:_MAX_TEXT],
        "unit": "",
        "q": q,
        "ts": time.time_ns(),
        "info": info,
    }


def config_info(cfg: Config) -> dict[str, Any]:
    return {
        "config_file": str(cfg.source) if cfg.source else "",
        "config_sha256": cfg.source_sha256 or "",
        "devices": sorted(active_devices(cfg)),
    }
