"""Child processes of the harness and what they cost: CPU (user+sys) and RSS from /proc."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from simulators.children import die_with_parent

ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")


def python() -> str:
    """The repo's venv interpreter (what `./scripts/setup` installs), else this one."""
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def spawn(
    argv: list[str], log: Path, *, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``argv`` with stdout+stderr appended to ``log``; it dies with the harness."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as f:
        return subprocess.Popen(
            argv,
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd or ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            preexec_fn=die_with_parent,
        )


def stop(proc: subprocess.Popen[bytes] | None, timeout: float = 60.0) -> int | None:
    """SIGTERM, then SIGKILL after ``timeout``; the exit status."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@dataclass
class Usage:
    """One sample of a process: CPU seconds (user+sys, all threads) and memory."""

    t: float
    cpu_s: float
    rss_mb: float
    hwm_mb: float


def usage(pid: int) -> Usage:
    """Read /proc/<pid>/stat (utime, stime) and /proc/<pid>/status (VmRSS, VmHWM)."""
    t = time.monotonic()
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name may hold spaces: fields are counted after its ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    cpu = (int(fields[11]) + int(fields[12])) / TICKS
    rss = hwm = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) / 1024
    return Usage(t, cpu, rss, hwm)


def machine() -> dict[str, object]:
    """What the figures were measured on."""
    import platform

    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gb = 0.0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    mosq = "?"
    with contextlib.suppress(Exception):
        from tests.support.broker import mosquitto_binary

        out = subprocess.run(
            [mosquitto_binary(), "-h"], capture_output=True, text=True, timeout=5
        ).stdout
        mosq = out.splitlines()[0].strip() if out else "?"
    py = subprocess.run(
        [
            python(),
            "-c",
            "import platform as p, pymodbus as m; print(p.python_version(), m.__version__)",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.split()
    load = "?"
    with contextlib.suppress(OSError):
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": mem_gb,
        "kernel": platform.release(),
        "python": py[0] if py else platform.python_version(),
        "pymodbus": py[1] if len(py) > 1 else "?",
        "mosquitto": mosq,
        "load_at_start": load,
    }
