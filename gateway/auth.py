"""Who is asking, and whether they may see what they ask for (SPEC §4).

`auth.kind`:

* ``none`` (the embedded default, for loopback): every request is `anonymous`.
* ``jwt``: every request but the public ones carries ``Authorization: Bearer <JWT>``; its
  `sub` is the owner. HS256 tokens are checked with `auth.jwt_secret` (or the file
  `auth.jwt_secret_file`), RS256 tokens with the issuer's keys from `auth.jwks_url` (fetched
  on first use, cached, fetched again for an unknown key id). `exp` and `sub` are required;
  `iss` / `aud` are checked when `auth.issuer` / `auth.audience` are set; `auth.leeway`
  seconds of clock skew are allowed. No token, or a bad one: 401 with
  ``WWW-Authenticate: Bearer``, one line.

Ownership: what a request creates belongs to its owner (uploads, transfers). A request for an
upload of another owner -- HEAD, PATCH, GET, DELETE, /status, /progress -- is answered 404
exactly as for an unknown id, before its handler runs (a PATCH of a stranger never takes the
upload's lock over). Transfers check their owner themselves (gateway/transfers.py).

A progress stream (`GET .../progress`, SSE or WebSocket) may carry the token as
``?access_token=`` instead: browsers' EventSource and WebSocket cannot send headers.

Public, without a token: OPTIONS (TUS discovery, CORS preflight), /healthz, /readyz,
/metrics, /openapi.json.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from gateway import errors
from gateway.errors import Handler
from gateway.settings import Settings, read_secret
from gateway.store.base import ANONYMOUS, StoreError, UploadGone
from gateway.tus.context import TUS

__all__ = ["AUTH", "Authenticator", "auth_middleware", "request_owner"]

log = logging.getLogger("tusgate.auth")

PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json"})
OWNER_KEY = web.RequestKey("owner", str)
MAX_SUB = 256  # characters of an owner id


class Authenticator:
    """Turns a request into its owner, per the settings (see the module docstring)."""

    def __init__(self, settings: Settings) -> None:
        self.kind: str = settings.auth_kind
        self.issuer = settings.auth_issuer or None
        self.audience = settings.auth_audience or None
        self.leeway = settings.auth_leeway
        self.secret = read_secret(
            settings.auth_jwt_secret, settings.auth_jwt_secret_file, "auth_jwt_secret_file"
        )
        self.jwks: Any = None
        if self.kind == "jwt":
            # PyJWT (and cryptography, ~8 MiB) only when tokens are checked.
            import jwt

            self._jwt: Any = jwt
            if settings.auth_jwks_url:
                self.jwks = jwt.PyJWKClient(
                    settings.auth_jwks_url, cache_keys=True, lifespan=600, timeout=10
                )

    @property
    def checks_owners(self) -> bool:
        return self.kind == "jwt"

    async def owner(self, request: web.Request) -> str:
        if self.kind == "none":
            return ANONYMOUS
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip()
        if not scheme and _may_use_query_token(request):
            scheme, token = "bearer", request.query.get("access_token", "").strip()
        if scheme.lower() != "bearer" or not token:
            raise errors.UNAUTHORIZED.error("no bearer token")
        claims = await self._verify(token)
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or len(sub) > MAX_SUB or not sub.isprintable():
            raise errors.UNAUTHORIZED.error("the token's sub is not a usable owner id")
        return sub

    async def _verify(self, token: str) -> dict[str, Any]:
        jwt = self._jwt
        try:
            algorithm = jwt.get_unverified_header(token).get("alg")
            key: Any
            if algorithm == "HS256" and self.secret:
                key = self.secret
            elif algorithm == "RS256" and self.jwks is not None:
                # The first token of a new key id fetches the JWKS: blocking I/O, off the loop.
                key = (await asyncio.to_thread(self.jwks.get_signing_key_from_jwt, token)).key
            else:
                raise errors.UNAUTHORIZED.error(f"tokens signed with {algorithm!r} are not accepted")
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                issuer=self.issuer,
                audience=self.audience,
                leeway=self.leeway,
                options={"require": ["exp", "sub"], "verify_aud": self.audience is not None},
            )
        except jwt.PyJWKClientConnectionError as exc:
            log.warning("cannot fetch the JWKS: %s", exc)
            raise errors.AUTH_UNAVAILABLE.error() from None
        except (jwt.PyJWTError, jwt.PyJWKClientError) as exc:
            raise errors.UNAUTHORIZED.error(str(exc)[:120] or type(exc).__name__) from None
        return claims


def _may_use_query_token(request: web.Request) -> bool:
    """A browser's EventSource and WebSocket cannot send an Authorization header, so a progress
    stream may carry the token as `?access_token=` (RFC 6750 §2.3) -- that route only."""
    return request.method == "GET" and request.path.endswith("/progress")


AUTH: web.AppKey[Authenticator] = web.AppKey("auth", Authenticator)


def request_owner(request: web.Request) -> str:
    """The owner of this request, as the auth middleware found it."""
    owner: str = request.get(OWNER_KEY, ANONYMOUS)
    return owner


def _is_public(request: web.Request) -> bool:
    if request.path in PUBLIC_PATHS or request.method == "OPTIONS":
        return True
    override = request.headers.get("X-HTTP-Method-Override", "")
    return request.method == "POST" and override.strip().upper() == "OPTIONS"


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    authenticator = request.app[AUTH]
    if _is_public(request):
        return await handler(request)
    owner = await authenticator.owner(request)
    request[OWNER_KEY] = owner
    upload_id = request.match_info.get("upload_id")
    if upload_id and authenticator.checks_owners:
        await _check_upload_owner(request, upload_id, owner)
    return await handler(request)


async def _check_upload_owner(request: web.Request, upload_id: str, owner: str) -> None:
    """404 for an upload of someone else, before its handler can do anything with it."""
    try:
        info = await request.app[TUS].store.core.get_info(upload_id)
    except UploadGone as exc:
        if exc.owner is not None and exc.owner != owner:
            raise errors.NOT_FOUND.error() from None  # its 410 is its owner's to see
        return
    except StoreError:
        return  # unknown or unreachable: the handler answers that, the same for anyone
    if info.owner != owner:
        raise errors.NOT_FOUND.error()
