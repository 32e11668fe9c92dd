"""The marketplace's MCP tool as the transport of a paid call: the mcp SDK's client over streamable HTTP, and the
only place that catches its errors.

The token is bought and reconciled exactly as for an HTTP call (POST /api/payments); only the call goes through
`tools/call` with `paymentToken`. The tool's answer is read back into the HTTP answer it stands for (its status
and body), so the marketplace client classifies both the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import anyio
import httpx2
import mcp_types as types
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from worker.errors import ConfigError, IrliveError, OutcomeUnknown, TransientError

MCP_PATH = "/mcp"
TOOL_NAME = "infrared_face_liveness_detection"
# A tool error whose answer carries no HTTP status: one asking for payment reads as a 402, any other as a 502
# (classified by its upstream Code first, like an HTTP error answer).
_PAYMENT_FIELDS = ("accepts", "x402Version")


@dataclass(frozen=True)
class ToolReply:
    """What the tool answered, as the HTTP answer it stands for."""

    status: int
    raw: bytes


class McpTool:
    """Calls the liveness tool over MCP; one per worker process, thread-safe (a session per call)."""

    def __init__(self, base_url: str, *, headers: dict[str, str], timeout_s: float) -> None:
        self.url = base_url.rstrip("/") + MCP_PATH
        self._headers = dict(headers)
        self._timeout_s = timeout_s
        # Read and written by several threads: at worst two first calls both list the tools.
        self._listed = False

    def call(self, token: str, urls: list[str]) -> ToolReply:
        """One paid call. TransientError before the call left; OutcomeUnknown once it may have been paid."""
        arguments = {"Tasks": [{"ImageURL": u} for u in urls], "paymentToken": token}
        got: list[types.CallToolResult] = []
        sent = False

        async def session() -> None:
            nonlocal sent
            timeout = httpx2.Timeout(self._timeout_s, connect=min(self._timeout_s, 10.0))
            # Bounded as a whole: the SDK's own timeouts are per read, and a call may not hang a worker thread.
            with anyio.fail_after(3 * self._timeout_s + 10):
                async with httpx2.AsyncClient(headers=self._headers, timeout=timeout) as http, \
                        streamable_http_client(self.url, http_client=http) as (read, write), \
                        ClientSession(read, write) as mcp:
                    await mcp.initialize()
                    if not self._listed:
                        await self._find_tool(mcp)
                    sent = True
                    got.append(await mcp.call_tool(TOOL_NAME, arguments, read_timeout_seconds=self._timeout_s))

        try:
            anyio.run(session)
        except IrliveError:
            raise
        except Exception as exc:
            ours = _irlive_error_in(exc)
            if ours is not None:
                # Raised inside the SDK's task groups, which wrap it in exception groups.
                raise ours from None
            # Neither the SDK's nor httpx2's text is kept: it may quote the request (the token is in it). With an
            # answer in hand only closing the session failed: the answer stands.
            if not got and sent:
                raise OutcomeUnknown(f"marketplace MCP call failed after it was sent: {_names(exc)}") from None
            if not got:
                raise TransientError(f"marketplace MCP endpoint unreachable: {_names(exc)}") from None
        return reply_of(got[0])

    async def _find_tool(self, mcp: ClientSession) -> None:
        listed = await mcp.list_tools()
        tool = next((t for t in listed.tools if t.name == TOOL_NAME), None)
        if tool is None:
            raise ConfigError(f"the marketplace's MCP endpoint ({self.url}) lists no tool {TOOL_NAME!r}: check "
                              "IRLIVE_MARKETPLACE_URL, or use IRLIVE_PAYMENT_METHOD=token")
        properties = (tool.input_schema or {}).get("properties", {})
        if "Tasks" not in properties or "paymentToken" not in properties:
            raise ConfigError(f"the MCP tool {TOOL_NAME!r} takes no Tasks and paymentToken (its input schema "
                              f"names {sorted(properties)}): irlive cannot call it")
        self._listed = True


def reply_of(result: types.CallToolResult) -> ToolReply:
    """The tool result as the HTTP answer it stands for: its text (or structured content) and status."""
    text = "".join(c.text for c in result.content if isinstance(c, types.TextContent))
    if not text and result.structured_content is not None:
        text = json.dumps(result.structured_content)
    status = (result.meta or {}).get("httpStatus")
    if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
        status = _status_of(bool(result.is_error), text)
    return ToolReply(status, text.encode("utf-8", errors="replace"))


def _status_of(is_error: bool, text: str) -> int:
    if not is_error:
        return 200
    try:
        doc: Any = json.loads(text)
    except ValueError:
        return 502
    if isinstance(doc, dict) and any(f in doc for f in _PAYMENT_FIELDS):
        return 402
    return 502


def _irlive_error_in(exc: BaseException) -> IrliveError | None:
    if isinstance(exc, IrliveError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _irlive_error_in(inner)
            if found is not None:
                return found
    return None


def _names(exc: BaseException) -> str:
    """The exception's type, and those inside an exception group: what failed, never the text."""
    if isinstance(exc, BaseExceptionGroup):
        return "/".join(sorted({_names(e) for e in exc.exceptions}))
    return type(exc).__name__
