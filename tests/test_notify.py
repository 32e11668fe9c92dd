"""Run-end notifications: payload, signature, and delivery with retries, against a real HTTP receiver."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.e2e import validator
from worker.backoff import Backoff
from worker.errors import ConfigError, NotifyFailed, NotifyRefused
from worker.ops.notify import body_of, deliver, event_id, run_end_event, sign, verify
from worker.seams.webhook import Notifier

SECRET = "whsec_t0psecretvalue"
# The path and query of a webhook URL are often its credential (Slack, Teams, Zapier...).
HOOK_PATH = "/hooks/T0PSECRETPATH"
HOOK_QUERY = "?token=QUERYSECRET"


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A webhook receiver on a free port: answers each POST with the next scripted status (then 200)."""

    port: int
    statuses: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    requests: list[Received] = field(default_factory=list)
    hang_first: threading.Event | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{HOOK_PATH}{HOOK_QUERY}"

    def script(self, *statuses: int | tuple[int, dict[str, str]]) -> None:
        self.statuses = [s if isinstance(s, tuple) else (s, {}) for s in statuses]

    def wait_for(self, n: int, timeout: float = 5.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.requests) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"receiver got {len(self.requests)} requests, expected {n}")
            time.sleep(0.01)
        return self.requests


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(port=0)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with state.lock:
                first = not state.requests
                state.requests.append(Received(self.path, dict(self.headers.items()), body))
                status, extra = state.statuses.pop(0) if state.statuses else (200, {})
            if first and state.hang_first is not None:
                state.hang_first.wait(10)  # longer than the client's timeout: the client gives up first
            self.send_response(status)
            for name, value in extra.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        if state.hang_first is not None:
            state.hang_first.set()
        server.shutdown()
        server.server_close()


def a_run(**fields: Any) -> dict[str, Any]:
    run: dict[str, Any] = {
        "run_id": "20261130T101500Z-abc123", "state": "done", "source": "s3://captures/2026/11",
        "output": "s3://results/irlive", "created_at": "2026-11-30T10:15:00Z", "created_ms": "1795947300000",
        "finished_at": "2026-11-30T10:20:00Z", "total": "25", "done": "25", "skipped": "3", "calls": "3",
        "spend_cents": "60", "budget_cents": "500", "live": "20", "spoof": "2", "no_face": "1", "rejected": "1",
        "error": "1", "notify_url": f"https://hooks.example.com{HOOK_PATH}{HOOK_QUERY}",
    }
    run.update(fields)
    return run


def a_payload(event: str = "run.done") -> dict[str, Any]:
    return run_end_event(a_run(), None, event, now=datetime(2026, 11, 30, 10, 20, 5, tzinfo=UTC))


def no_sleep(waits: list[float]) -> Any:
    return waits.append


# --- the payload ---------------------------------------------------------------------------------------


def test_payload_carries_counts_money_and_where_the_manifest_is() -> None:
    payload = a_payload()
    assert payload["event"] == "run.done" and payload["run_id"] == "20261130T101500Z-abc123"
    assert payload["counts"] == {"live": 20, "spoof": 2, "no_face": 1, "rejected": 1, "error": 1, "not_judged": 0}
    assert payload["images"] == {"total": 25, "done": 25, "skipped": 3}
    assert (payload["calls"], payload["spend_cents"], payload["spend_usd"]) == (3, 60, "0.60")
    assert (payload["budget_cents"], payload["budget_usd"]) == (500, "5.00")
    assert payload["manifest"] == "s3://results/irlive/runs/20261130T101500Z-abc123/manifest.json"
    assert payload["occurred_at"] == "2026-11-30T10:20:05Z"
    validator("notification").validate(payload)


def test_manifest_counts_win_over_the_run_hash() -> None:
    manifest = {"counts": {"live": 21, "spoof": 2, "no_face": 1, "rejected": 1, "error": 0}, "calls": 4,
                "spend_cents": 80, "finished_at": "2026-11-30T10:21:00Z"}
    payload = run_end_event(a_run(), manifest, "run.done")
    assert payload["counts"]["live"] == 21 and payload["counts"]["error"] == 0
    assert (payload["calls"], payload["spend_cents"], payload["finished_at"]) == (4, 80, "2026-11-30T10:21:00Z")
    validator("notification").validate(payload)


def test_a_paused_or_failed_run_says_why_and_has_no_manifest_yet() -> None:
    paused = run_end_event(a_run(state="paused_budget", pause_reason="run budget $5.00 spent", finished_at="",
                                 done="10", live="10", spoof="0", no_face="0", rejected="0", error="0",
                                 budget_cents=""), None, "run.paused_budget")
    assert paused["stop_reason"] == "run budget $5.00 spent"
    assert paused["manifest"] is None and paused["budget_cents"] is None and paused["finished_at"] is None
    failed = run_end_event(a_run(state="failed", stop_reason="seller asks 30 cents", not_judged="7", done="18"),
                           None, "run.failed")
    assert failed["counts"]["not_judged"] == 7 and failed["stop_reason"] == "seller asks 30 cents"
    for payload in (paused, failed):
        validator("notification").validate(payload)


