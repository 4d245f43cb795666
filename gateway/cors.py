"""CORS for browser clients: every TUS header (and the IETF draft's) is allowed and exposed.

Preflights are answered by a middleware before any TUS rule applies; the allow/expose headers of
ordinary responses are added in `on_response_prepare`, so streamed responses (GET) get them too.
"""

from __future__ import annotations

from aiohttp import web

from gateway.errors import Handler

__all__ = ["setup_cors"]

TUS_HEADERS = (
    "Tus-Resumable, Tus-Version, Tus-Extension, Tus-Max-Size, Tus-Checksum-Algorithm, "
    "Upload-Offset, Upload-Length, Upload-Defer-Length, Upload-Metadata, Upload-Concat, "
    "Upload-Expires, Upload-Checksum, Location, X-HTTP-Method-Override, X-Request-ID, "
    "Authorization, Prefer, Progress-Location, Preference-Applied, Content-Type, "
    "Content-Disposition, Content-Range, Range, Upload-Draft-Interop-Version, Upload-Complete"
)
METHODS = "POST, GET, HEAD, PATCH, DELETE, OPTIONS"



def setup_cors(app: web.Application, allowed: str) -> None:
    origins = {o.strip() for o in allowed.split(",") if o.strip()}

    def allow(request: web.Request) -> str | None:
        origin = request.headers.get("Origin")
        if not origin:
            return None
        return origin if "*" in origins or origin in origins else None

    @web.middleware
    async def preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = allow(request)
        if origin and request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            return web.Response(
                status=204,
                headers={
                    "Access-Control-Allow-Origin": origin,
                    "Access-Control-Allow-Methods": METHODS,
                    "Access-Control-Allow-Headers": TUS_HEADERS,
                    "Access-Control-Max-Age": "86400",
                    "Vary": "Origin",
                },
            )
        return await handler(request)

    async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
        origin = allow(request)
        if origin and "Access-Control-Allow-Origin" not in response.headers:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = TUS_HEADERS
            response.headers["Vary"] = "Origin"

    app.middlewares.append(preflight)
    app.on_response_prepare.append(add_headers)
