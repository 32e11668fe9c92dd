"""The webhook seam: one signed POST of a notification, with httpx errors and HTTP statuses translated into
NotifyFailed (retry) or NotifyRefused (do not); the only place notifications touch httpx."""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from worker.errors import NotifyFailed, NotifyRefused
from worker.ops.notify import body_of, headers, safe_target

# The webhook URL being POSTed by this thread, so httpx's own request log line can be cut down to its host.
_SENDING: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar("irlive_webhook", default=None)
# Client errors that mean 'not now' rather than 'never' (RFC 9110): retried like a 5xx.
_RETRYABLE_4XX = (408, 429)


class _HideWebhookUrl(logging.Filter):
    """httpx logs every request's full URL at INFO; a webhook URL's path and query are often its credential."""

    def filter(self, record: logging.LogRecord) -> bool:
        sending = _SENDING.get()
        if sending is not None:
            url, target = sending
            try:
                message = record.getMessage()
            except Exception:
                message = str(record.msg)
            record.msg, record.args = message.replace(str(httpx.URL(url)), target).replace(url, target), None
        return True


def _hide_urls_in_httpx_logs() -> None:
    logger = logging.getLogger("httpx")
    if not any(isinstance(f, _HideWebhookUrl) for f in logger.filters):
        logger.addFilter(_HideWebhookUrl())


class Notifier:
    """POSTs notifications; `transport` replaces the network in tests, `timeout_s` bounds each attempt."""

    def __init__(self, *, timeout_s: float = 10.0, transport: httpx.BaseTransport | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        # No redirects: a 3xx would send the signed body (and maybe the URL's credential) somewhere else.
        self._client = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)),
                                    transport=transport, follow_redirects=False)
        self._clock = clock
        _hide_urls_in_httpx_logs()

    def send(self, url: str, secret: str | None, payload: Mapping[str, Any]) -> None:
        """One attempt: returns on 2xx; NotifyFailed to retry, NotifyRefused never to retry. Messages name
        the receiver by scheme, host and port only."""
        target = safe_target(url)
        body = body_of(payload)
        head = headers(payload, secret, body, int(self._clock()))
        sending = _SENDING.set((url, target))
        try:
            response = self._client.post(url, content=body, headers=head)
        except httpx.TimeoutException:
            raise NotifyFailed(f"{target} timed out") from None
        except httpx.TransportError as exc:
            raise NotifyFailed(f"{target} unreachable ({type(exc).__name__})") from None
        except httpx.HTTPError as exc:
            # An invalid URL and the like: trying again cannot help.
            raise NotifyRefused(f"{target}: {type(exc).__name__}") from None
        finally:
            _SENDING.reset(sending)
        status = response.status_code
        response.close()
        if 200 <= status < 300:
            return
        if status >= 500 or status in _RETRYABLE_4XX:
            raise NotifyFailed(f"{target} answered {status}", status, _retry_after(response))
        raise NotifyRefused(f"{target} answered {status}", status)

    def close(self) -> None:
        self._client.close()


def _retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds when it is a plain number (dates are rare from webhook receivers)."""
    try:
        value = float(response.headers.get("Retry-After", ""))
    except ValueError:
        return None
    return value if value >= 0 else None
