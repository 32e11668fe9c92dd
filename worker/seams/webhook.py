"""The webhook seam: one signed POST of a notification, with httpx errors and HTTP statuses translated into
NotifyFailed (retry) or NotifyRefused (do not); the only place notifications touch httpx."""

from __future__ import annotations

import contextvars
import logging
import threading
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
    """POSTs notifications; `transport` replaces the network in tests, `timeout_s` bounds each attempt whole.

    httpx's timeouts are per operation: a receiver that drips a byte every few seconds never trips its read
    timeout and held a worker thread (on the events queue) without end. Each attempt therefore runs on its own
    client in a helper thread, and is abandoned at `timeout_s`: its client is closed, which ends the read.
    """

    def __init__(self, *, timeout_s: float = 10.0, transport: httpx.BaseTransport | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._timeout_s = timeout_s
        self._transport = transport
        self._clock = clock
        _hide_urls_in_httpx_logs()

    def _client(self) -> httpx.Client:
        # No redirects: a 3xx would send the signed body (and maybe the URL's credential) somewhere else.
        return httpx.Client(timeout=httpx.Timeout(self._timeout_s, connect=min(self._timeout_s, 5.0)),
                            transport=self._transport, follow_redirects=False)

    def send(self, url: str, secret: str | None, payload: Mapping[str, Any]) -> None:
        """One attempt: returns on 2xx; NotifyFailed to retry, NotifyRefused never to retry. Messages name
        the receiver by scheme, host and port only."""
        target = safe_target(url)
        body = body_of(payload)
        head = headers(payload, secret, body, int(self._clock()))
        client = self._client()
        outcome: list[httpx.Response | BaseException] = []

        def post() -> None:
            sending = _SENDING.set((url, target))
            try:
                response = client.post(url, content=body, headers=head)
                response.close()
                outcome.append(response)
            except BaseException as exc:  # handed to the caller's thread as is
                outcome.append(exc)
            finally:
                _SENDING.reset(sending)

        attempt = threading.Thread(target=post, name="irlive-notify", daemon=True)
        attempt.start()
        attempt.join(self._timeout_s)
        client.close()  # ends a read still dripping in the helper thread; the helper then ends too
        if not outcome:
            attempt.join(5.0)
            raise NotifyFailed(f"{target} took longer than {self._timeout_s:g}s in all")
        return self._answer(target, outcome[0])

    @staticmethod
    def _answer(target: str, outcome: httpx.Response | BaseException) -> None:
        if isinstance(outcome, httpx.TimeoutException):
            raise NotifyFailed(f"{target} timed out") from None
        if isinstance(outcome, httpx.TransportError):
            raise NotifyFailed(f"{target} unreachable ({type(outcome).__name__})") from None
        if isinstance(outcome, httpx.HTTPError):
            # An invalid URL and the like: trying again cannot help.
            raise NotifyRefused(f"{target}: {type(outcome).__name__}") from None
        if isinstance(outcome, BaseException):
            raise outcome
        status = outcome.status_code
        if 200 <= status < 300:
            return
        if status >= 500 or status in _RETRYABLE_4XX:
            raise NotifyFailed(f"{target} answered {status}", status, _retry_after(outcome))
        raise NotifyRefused(f"{target} answered {status}", status)


def _retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds when it is a plain number (dates are rare from webhook receivers)."""
    try:
        value = float(response.headers.get("Retry-After", ""))
    except ValueError:
        return None
    return value if value >= 0 else None
