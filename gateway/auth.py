"""Who is asking. Until authentication lands every request is `anonymous`; this is the one seam
that will read the bearer token, and the only place that decides a request's owner."""

from __future__ import annotations

from aiohttp import web

from gateway.store.base import ANONYMOUS

__all__ = ["request_owner"]


def request_owner(request: web.Request) -> str:
    return ANONYMOUS
