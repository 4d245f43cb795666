"""Token providers: static tokens, azure-identity credentials, and their failures."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Self

import httpx
import pytest
from azure.core.credentials import AccessToken
from azure.core.exceptions import ClientAuthenticationError, ServiceRequestError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from processing.destinations import (
    AzureCredentialTokenProvider,
    DestinationUnavailable,
    StaticTokenProvider,
    Unauthorized,
    build_token_provider,
)
from processing.destinations.graph_auth import BearerAuth, default_scope


class FakeCredential:
    """The azure-identity async credential interface, without Azure."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.scopes: list[tuple[str, ...]] = []
        self.closed = False

    async def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        self.scopes.append(scopes)
        if self.error is not None:
            raise self.error
        return AccessToken("from-azure", 2_000_000_000)

    async def close(self) -> None:
        self.closed = True

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def test_static_token_is_not_shown() -> None:
    provider = StaticTokenProvider("s3cret")
    assert await provider.get_token() == "s3cret"
    assert "s3cret" not in repr(provider)
    with pytest.raises(ValueError):
        StaticTokenProvider("")


async def test_azure_credential_tokens_and_errors() -> None:
    credential = FakeCredential()
    provider = AzureCredentialTokenProvider(
        credential, scopes=["https://graph.microsoft.com/.default"]
    )
    assert await provider.get_token() == "from-azure"
    assert credential.scopes == [("https://graph.microsoft.com/.default",)]
    await provider.aclose()
    assert credential.closed

    rejected = AzureCredentialTokenProvider(
        FakeCredential(ClientAuthenticationError("bad secret")), scopes=["s"]
    )
    with pytest.raises(Unauthorized) as caught:
        await rejected.get_token()
    assert not caught.value.retryable
    offline = AzureCredentialTokenProvider(
        FakeCredential(ServiceRequestError("no route")), scopes=["s"]
    )
    with pytest.raises(DestinationUnavailable) as unavailable:
        await offline.get_token()
    assert unavailable.value.retryable


async def test_bearer_auth_adds_the_header() -> None:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("Authorization"))
        return httpx.Response(200)

    async with httpx.AsyncClient(
        transport=httpx.MockTransport(handler), auth=BearerAuth(StaticTokenProvider("t"))
    ) as client:
        await client.get("https://graph.example/v1.0/me")
    assert seen == ["Bearer t"]


def test_default_scope_follows_the_graph_host() -> None:
    assert (
        default_scope("https://graph.microsoft.com/v1.0") == "https://graph.microsoft.com/.default"
    )
    assert (
        default_scope("https://microsoftgraph.chinacloudapi.cn/v1.0")
        == "https://microsoftgraph.chinacloudapi.cn/.default"
    )


def self_signed_pem(path: Path) -> None:
    """A throwaway key + certificate, as CertificateCredential reads one at construction."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tusgate-test")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.write_bytes(key_pem + certificate.public_bytes(serialization.Encoding.PEM))


async def test_build_token_provider_picks_the_credential(tmp_path: Path) -> None:
    base = "https://graph.microsoft.com/v1.0"
    assert isinstance(build_token_provider(base_url=base, token="t"), StaticTokenProvider)
    self_signed_pem(tmp_path / "cert.pem")
    cases: list[tuple[dict[str, str], str]] = [
        ({"tenant_id": "t", "client_id": "c", "client_secret": "s"}, "ClientSecretCredential"),
        (
            {"tenant_id": "t", "client_id": "c", "certificate_path": str(tmp_path / "cert.pem")},
            "CertificateCredential",
        ),
        ({}, "DefaultAzureCredential"),
    ]
    for kwargs, name in cases:
        provider = build_token_provider(base_url=base, **kwargs)
        assert isinstance(provider, AzureCredentialTokenProvider)
        assert name in repr(provider)
        await provider.aclose()
    with pytest.raises(ValueError, match="tenant_id and client_id"):
        build_token_provider(base_url=base, client_secret="s")
