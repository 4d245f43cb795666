"""Routing of the TUS endpoint: one handler per method, `X-HTTP-Method-Override` honoured.

"The X-HTTP-Method-Override request header MUST be a string which MUST be interpreted as the
request's method by the Server, if the header is presented" -- on POST, so that environments
that only send GET and POST can still PATCH and DELETE.
"""

from __future__ import annotations

from aiohttp import web

from gateway import errors
from gateway.errors import Handler
from gateway.tus.delete import handle_delete
from gateway.tus.get import handle_get
from gateway.tus.head import handle_head
from gateway.tus.headers import require_tus_resumable
from gateway.tus.ietf_draft import is_draft_request, serve_draft
from gateway.tus.options import handle_options
from gateway.tus.patch import handle_patch
from gateway.tus.post import handle_post

__all__ = ["add_tus_routes"]


COLLECTION: dict[str, Handler] = {"POST": handle_post, "OPTIONS": handle_options}
RESOURCE: dict[str, Handler] = {
    "HEAD": handle_head,
    "PATCH": handle_patch,
    "DELETE": handle_delete,
    "GET": handle_get,
    "OPTIONS": handle_options,
}


def effective_method(request: web.Request) -> str:
    override = request.headers.get("X-HTTP-Method-Override")
    if request.method == "POST" and override:
        return override.strip().upper()
    return request.method


def _dispatcher(table: dict[str, Handler]) -> Handler:
    async def dispatch(request: web.Request) -> web.StreamResponse:
        method = effective_method(request)
        handler = table.get(method)
        if handler is None:
            raise errors.METHOD_NOT_ALLOWED.error(method[:16])
        if is_draft_request(request) and method not in ("OPTIONS", "GET"):
            return await serve_draft(request, method, handler)  # the IETF draft, translated
        # OPTIONS ignores Tus-Resumable; GET is a plain download that browsers make too.
        if method not in ("OPTIONS", "GET"):
            require_tus_resumable(request.headers.get("Tus-Resumable"))
        return await handler(request)

    return dispatch


def add_tus_routes(app: web.Application, base_path: str) -> None:
    app.router.add_route("*", base_path, _dispatcher(COLLECTION))
    app.router.add_route("*", base_path.rstrip("/"), _dispatcher(COLLECTION))
    app.router.add_route("*", base_path + "{upload_id}", _dispatcher(RESOURCE))
