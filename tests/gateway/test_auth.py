"""Bearer JWT authentication and ownership (SPEC §4), through the real gateway on a socket.

HS256 with a shared secret, and RS256 with keys served as a JWKS by a local HTTP server.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.gateway.conftest import OCTET, TUS, ClientFactory

SECRET = "a-test-secret-of-at-least-32-bytes!!"
ISSUER = "https://id.example.test/"
AUDIENCE = "tusgate"


def token(sub: str | None = "alice", *, key: Any = SECRET, alg: str = "HS256", **claims: Any) -> str:
    payload: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "exp": time.time() + 300}
    if sub is not None:
        payload["sub"] = sub
    payload.update(claims)
    headers = {"kid": claims.pop("kid")} if "kid" in claims else None
    payload.pop("kid", None)
    return jwt.encode(payload, key, algorithm=alg, headers=headers)


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


@pytest.fixture
async def client(make_client: ClientFactory) -> TestClient[Any, Any]:
    return await make_client(
        auth_kind="jwt", auth_jwt_secret=SECRET, auth_issuer=ISSUER, auth_audience=AUDIENCE
    )


async def create(client: TestClient[Any, Any], owner_token: str, size: int = 5) -> str:
    resp = await client.post("/files/", headers={**TUS, "Upload-Length": str(size), **bearer(owner_token)})
    assert resp.status == 201, await resp.text()
    return "/files/" + resp.headers["Location"].rsplit("/", 1)[1]


async def test_no_token_is_401_with_a_bearer_challenge(client: TestClient[Any, Any]) -> None:
    resp = await client.post("/files/", headers={**TUS, "Upload-Length": "5"})
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    text = await resp.text()
    assert text.count("\n") == 1 and "bearer token" in text
    # Discovery and operations stay public.
    assert (await client.options("/files/")).status in (200, 204)
    for path in ("/healthz", "/metrics", "/openapi.json"):
        assert (await client.get(path)).status == 200, path


@pytest.mark.parametrize(
    "bad",
    [
        token(key="another-secret-of-at-least-32-bytes!!"),
        token(exp=time.time() - 3600),
        token(iss="https://elsewhere.test/"),
        token(aud="someone-else"),
        token(sub=None),
        token(sub=""),
        jwt.encode({"sub": "alice", "exp": time.time() + 60}, None, algorithm="none"),
        "not.a.jwt",
    ],
    ids=["signature", "expired", "issuer", "audience", "no-sub", "empty-sub", "alg-none", "garbage"],
)
async def test_bad_tokens_are_401(client: TestClient[Any, Any], bad: str) -> None:
    resp = await client.post("/files/", headers={**TUS, "Upload-Length": "5", **bearer(bad)})
    assert resp.status == 401, await resp.text()
    assert (await resp.text()).count("\n") == 1


async def test_an_upload_is_invisible_to_anyone_but_its_owner(client: TestClient[Any, Any]) -> None:
    alice, bob = token("alice"), token("bob")
    path = await create(client, alice)
    patch_headers = {**OCTET, "Upload-Offset": "0"}
    for method, extra, body in [
        ("HEAD", TUS, None),
        ("PATCH", patch_headers, b"hello"),
        ("GET", {}, None),
        ("DELETE", TUS, None),
    ]:
        resp = await client.request(method, path, headers={**extra, **bearer(bob)}, data=body)
        assert resp.status == 404, (method, resp.status)
    for suffix in ("/status", "/progress"):
        assert (await client.get(path + suffix, headers=bearer(bob))).status == 404
    # Nothing of it changed; its owner goes on.
    head = await client.head(path, headers={**TUS, **bearer(alice)})
    assert head.status == 200 and head.headers["Upload-Offset"] == "0"
    resp = await client.patch(path, data=b"hello", headers={**patch_headers, **bearer(alice)})
    assert resp.status == 204
    assert await (await client.get(path, headers=bearer(alice))).read() == b"hello"
    status = await (await client.get(path + "/status", headers=bearer(alice))).json()
    assert status["owner"] == "alice"
    # An unknown id and another's id look the same.
    unknown = "/files/" + "0" * 32
    a = await client.head(unknown, headers={**TUS, **bearer(bob)})
    b = await client.head(path, headers={**TUS, **bearer(bob)})
    assert a.status == b.status == 404


async def test_a_gone_upload_is_410_for_its_owner_and_404_for_anyone_else(
    client: TestClient[Any, Any],
) -> None:
    from gateway.tus.context import TUS as TUS_CONTEXT

    path = await create(client, token("alice"))
    lister = client.server.app[TUS_CONTEXT].store.lister
    assert lister is not None
    assert await lister.discard_bytes(path.rsplit("/", 1)[1], "expired")
    assert (await client.head(path, headers={**TUS, **bearer(token("alice"))})).status == 410
    assert (await client.head(path, headers={**TUS, **bearer(token("bob"))})).status == 404
    assert (await client.get(path, headers=bearer(token("bob")))).status == 404


async def test_a_progress_stream_takes_the_token_from_the_query(
    client: TestClient[Any, Any],
) -> None:
    """Browsers' EventSource cannot send headers: ?access_token= works there, and only there."""
    alice = token("alice")
    path = await create(client, alice, size=0)  # complete at once: the stream ends by itself
    assert (await client.get(path + "/progress")).status == 401
    assert (await client.get(f"{path}/progress?access_token={token('bob')}")).status == 404
    resp = await client.get(f"{path}/progress?access_token={alice}")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    resp.close()
    assert (await client.get(f"{path}/status?access_token={alice}")).status == 401


