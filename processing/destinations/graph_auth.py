"""Bearer tokens for Microsoft Graph: a static token or an azure-identity credential.

A :class:`TokenProvider` hands out an access token for each API call; :class:`BearerAuth`
puts it on requests of the Graph client only. The upload client (``uploadUrl`` PUTs) never
sees it: "Only send the Authorization header and bearer token when issuing the POST during the
first step. Don't include it when you issue the PUT call." (driveItem: createUploadSession).

azure-identity credentials cache their tokens and refresh them before they expire, so asking
for a token per request is cheap. Their failures are translated here: a rejected credential is
:class:`~.errors.Unauthorized` (not retryable), an unreachable identity endpoint is
:class:`~.errors.DestinationUnavailable` (retryable).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator, Sequence
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

import httpx

from .errors import DestinationUnavailable, Unauthorized

if TYPE_CHECKING:
    from azure.core.credentials_async import AsyncTokenCredential

__all__ = [
    "AzureCredentialTokenProvider",
    "BearerAuth",
    "StaticTokenProvider",
    "TokenProvider",
    "build_token_provider",
    "default_scope",
]


def default_scope(base_url: str) -> str:
    """The ``.default`` scope of the Graph host in ``base_url`` (national clouds included)."""
    parts = urlsplit(base_url)
    return f"{parts.scheme}://{parts.netloc}/.default"


class TokenProvider(Protocol):
    async def get_token(self) -> str:
        """A currently valid access token (raise a DeliveryError when none can be had)."""
        ...

    async def aclose(self) -> None: ...


class StaticTokenProvider:
    """A fixed token (``TUSGATE_GRAPH_TOKEN``): tests and Graph-compatible proxies."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("static Graph token must not be empty")
        self._token = token

    def __repr__(self) -> str:
        return "StaticTokenProvider(token=***)"

    async def get_token(self) -> str:
        return self._token

    async def aclose(self) -> None:
        return None


class AzureCredentialTokenProvider:
    """Tokens from an azure-identity async credential (secret, certificate, managed identity)."""

    def __init__(self, credential: AsyncTokenCredential, *, scopes: Sequence[str]) -> None:
        if not scopes:
            raise ValueError("at least one scope is required")
        self._credential = credential
        self._scopes = tuple(scopes)

    def __repr__(self) -> str:
        return f"AzureCredentialTokenProvider({type(self._credential).__name__}, scopes={self._scopes})"

    async def get_token(self) -> str:
        from azure.core.exceptions import AzureError, ClientAuthenticationError

        try:
            token = await self._credential.get_token(*self._scopes)
        except ClientAuthenticationError as exc:
            raise Unauthorized(f"Graph credential rejected: {exc.message}") from exc
        except AzureError as exc:
            raise DestinationUnavailable(f"cannot obtain a Graph token: {exc.message}") from exc
        return token.token

    async def aclose(self) -> None:
        await self._credential.close()


def build_token_provider(
    *,
    base_url: str,
    token: str | None = None,
    tenant_id: str | None = None,
    client_id: str | None = None,
    client_secret: str | None = None,
    certificate_path: str | None = None,
    certificate_password: str | None = None,
    scopes: Sequence[str] | None = None,
) -> TokenProvider:
    """Pick the credential from what is configured (the caller reads env/config, not us).

    Order: a static ``token``; ``client_secret`` (ClientSecretCredential); ``certificate_path``
    (CertificateCredential); otherwise DefaultAzureCredential (environment, workload/managed
    identity, Azure CLI ...). The scope defaults to ``<graph host>/.default``.
    """
    if token:
        return StaticTokenProvider(token)
    from azure.identity.aio import (
        CertificateCredential,
        ClientSecretCredential,
        DefaultAzureCredential,
    )

    scopes = tuple(scopes or (default_scope(base_url),))
    credential: AsyncTokenCredential
    if client_secret or certificate_path:
        if not tenant_id or not client_id:
            raise ValueError(
                "tenant_id and client_id are required with a client secret or certificate"
            )
        if client_secret:
            credential = ClientSecretCredential(tenant_id, client_id, client_secret)
        else:
            credential = CertificateCredential(
                tenant_id, client_id, certificate_path, password=certificate_password
            )
    else:
        credential = DefaultAzureCredential()
    return AzureCredentialTokenProvider(credential, scopes=scopes)


class BearerAuth(httpx.Auth):
    """httpx auth flow adding ``Authorization: Bearer <token>`` from a TokenProvider."""

    requires_request_body = False
    requires_response_body = False

    def __init__(self, provider: TokenProvider) -> None:
        self._provider = provider

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        raise RuntimeError("BearerAuth works with httpx.AsyncClient only")

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        request.headers["Authorization"] = f"Bearer {await self._provider.get_token()}"
        yield request