def test_the_notify_url_and_secrets_never_enter_the_payload() -> None:
    text = body_of(run_end_event(a_run(stop_reason="token=abc123secret"), None, "run.failed")).decode()
    assert "hooks.example.com" not in text and "T0PSECRETPATH" not in text and "QUERYSECRET" not in text
    assert "abc123secret" not in text


def test_event_id_is_stable_per_run_and_event_so_retries_can_be_deduplicated() -> None:
    first = run_end_event(a_run(), None, "run.done", now=datetime(2026, 1, 1, tzinfo=UTC))
    again = run_end_event(a_run(), None, "run.done", now=datetime(2026, 1, 2, tzinfo=UTC))
    assert first["id"] == again["id"] == event_id("20261130T101500Z-abc123", "run.done", "2026-11-30T10:20:00Z")
    assert run_end_event(a_run(), None, "run.failed")["id"] != first["id"]
    assert run_end_event(a_run(run_id="other"), None, "run.done")["id"] != first["id"]
    # A redriven run ends again, later: a new event, not a retry of the first.
    assert run_end_event(a_run(finished_at="2026-12-01T00:00:00Z"), None, "run.done")["id"] != first["id"]


def test_an_unknown_event_is_refused() -> None:
    with pytest.raises(ConfigError):
        run_end_event(a_run(), None, "run.exploded")


# --- signature ------------------------------------------------------------------------------------------


def test_verify_accepts_the_signature_and_refuses_tampering_other_secrets_and_old_timestamps() -> None:
    body = body_of(a_payload())
    signature = sign(SECRET, 1_800_000_000, body)
    assert signature.startswith("sha256=") and len(signature) == 7 + 64
    assert verify(SECRET, "1800000000", body, signature, now=1_800_000_010)
    assert not verify(SECRET, "1800000000", body + b" ", signature, now=1_800_000_010)
    assert not verify("another secret", "1800000000", body, signature, now=1_800_000_010)
    assert not verify(SECRET, "1800000001", body, signature, now=1_800_000_010)
    assert not verify(SECRET, "1800000000", body, signature, now=1_800_000_000 + 301)
    assert not verify(SECRET, "soon", body, signature, now=1_800_000_010)


@pytest.mark.parametrize("garbled", ["sha256=é", "sha256=\u00a0" + "0" * 63, "\ud800", "ünïcode"])
def test_verify_refuses_a_non_ascii_signature_instead_of_raising(garbled: str) -> None:
    """A receiver's verify() answers False for any header value; compare_digest would raise TypeError on these."""
    body = b'{"event": "run.finished"}'
    assert verify(SECRET, "1800000000", body, garbled, now=1_800_000_010) is False


def test_a_real_receiver_gets_a_signed_post_it_can_verify(receiver: Receiver) -> None:
    payload = a_payload()
    Notifier(timeout_s=5).send(receiver.url, SECRET, payload)

    [got] = receiver.wait_for(1)
    assert got.path == HOOK_PATH + HOOK_QUERY
    assert json.loads(got.body) == payload
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers["X-Irlive-Event"] == "run.done"
    assert got.headers["X-Irlive-Delivery"] == payload["id"]
    assert abs(int(got.headers["X-Irlive-Timestamp"]) - time.time()) < 60
    assert verify(SECRET, got.headers["X-Irlive-Timestamp"], got.body, got.headers["X-Irlive-Signature"])
    assert SECRET not in repr(got)


def test_without_a_secret_the_post_is_unsigned(receiver: Receiver) -> None:
    Notifier().send(receiver.url, None, a_payload())
    [got] = receiver.wait_for(1)
    assert "X-Irlive-Signature" not in got.headers and got.headers["X-Irlive-Delivery"]


# --- delivery -------------------------------------------------------------------------------------------


def test_5xx_is_retried_with_exponential_backoff_then_delivered(receiver: Receiver) -> None:
    receiver.script(500, 503, 200)
    waits: list[float] = []
    outcome = deliver(Notifier(), receiver.url, SECRET, a_payload(), attempts=5,
                      backoff=Backoff(base_s=1.0, cap_s=60.0), sleep=no_sleep(waits), rand=lambda: 1.0)
    assert (outcome.delivered, outcome.attempts) == (True, 3)
    assert waits == [1.0, 2.0]
    got = receiver.wait_for(3)
    assert len({r.headers["X-Irlive-Delivery"] for r in got}) == 1, "every retry is the same delivery"
    assert all(verify(SECRET, r.headers["X-Irlive-Timestamp"], r.body, r.headers["X-Irlive-Signature"])
               for r in got)


