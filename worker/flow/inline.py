"""An Executor that runs each call in the caller's thread, when its result is first asked for.

For work that need not go to threads: a chunk's validation reads when S3 answers at once (handing each read
to a thread and back costs more CPU than the read), and seeded tests that must keep one order of events. A call
cancelled before its result is asked for never runs.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

T = TypeVar("T")


class InlineExecutor(Executor):
    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        return _Deferred(lambda: fn(*args, **kwargs))


class _Deferred(Future[T]):
    def __init__(self, call: Callable[[], T]) -> None:
        super().__init__()
        self._call: Callable[[], T] | None = call

    def result(self, timeout: float | None = None) -> T:
        self._run()
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._run()
        return super().exception(timeout)

    def _run(self) -> None:
        if self._call is None:
            return
        call, self._call = self._call, None
        if self.set_running_or_notify_cancel():
            try:
                self.set_result(call())
            except BaseException as exc:
                self.set_exception(exc)
