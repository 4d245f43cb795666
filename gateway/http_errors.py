"""One-line answers for requests aiohttp refuses before any handler runs (SPEC §8).

A malformed request line or header (a bad method, a header over the size limit, broken
framing) never reaches the application, its middlewares or `gateway/errors.py`: aiohttp's
protocol answers it itself, with a body that spans several lines (the parser's message, a
caret under the offending byte). `OneLineErrorRunner` serves the app with a protocol whose
answer is one line -- ``400 Bad Request: Invalid method encountered`` -- like every other
refusal of the gateway. Status, logging and connection handling stay aiohttp's.

aiohttp offers no hook for this; the runner swaps the class of the connection factory that
`AppRunner` builds (`_make_server`), and tests/cli pin the behaviour against the real server.
"""

from __future__ import annotations

from http import HTTPStatus

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

__all__ = ["OneLineErrorRunner", "one_line"]

MAX_REASON = 200


def one_line(status: int, message: str | None) -> str:
    """`400 Bad Request: <first line of the parser's message>`, at most MAX_REASON chars."""
    try:
        title = f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        title = str(status)
    lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
    if not lines or status >= 500:  # a server error's details are for the log, not the client
        return title
    reason = lines[0].rstrip(":")
    return f"{title}: {reason}"[:MAX_REASON]


class _OneLineRequestHandler(RequestHandler):
    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; raises if already answered
        response = web.Response(status=status, text=one_line(status, message) + "\n")
        response.force_close()
        return response


class _OneLineServer(Server):
    def __call__(self) -> RequestHandler:
        return _OneLineRequestHandler(self, loop=self._loop, **self._kwargs)


class OneLineErrorRunner(web.AppRunner):
    """`web.AppRunner` whose connections answer unparseable requests in one line."""

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        server.__class__ = _OneLineServer  # same state, our connection factory
        return server
