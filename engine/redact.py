"""Keep credentials out of what a run prints: log lines and error lines are read, pasted into
issues and shipped with a run, so a URI's password or token, or the value of a secret
environment variable (AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_TOKEN, RAY_AUTH_TOKEN, ...),
is replaced by ``***`` before it is written."""

from __future__ import annotations

import logging
import os
import re

MASK = "***"
# scheme://user:password@host -> scheme://user:***@host
_URI_PASSWORD = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s/:@]*):[^\s/@]+@")
# ?token=...&X-Amz-Signature=... -> ?token=***&X-Amz-Signature=***
_SECRET_QUERY = re.compile(r"([?&][^=&\s]*(?:token|key|secret|password|passwd|signature|credential|sig)[^=&\s]*=)[^&\s#)'\"<>]+",
                           re.IGNORECASE)
_SECRET_ENV_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE_KEY|SESSION_KEY|API_KEY|ACCESS_KEY",
                              re.IGNORECASE)
# Shorter values (flags, "true", a port) would mask ordinary words.
_MIN_SECRET_CHARS = 8


def secret_env_values(environ=os.environ) -> list[str]:
    """Values of environment variables whose names say they hold a secret, longest first."""
    values = {v for k, v in environ.items() if _SECRET_ENV_NAME.search(k) and len(v) >= _MIN_SECRET_CHARS}
    return sorted(values, key=len, reverse=True)


def redact(text: str, secrets: list[str] | None = None) -> str:
    """``text`` without URI passwords, secret query parameters or secret environment values."""
    for value in secret_env_values() if secrets is None else secrets:
        text = text.replace(value, MASK)
    text = _URI_PASSWORD.sub(rf"\1:{MASK}@", text)
    return _SECRET_QUERY.sub(rf"\1{MASK}", text)


class RedactingFilter(logging.Filter):
    """A handler filter that redacts each record's formatted message (and its traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def redact_log_handlers(logger: logging.Logger | None = None) -> None:
    """Add the redacting filter to every handler of ``logger`` (the root logger by default)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
