"""Scrubbing of secrets (tokens, API keys, passwords, presigned signatures) from any text that may be logged."""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import Any
from urllib.parse import urlsplit

# A URL's query string is where presigned credentials live; keep the path, drop the query.
_URL_QUERY = re.compile(r"(https?://[^\s\"'?#]+)\?[^\s\"'#]*")
_SECRET_PARAM = re.compile(
    r"(?i)\b(X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|Signature|AWSAccessKeyId)=[^&\s\"']+"
)
_SECRET_FIELD = re.compile(
    r"(?i)([\"']?(?:token|paymentToken|X-Payment-Token|api[_-]?key|X-API-Key|authorization|password|passwd)"
    r"[\"']?\s*[:=]\s*)"
    r"[\"']?(?:(?:Bearer|Basic)\s+)?[^\s\"',}]+[\"']?"
)
# Everything between `scheme://` and the last `@` of the authority: `user:pass@`, `:pass@`, and a password
# holding an unencoded `@` (redis-py splits the authority at its last `@`, so `u:p@ss@host` means `p@ss`).
# A `?` or `#` does not end the match: a password holding one unencoded must not leak, and masking too much
# of an odd URL (`https://host?to=a@b`) costs only a less readable line.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s\"'<>]*@")
# Query parameters whose value is a credential, in URLs whose query is kept (settings, Redis URLs).
_SECRET_NAME = re.compile(r"(?i)token|key|secret|signature|credential|password|passwd|pwd")
# The formatter the filter renders tracebacks with: the stdlib's, which is what every handler's formatter
# (Celery's ColorFormatter and TaskFormatter included) produces for exc_info.
_TRACEBACKS = logging.Formatter()


def mask_url(url: str) -> str:
    """A URL with its user and password (if any) and secret query values replaced by ***:
    `redis://***@host:6379/0`, `unix:///run/redis.sock?db=0&password=***`.

    From the parsed URL, not a pattern over the text. A URL whose `@` the parser does not place in the authority
    alone (an unencoded `/`, `?`, `#` in a password, or an `@` in a query value) cannot be split safely: all of
    it after the scheme is masked.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    if any(c in url for c in "\t\r\n"):
        # urlsplit drops these, so its netloc would no longer line up with the text.
        return f"{scheme}://***" if "@" in rest else url
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed "[" of an IPv6 host
        return f"{scheme}://***" if "@" in rest else url
    after_netloc = rest[len(parts.netloc):]
    if "@" in after_netloc:
        return f"{scheme}://***"
    netloc = "***@" + parts.netloc.rpartition("@")[2] if "@" in parts.netloc else parts.netloc
    path, q, query = after_netloc.partition("?")
    return scheme + sep + netloc + path + (q + _mask_query(query) if q else "")


def _mask_query(query: str) -> str:
    """Values of secret parameters as ***; a piece with no `=` after a secret one is part of its value
    (`password=a&b`). Split on `&` alone, as redis-py and kombu read the query (`parse_qs`: `;` has not separated
    parameters since Python 3.10), so `password=;x=1` is one password, all of it masked."""
    out: list[str] = []
    in_secret = False
    for piece in re.split(r"(&)", query):
        if piece == "&":
            out.append(piece)
            continue
        name, eq, _ = piece.partition("=")
        if eq:
            in_secret = bool(_SECRET_NAME.search(name))
            out.append(f"{name}=***" if in_secret else piece)
        elif in_secret:
            out.pop()  # its separator: the piece was the secret's own `&`
        else:
            out.append(piece)
    return "".join(out)


def redact(text: str) -> str:
    """Return text with URL credentials and query strings, signatures and token-like fields replaced by ***."""
    text = _USERINFO.sub(r"\1***@", text)
    text = _URL_QUERY.sub(r"\1?***", text)
    text = _SECRET_PARAM.sub(r"\1=***", text)
    return _SECRET_FIELD.sub(r"\1***", text)


class RedactingFilter(logging.Filter):
    """A handler filter that redacts everything of a record a formatter prints: the final message, the
    traceback (`exc_info`, `exc_text`) and the stack (`stack_info`), whatever logged it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message, formatted = _message(record)
        cleaned = redact(message)
        if cleaned != message or not formatted:
            record.msg, record.args = cleaned, None
        if record.exc_info:
            # The handler's formatter would render exc_info itself, after every filter has run; render it
            # here instead and leave only the redacted text (formatters print exc_text when exc_info is unset).
            exc_info = record.exc_info if isinstance(record.exc_info, tuple) else sys.exc_info()
            if not record.exc_text and exc_info[0] is not None:
                record.exc_text = _TRACEBACKS.formatException(exc_info)
            record.exc_info = None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


class RedactingFormatter(logging.Formatter):
    """Wraps a handler's formatter and redacts the whole line it makes, so fields the filter does not know
    (a format string naming a custom attribute, such as the `data` Celery attaches to task failures) and
    formatters that render exc_info their own way are covered too."""

    def __init__(self, inner: logging.Formatter | None = None) -> None:
        super().__init__()
        self.inner = inner if inner is not None else logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        return redact(self.inner.format(record))


def install(logger: logging.Logger | None = None) -> None:
    """Attach the filter to every handler of the logger (root by default) and wrap its formatter, once."""
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
        if not isinstance(handler.formatter, RedactingFormatter):
            handler.setFormatter(RedactingFormatter(handler.formatter))


def _message(record: logging.LogRecord) -> tuple[str, bool]:
    """The record's final message, and whether its arguments fitted its format.

    A misfit would make the handler print the raw arguments to stderr (Handler.handleError), past every
    filter; the filter prints them as text instead, redacted like the rest.
    """
    try:
        return record.getMessage(), True
    except Exception:
        try:
            return f"{record.msg!s} (log arguments did not fit the format: {record.args!r})", False
        except Exception:
            return "(a log message that could not be printed)", False


def scrub_answer(raw: bytes) -> str:
    """A seller's answer as text safe to keep: presigned URLs lose their query (the signature), and the JSON
    stays JSON, nested `Result` strings included, so the answer can still be read back. Text that is not JSON
    is redacted as any other."""
    text = raw.decode("utf-8", errors="replace")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        return redact(text)
    try:
        return json.dumps(_scrub_value(doc, 0), ensure_ascii=True)
    except (ValueError, RecursionError):
        return redact(text)


def _scrub_value(value: Any, depth: int) -> Any:
    if depth > 64:
        raise ValueError("too deep to scrub")
    if isinstance(value, dict):
        return {k: _scrub_value(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub_value(v, depth + 1) for v in value]
    if isinstance(value, str):
        stripped = value.strip()
        if stripped[:1] in ("{", "[") and len(stripped) > 1:
            try:
                return json.dumps(_scrub_value(json.loads(stripped), depth + 1), ensure_ascii=True)
            except (ValueError, RecursionError):
                return redact(value)
        return _URL_QUERY.sub(r"\1?***", value) if "://" in value else redact(value)
    return value
