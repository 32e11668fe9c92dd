"""Scrubbing of secrets (tokens, API keys, presigned signatures) from any text that may be logged."""

from __future__ import annotations

import logging
import re

# A URL's query string is where presigned credentials live; keep the path, drop the query.
_URL_QUERY = re.compile(r"(https?://[^\s\"'?#]+)\?[^\s\"'#]*")
_SECRET_PARAM = re.compile(
    r"(?i)\b(X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|Signature|AWSAccessKeyId)=[^&\s\"']+"
)
_SECRET_FIELD = re.compile(
    r"(?i)([\"']?(?:token|paymentToken|X-Payment-Token|api[_-]?key|X-API-Key|authorization)[\"']?\s*[:=]\s*)"
    r"[\"']?(?:(?:Bearer|Basic)\s+)?[^\s\"',}]+[\"']?"
)


_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s\"']*@")


def mask_url(url: str) -> str:
    """A URL with its user and password (if any) replaced by ***: `redis://***@host:6379/0`."""
    return _USERINFO.sub(r"\1***@", url)


def redact(text: str) -> str:
    """Return text with URL query strings, signatures and token-like fields replaced by ***."""
    text = _USERINFO.sub(r"\1***@", text)
    text = _URL_QUERY.sub(r"\1?***", text)
    text = _SECRET_PARAM.sub(r"\1=***", text)
    return _SECRET_FIELD.sub(r"\1***", text)


class RedactingFilter(logging.Filter):
    """A logging filter that redacts every record's final message, whatever logged it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def install(logger: logging.Logger | None = None) -> None:
    """Attach the filter to every handler of the logger (root by default), once."""
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
