"""`irlive listen sqs://QUEUE`: S3 event notifications into the event intake. A message is deleted only once the
images it announces are buffered in Redis; one irlive cannot read stays for the queue's redrive policy."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, TextIO

from celery import Celery

from producer.events import Unparseable, parse_message
from producer.filters import is_image_key
from worker.app import send_chunk
from worker.backoff import Backoff
from worker.config import S3Location
from worker.errors import IrliveError
from worker.flow.intake import EventObject, Intake
from worker.ops.redact import redact
from worker.seams.sqs import EventQueue, Message

log = logging.getLogger("irlive.listen")
# How often buffered images are looked at for a chunk to send (a lone event waits IRLIVE_EVENT_MAX_WAIT_S).
FLUSH_EVERY_S = 0.5
# A queue that keeps failing is asked again after 0.5 s, 1 s, ... up to 30 s (no jitter: one listener per queue).
_RECEIVE_BACKOFF = Backoff(base_s=0.5, cap_s=30.0, jitter=False)


@dataclass
class ListenStats:
    """What the listener did since it started."""

    messages: int = 0
    created: int = 0
    buffered: int = 0
    repeated: int = 0  # announced again (duplicate or replayed events): already in the window's run
    filtered: int = 0  # not an image key, or irlive's own output
    foreign: int = 0  # a bucket outside IRLIVE_EVENT_BUCKETS
    tests: int = 0
    other: int = 0
    unparseable: int = 0
    chunks: int = 0

    def line(self) -> str:
        return (f"messages {self.messages}: {self.created} objects created, {self.buffered} buffered, "
                f"{self.repeated} again, {self.filtered} not images, {self.foreign} other buckets, "
                f"{self.tests} test events, {self.other} other events, {self.unparseable} unreadable | "
                f"{self.chunks} chunks sent")


class Listener:
    """Receives, buffers, deletes; flushes full calls (and waited-out images) to the events queue."""

    def __init__(self, queue: EventQueue, intake: Intake, app: Celery, *, source: str, output: S3Location,
                 suffixes: tuple[str, ...], buckets: tuple[str, ...], json_lines: bool = False,
                 out: TextIO = sys.stdout, status: TextIO = sys.stderr) -> None:
        self._queue = queue
        self._intake = intake
        self._app = app
        self._source = source
        self._output = output
        self._suffixes = suffixes
        self._buckets = set(buckets)
        self._json = json_lines
        self._out = out
        self._status = status
        self._flush_lock = threading.Lock()
        self.stats = ListenStats()

    def run(self, stop: threading.Event, wait_s: int = 5) -> ListenStats:
        """Until `stop` is set: the message in hand is finished (buffered and deleted) before returning."""
        flusher = threading.Thread(target=self._flush_loop, args=(stop,), name="irlive-flush", daemon=True)
        flusher.start()
        failures = 0
        while not stop.is_set():
            try:
                self.handle(self._queue.receive(wait_s=wait_s))
                failures = 0
            except IrliveError as exc:
                failures += 1
                self._emit({"error": redact(str(exc))})
                stop.wait(_RECEIVE_BACKOFF.delay(failures))
        flusher.join(timeout=10)
        self.flush()
        return self.stats

    def handle(self, messages: list[Message]) -> None:
        """Buffer what each message announces, then delete the messages that are safely buffered."""
        if not messages:
            return
        done: list[Message] = []
        for message in messages:
            self.stats.messages += 1
            try:
                parsed = parse_message(message.body)
            except Unparseable as exc:
                # Not deleted: SQS hands it out again and, after maxReceiveCount, to the dead-letter queue.
                self.stats.unparseable += 1
                self._emit({"unreadable_message": message.message_id, "why": str(exc),
                            "received": message.receive_count})
                continue
            self.stats.tests += parsed.tests
            self.stats.other += parsed.other
            self.stats.created += len(parsed.created)
            wanted = [o for o in parsed.created if self._wanted(o)]
            if wanted:
                try:
                    added, repeated = self._intake.add(wanted, source=self._source, output=str(self._output))
                except ValueError as exc:
                    self._emit({"not_buffered": message.message_id, "why": str(exc)})
                    continue
                self.stats.buffered += added
                self.stats.repeated += repeated
            done.append(message)
        refused = self._queue.delete(done)
        if refused:
            self._emit({"delete_refused": refused})
        self.flush()
        self._emit({})

    def flush(self) -> None:
        """Send every chunk that is due (any listener or the watchdog may; the buffer is shared in Redis)."""
        with self._flush_lock:
            for chunk in self._intake.flush():
                send_chunk(self._app, chunk)
                self.stats.chunks += 1

    def _wanted(self, obj: EventObject) -> bool:
        if self._buckets and obj.bucket not in self._buckets:
            self.stats.foreign += 1
            log.info("ignoring an event of bucket %s (not in IRLIVE_EVENT_BUCKETS)", obj.bucket)
            return False
        exclude = self._output.key("runs") if obj.bucket == self._output.bucket else None
        if not is_image_key(obj.key, self._suffixes, exclude):
            self.stats.filtered += 1
            return False
        return True

    def _flush_loop(self, stop: threading.Event) -> None:
        while not stop.wait(FLUSH_EVERY_S):
            try:
                before = self.stats.chunks
                self.flush()
                if self.stats.chunks != before:
                    self._emit({})
            except IrliveError as exc:
                self._emit({"error": redact(str(exc))})

    def _emit(self, extra: dict[str, Any]) -> None:
        if self._json:
            doc = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **asdict(self.stats), **extra}
            self._out.write(json.dumps(doc, sort_keys=True) + "\n")
            self._out.flush()
        elif extra:
            self._status.write(f"irlive listen: {json.dumps(extra, sort_keys=True)}\n")
        if self._status.isatty():
            self._status.write("\r" + self.stats.line())
            self._status.flush()
