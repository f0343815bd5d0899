"""Private files and credentials: permission checks, systemd credentials, preflight.

A private file (a password, a TLS or OPC UA private key, a signing key) must
not be readable or writable by group or others: any of the mode bits 0o077 set
and it is refused with a ``ConfigError`` naming the file and its mode. One
exception: group bits that are only the mask of a POSIX ACL granting access to
the gateway's own user (how systemd hands over credentials). The one check
every module calls is :func:`check_private_file`; its signature is stable.

Credentials come from the environment (``${VAR}`` in the config), from files,
or from systemd credentials (``LoadCredential=`` puts them in
``$CREDENTIALS_DIRECTORY``). An inline literal password in the config file is
refused by ``gateway.config`` (see docs/security.md).
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.errors import ConfigError

if TYPE_CHECKING:
    from gateway.config import Config

CREDENTIAL_NAME = r"^[A-Za-z0-9_.@-]{1,128}$"
_CREDENTIAL_NAME = re.compile(CREDENTIAL_NAME)


# POSIX access ACL as Linux stores it (xattr system.posix_acl_access): a 4-byte
# version header, then 8-byte entries (tag u16, perm u16, id u32), little endian.
_ACL_XATTR = "system.posix_acl_access"
_ACL_USER, _ACL_GROUP_OBJ, _ACL_GROUP, _ACL_OTHER = 0x02, 0x04, 0x08, 0x20


def _acl_private(target: int | Path) -> bool:
    """True when the file's ACL grants nothing to anyone but its owner and us.

    systemd writes a credential 0400 and gives the service's user read access
    with an ACL entry (``user:gateway:r--``); ``stat`` then shows the ACL mask in
    the group bits (0440) although no group may read the file.
    """
    try:
        blob = os.getxattr(target, _ACL_XATTR)
    except OSError:
        return False  # no ACL (or none readable): the mode bits are the truth
    if len(blob) < 4 or (len(blob) - 4) % 8:
        return False
    me = os.geteuid()
    for off in range(4, len(blob), 8):
        tag, perm, uid = struct.unpack_from("<HHI", blob, off)
        if tag in (_ACL_GROUP_OBJ, _ACL_GROUP, _ACL_OTHER) and perm:
            return False
        if tag == _ACL_USER and perm and uid != me:
            return False
    return True


def _mode_problem(path: Path, st: os.stat_result, what: str, fd: int | None = None) -> str | None:
    if not stat.S_ISREG(st.st_mode):
        return f"{what}: {path} is not a regular file"
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077 and not (mode & 0o007 == 0 and _acl_private(path if fd is None else fd)):
        return (
            f"{what}: {path} has mode {mode:04o}; a private file must not be readable or "
            f"writable by group or others (run: chmod 600 {path})"
        )
    return None


def check_private_file(path: Path | str, what: str) -> None:
    """Refuse ``path`` unless it is a regular file with no group/other permission bits.

    ``what`` names the setting the file comes from (``broker.tls.key_file``);
    raises ConfigError naming the file and its mode, or why it cannot be read.
    """
    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    problem = _mode_problem(path, st, what)
    if problem is not None:
        raise ConfigError(problem)


def read_private_text(path: Path | str, what: str) -> str:
    """The text of a private file, checked on the open descriptor (no check/read race)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        problem = _mode_problem(path, os.fstat(fd), what, fd)
        if problem is not None:
            raise ConfigError(problem)
        try:
            data = f.read()
        except OSError as exc:
            raise ConfigError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{what}: {path} is not UTF-8 text") from None


def credential_path(name: str, what: str) -> Path:
    """Where systemd put the credential ``name`` (``LoadCredential=name:...``)."""
    if not _CREDENTIAL_NAME.match(name) or name in (".", ".."):
        raise ConfigError(f"{what}: {name!r} is not a credential name")
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise ConfigError(
            f"{what}: credential {name!r} needs $CREDENTIALS_DIRECTORY, which is not set "
            f"(run under systemd with LoadCredential={name}:/path/to/file, or use a *_file "
            "setting or ${VAR} instead)"
        )
    return Path(directory) / name


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (no DNS lookup: a name is not trusted)."""
    h = host.strip().rstrip(".").lower()
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h.strip("[]")).is_loopback
    except ValueError:
        return False


def preflight(cfg: Config) -> None:
    """Check what the gateway needs before it acquires: secrets, key modes, TLS files.

    Blocking (reads files): call it in a thread from the event loop.
    """
    from gateway.mqtt import tls_context

    broker = cfg.broker
    broker.secret_password()
    if broker.tls is not None and broker.tls.key_file is not None:
        check_private_file(broker.tls.key_file, "broker.tls.key_file")
    tls_context(broker)
