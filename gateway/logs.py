"""structlog setup: JSON lines off a terminal (journald), readable console on one."""

from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure(level: str = "info", *, json: bool | None = None) -> None:
    """Configure structlog and route stdlib logging (pymodbus, asyncua) through it."""
    if json is None:
        json = not sys.stderr.isatty()
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processor=renderer, foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name]
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Library chatter stays at warning. pymodbus logs every unanswered request
    # at error level with no device id; the drivers report the same facts per
    # device (q=bad records, offline events, transition log lines), so only its
    # critical messages pass.
    root.setLevel(max(_LEVELS[level], logging.WARNING))
    # asyncua likewise logs a traceback when a server goes away mid-publish.
    for noisy in ("pymodbus", "asyncua"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
