"""Turning a Completion (what processing said) into the response of the completing request."""

from __future__ import annotations

import json

from aiohttp import web

from gateway.lifecycle import Completion

__all__ = ["completion_response"]


def completion_response(
    success_status: int, headers: dict[str, str], completion: Completion | None
) -> web.Response:
    """`success_status` (201 POST / 204 PATCH) unless the completion says otherwise."""
    if completion is None:
        return web.Response(status=success_status, headers=headers)
    headers = {**headers, **completion.headers}
    if completion.problem is not None:
        return web.Response(
            status=completion.status or 422,
            headers=headers,
            body=json.dumps(completion.problem).encode(),
            content_type="application/problem+json",
        )
    if completion.accepted and success_status != 201:
        return web.Response(status=202, headers=headers)
    return web.Response(status=completion.status or success_status, headers=headers)