def test_jitter_draws_each_wait_below_the_exponential_ceiling() -> None:
    backoff = Backoff(base_s=2.0, cap_s=10.0)
    assert [backoff.delay(n, 0.5) for n in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert backoff.delay(3, 0.0) == 0.0


def test_429_waits_out_retry_after(receiver: Receiver) -> None:
    receiver.script((429, {"Retry-After": "7"}), 200)
    waits: list[float] = []
    outcome = deliver(Notifier(), receiver.url, SECRET, a_payload(), sleep=no_sleep(waits), rand=lambda: 0.0)
    assert outcome.delivered and waits == [7.0]


def test_gives_up_after_its_attempts_without_raising(receiver: Receiver) -> None:
    receiver.script(500, 500, 500, 500)
    waits: list[float] = []
    outcome = deliver(Notifier(), receiver.url, SECRET, a_payload(), attempts=3, sleep=no_sleep(waits))
    assert (outcome.delivered, outcome.attempts, outcome.status) == (False, 3, 500)
    assert "gave up after 3 attempts" in outcome.reason
    assert len(receiver.wait_for(3)) == 3 and len(waits) == 2


def test_a_permanent_400_is_not_retried(receiver: Receiver) -> None:
    receiver.script(400, 200)
    waits: list[float] = []
    outcome = deliver(Notifier(), receiver.url, SECRET, a_payload(), attempts=5, sleep=no_sleep(waits))
    assert (outcome.delivered, outcome.attempts, outcome.status) == (False, 1, 400)
    assert waits == [] and len(receiver.requests) == 1


def test_a_timeout_is_retried(receiver: Receiver) -> None:
    receiver.hang_first = threading.Event()
    outcome = deliver(Notifier(timeout_s=0.3), receiver.url, SECRET, a_payload(), sleep=no_sleep([]))
    receiver.hang_first.set()
    assert (outcome.delivered, outcome.attempts) == (True, 2)


def test_nobody_listening_is_retried_then_given_up() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    waits: list[float] = []
    outcome = deliver(Notifier(), f"http://127.0.0.1:{port}{HOOK_PATH}", SECRET, a_payload(), attempts=2,
                      sleep=no_sleep(waits))
    assert (outcome.delivered, outcome.attempts, len(waits)) == (False, 2, 1)


def test_a_bug_in_the_sender_does_not_escape() -> None:
    class Broken:
        def send(self, url: str, secret: str | None, payload: Any) -> None:
            raise KeyError("surprise")

    outcome = deliver(Broken(), "https://example.com/x", SECRET, a_payload(), sleep=no_sleep([]))
    assert not outcome.delivered and outcome.reason == "unexpected KeyError"


def test_the_seam_translates_statuses(receiver: Receiver) -> None:
    receiver.script(502, 408, 404, 301)
    notifier = Notifier()
    with pytest.raises(NotifyFailed):
        notifier.send(receiver.url, SECRET, a_payload())
    with pytest.raises(NotifyFailed):
        notifier.send(receiver.url, SECRET, a_payload())
    with pytest.raises(NotifyRefused):
        notifier.send(receiver.url, SECRET, a_payload())
    with pytest.raises(NotifyRefused, match="301"):
        notifier.send(receiver.url, SECRET, a_payload())


def test_no_secret_or_url_path_in_logs_errors_or_outcomes(receiver: Receiver,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    receiver.script(500, 200, 500, 500, 403)
    outcomes = [deliver(Notifier(), receiver.url, SECRET, a_payload(), attempts=2, sleep=no_sleep([]))
                for _ in range(3)]
    assert [o.delivered for o in outcomes] == [True, False, False]
    errors: list[str] = []
    for status in (500, 404):
        receiver.script(status)
        try:
            Notifier().send(receiver.url, SECRET, a_payload())
        except (NotifyFailed, NotifyRefused) as exc:
            errors.append(str(exc))
    text = "\n".join([r.getMessage() for r in caplog.records] + [o.reason for o in outcomes] + errors)
    assert any(r.name == "httpx" for r in caplog.records), "httpx's own request log line was captured"
    assert f"127.0.0.1:{receiver.port}" in text, "the receiver is named by its host"
    for secret in (SECRET, "T0PSECRETPATH", "QUERYSECRET", "/hooks"):
        assert secret not in text


def test_a_receiver_that_drips_its_answer_is_given_up_at_the_attempt_s_deadline() -> None:
    """One byte every 0.3 s never trips httpx's per-read timeout; the attempt as a whole is bounded all the same
    (it held a worker thread without end), and the dripping connection is closed, not left behind."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    closed = threading.Event()
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n" + b"x" * 40  # ~24 s at this pace

    def drip() -> None:
        conn, _ = server.accept()
        conn.recv(65536)
        try:
            for byte in answer:
                conn.sendall(bytes([byte]))
                time.sleep(0.3)
        except OSError:
            closed.set()  # the client hung up mid-drip
        finally:
            conn.close()

    threading.Thread(target=drip, daemon=True).start()
    try:
        with pytest.raises(NotifyFailed, match="took longer than 2s in all"):
            Notifier(timeout_s=2).send(f"http://127.0.0.1:{port}/hook", None, a_payload())
        assert closed.wait(10), "the attempt's connection is closed at the deadline"
    finally:
        server.close()