async def test_a_final_upload_cannot_use_anothers_partials(client: TestClient[Any, Any]) -> None:
    alice, bob = token("alice"), token("bob")
    resp = await client.post(
        "/files/", headers={**TUS, "Upload-Length": "3", "Upload-Concat": "partial", **bearer(alice)}
    )
    partial = resp.headers["Location"]
    resp = await client.post(
        "/files/", headers={**TUS, "Upload-Concat": f"final;{partial}", **bearer(bob)}
    )
    assert resp.status == 400


async def test_the_secret_can_come_from_a_file(make_client: ClientFactory, tmp_path: Path) -> None:
    secret_file = tmp_path / "jwt.secret"
    secret_file.write_text(SECRET + "\n")
    client = await make_client(auth_kind="jwt", auth_jwt_secret_file=str(secret_file))
    resp = await client.post("/files/", headers={**TUS, "Upload-Length": "1", **bearer(token())})
    assert resp.status == 201


# -- RS256 with a JWKS ---------------------------------------------------------------------------


@pytest.fixture
async def jwks() -> AsyncIterator[tuple[str, Any]]:
    """(JWKS URL, private key of kid "k1") -- a local issuer."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    jwk.update(kid="k1", use="sig", alg="RS256")

    async def keys(request: web.Request) -> web.Response:
        return web.json_response({"keys": [jwk]})

    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", keys)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("/.well-known/jwks.json")), private
    finally:
        await server.close()


async def test_rs256_tokens_are_checked_against_the_jwks(
    make_client: ClientFactory, jwks: tuple[str, Any]
) -> None:
    url, private = jwks
    client = await make_client(auth_kind="jwt", auth_jwks_url=url, auth_issuer=ISSUER)
    good = token("carol", key=private, alg="RS256", kid="k1", aud=None)
    resp = await client.post("/files/", headers={**TUS, "Upload-Length": "1", **bearer(good)})
    assert resp.status == 201, await resp.text()
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = token("carol", key=other, alg="RS256", kid="k1")
    resp = await client.post("/files/", headers={**TUS, "Upload-Length": "1", **bearer(forged)})
    assert resp.status == 401
    unknown_kid = token("carol", key=private, alg="RS256", kid="k2")
    resp = await client.post("/files/", headers={**TUS, "Upload-Length": "1", **bearer(unknown_kid)})
    assert resp.status == 401
    hs256 = token("carol")  # no secret configured: only RS256 is accepted
    resp = await client.post("/files/", headers={**TUS, "Upload-Length": "1", **bearer(hs256)})
    assert resp.status == 401


async def test_an_unreachable_jwks_is_503(make_client: ClientFactory) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    client = await make_client(auth_kind="jwt", auth_jwks_url="http://127.0.0.1:9/jwks.json")
    resp = await client.post(
        "/files/",
        headers={**TUS, "Upload-Length": "1", **bearer(token(key=private, alg="RS256", kid="k1"))},
    )
    assert resp.status == 503
    assert "Retry-After" in resp.headers
