"""structlog JSON logging; per-message ids are bound through contextvars."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import structlog

from contracts.envelope import Envelope
from services.common.redact import url_passwords

_SECRET_KEYS = ("api_key", "apikey", "token", "secret", "password", "authorization")


def _redact_secrets(_logger, _name, event_dict):
    # Secrets never reach logs (brief): any key that names one is masked whatever its value, and a
    # password in a URL (nats://user:pw@..., postgresql://...) is masked in any value.
    for key, value in list(event_dict.items()):
        if any(s in key.lower() for s in _SECRET_KEYS):
            event_dict[key] = "***"
        elif isinstance(value, str):
            event_dict[key] = url_passwords(value)
    return event_dict


def _log_uncaught(exc_type, exc, tb) -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        return
    structlog.get_logger("uncaught").critical("uncaught_exception", error=repr(exc), exc_info=(exc_type, exc, tb))


class _CurrentStderr:
    """Writes to whatever sys.stderr is when a line is logged, not the one at configure time
    (loggers are cached on first use; a replaced stderr must still get the lines)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(service: str, level: str = "INFO") -> None:
    # Progress bars (transformers' "Loading weights", the hub's downloads) would put non-JSON lines in
    # the log; long work reports progress as log events and training.progress instead. Read by
    # huggingface_hub when it is first imported, which a service does later, lazily.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact_secrets,
        structlog.processors.format_exc_info,
    ]
    # What libraries log through stdlib (FastStream, nats, httpx under the OpenAI client ...) is rendered
    # as the same JSON, with the ids bound for the message at hand, not as bare text lines.
    handler = logging.StreamHandler(_CurrentStderr())
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, structlog.processors.JSONRenderer()],
    ))
    handler._tuneline = True  # replaced when configured again; handlers others added (pytest's) stay
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if not getattr(h, "_tuneline", False)] + [handler]
    root.setLevel(level.upper())
    # FastStream and nats log through stdlib; keep them, but quieter than our own events; httpx logs
    # every request at INFO.
    for noisy in ("faststream", "nats", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # An exception nothing caught (a service that cannot start) is logged as JSON too, not as a traceback;
    # so is a library's Python warning (platformdirs warns on every `tuneline down` where XDG_RUNTIME_DIR is unset).
    sys.excepthook = _log_uncaught
    logging.captureWarnings(True)
    structlog.configure(
        processors=[*shared, structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(service=service)


@contextmanager
def message_context(envelope: Envelope | None = None, **extra) -> Iterator[None]:
    ids = {}
    if envelope is not None:
        ids = {
            "event_id": str(envelope.event_id),
            "event_type": envelope.type,
            "run_id": envelope.run_id,
            "correlation_id": envelope.correlation_id,
        }
    with structlog.contextvars.bound_contextvars(**ids, **extra):
        yield


def get_logger(name: str | None = None):
    return structlog.get_logger(name)
