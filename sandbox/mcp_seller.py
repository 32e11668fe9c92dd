"""The sandbox's MCP endpoint: the liveness tool on the SDK's streamable HTTP server, bridged into the stdlib server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
import mcp_types as types
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

from sandbox import selling
from sandbox.config import SERVICE_ID

__all__ = ["MCP_PATH", "TOOL_NAME", "McpEndpoint", "Reply"]

MCP_PATH = "/mcp"
TOOL_NAME = "infrared_face_liveness_detection"
_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 5.0
INPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "Tasks": {
            "description": "1 to 10 images to judge, each {ImageURL}; may also be that list as a JSON string",
            "anyOf": [
                {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 10,
                    "items": {
                        "type": "object",
                        "properties": {"ImageURL": {"type": "string"}},
                        "required": ["ImageURL"],
                    },
                },
                {"type": "string"},
            ],
        },
        "paymentToken": {
            "type": "string",
            "description": "a token from POST /api/payments for this service; it pays for exactly one call",
        },
    },
    # paymentToken is not required by the schema: a call without one is answered with what to pay, as a 402 is.
    "required": ["Tasks"],
}


def _tool() -> types.Tool:
    return types.Tool(
        name=TOOL_NAME,
        description="Infrared face liveness detection (Alibaba Cloud DetectInfraredLivingFace); USD 0.20 per call",
        input_schema=INPUT_SCHEMA,
    )


def tool_result(answer: selling.Answer) -> types.CallToolResult:
    """The HTTP answer as a tool result: the same body as text, parsed when it is a JSON object, the HTTP
    status in _meta, and every non-2xx (a payment required among them) an error result."""
    data = b"".join(answer.body.pieces)
    text = data.decode("utf-8", errors="replace")
    structured = answer.doc if isinstance(answer.doc, dict) else _object_or_none(text)
    return types.CallToolResult(
        content=[types.TextContent(text=text)],
        structured_content=structured,
        is_error=not 200 <= answer.status < 300,
        _meta={"httpStatus": answer.status},
    )


def _object_or_none(text: str) -> dict[str, Any] | None:
    """A JSON object that survives strict re-encoding; the hostile answer modes (NaN, lone surrogates) stay text."""

    def refuse(token: str) -> Any:
        raise ValueError(token)

    try:
        doc = json.loads(text, parse_constant=refuse)
        json.dumps(doc, allow_nan=False).encode("utf-8")
    except (ValueError, RecursionError, UnicodeEncodeError):
        return None
    return doc if isinstance(doc, dict) else None


def build_server(state: selling.State, resource: str) -> Server[Any]:
    """The MCP server: one tool, paid by a marketplace token, served through the same call path as HTTP."""

    async def list_tools(
        ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return types.ListToolsResult(tools=[_tool()])

    async def call_tool(
        ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        if params.name != TOOL_NAME:
            unknown = types.TextContent(text=f"unknown tool {params.name!r}")
            return types.CallToolResult(content=[unknown], is_error=True)
        arguments = params.arguments or {}
        token = arguments.get("paymentToken")

        def call() -> selling.Answer:
            state.ledger.count("calls_total")
            state.ledger.count("mcp_calls")
            return selling.token_call(
                state,
                SERVICE_ID,
                token if isinstance(token, str) else None,
                lambda: {"Tasks": arguments.get("Tasks")},
                resource,
            )

        # The call blocks on image downloads and injected latency: off the event loop, like an HTTP handler thread.
        answer = await anyio.to_thread.run_sync(call)
        return tool_result(answer)

    return Server("irlive-sandbox", version="1", on_list_tools=list_tools, on_call_tool=call_tool)


@dataclass(frozen=True)
class Reply:
    """One ASGI response, as the stdlib handler writes it: status, headers, then body pieces."""

    status: int
    headers: list[tuple[str, str]]
    pieces: Iterator[bytes]


_END = object()


class McpEndpoint:
    """The SDK's stateless, JSON-answering streamable HTTP manager on an event loop of its own thread; the stdlib
    server hands it `/mcp` requests, so MCP shares the sandbox's port, state and lifetime without a second server."""

    def __init__(self, state: selling.State, resource: str) -> None:
        self._server = build_server(state, resource)
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._manager: StreamableHTTPSessionManager | None = None
        self._thread = threading.Thread(target=self._run, name="sandbox-mcp", daemon=True)

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self._ready.wait(0.05):
            if self._failed is not None or not self._thread.is_alive():
                raise RuntimeError("the MCP endpoint failed to start") from self._failed
            if time.monotonic() > deadline:
                raise TimeoutError("the MCP endpoint did not start in time")

    def stop(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            # The loop may close between the check and the call: then nothing is left to stop.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        if self._thread.is_alive():
            self._thread.join(_STOP_TIMEOUT_S)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # recorded for start(); a daemon thread has nobody else to tell
            self._failed = exc

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        # Stateless and JSON-only: every POST is one complete answer, so the bridge needs no SSE or sessions.
        manager = StreamableHTTPSessionManager(app=self._server, json_response=True, stateless=True)
        async with manager.run():
            self._manager = manager
            self._ready.set()
            await self._stop.wait()

    def handle(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> Reply:
        """Serve one HTTP request through the ASGI app; blocks the calling handler thread, not the loop."""
        loop, manager = self._loop, self._manager
        if loop is None or manager is None or loop.is_closed():
            return _unavailable()
        out: queue.Queue[Any] = queue.Queue()
        path, _, query = target.partition("?")
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode("latin-1"),
            "root_path": "",
            "query_string": query.encode("latin-1"),
            "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
            "client": ("127.0.0.1", 0),
            "server": ("127.0.0.1", 0),
        }
        try:
            asyncio.run_coroutine_threadsafe(_asgi(manager, scope, body, out), loop)
        except RuntimeError:
            return _unavailable()
        first = out.get()
        if first is _END:
            return _unavailable()
        status, raw_headers, piece, more = first
        response_headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw_headers]
        return Reply(status, response_headers, _pieces(piece, more, out))


def _pieces(first: bytes, more: bool, out: queue.Queue[Any]) -> Iterator[bytes]:
    if first:
        yield first
    while more:
        item = out.get()
        if item is _END:
            return
        piece, more = item
        if piece:
            yield piece


async def _asgi(
    manager: StreamableHTTPSessionManager, scope: dict[str, Any], body: bytes, out: queue.Queue[Any]
) -> None:
    """Run the ASGI app for one request; `out` gets (status, headers, first body, more) then (body, more), then _END."""
    finished = asyncio.Event()
    sent_body = False
    start: dict[str, Any] | None = None

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        # The client stays connected until the answer is written; then it is gone.
        await finished.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal start
        if message["type"] == "http.response.start":
            start = message
            return
        if message["type"] != "http.response.body":
            return
        piece, more = bytes(message.get("body", b"")), bool(message.get("more_body", False))
        if start is not None:
            out.put((int(start["status"]), list(start.get("headers", [])), piece, more))
            start = None
        else:
            out.put((piece, more))
        if not more:
            finished.set()

    try:
        await manager.handle_request(scope, receive, send)  # type: ignore[arg-type]
    except Exception:
        # Like the HTTP handler's 500: the trace goes to stderr; request bodies and headers are not in it.
        traceback.print_exc(file=sys.stderr)
    finally:
        finished.set()
        out.put(_END)


def _unavailable() -> Reply:
    payload = b'{"error": "the MCP endpoint is not running"}'
    return Reply(503, [("Content-Type", "application/json")], iter((payload,)))
