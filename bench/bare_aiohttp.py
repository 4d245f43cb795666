"""The ceiling of the stack: a bare aiohttp handler that only appends request bodies to files.

Just enough of TUS for the benchmark client (bench/load_client.py) to drive it exactly like a
real server: ``POST /files/`` creates an id (with the body appended when one comes:
creation-with-upload), ``PATCH /files/{id}`` appends the body, ``HEAD`` tells the offset.
No validation, no locks, no checksums, no info files, no events: whatever the gateway does on
top of this costs it throughput, so gateway/bare is the fraction of the ceiling it reaches.

usage: python bench/bare_aiohttp.py --host 127.0.0.1 --port 1082 --dir /tmp/bare-data
Prints "bare-aiohttp listening on http://HOST:PORT/files/" once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
from pathlib import Path

from aiohttp import web

READ_CHUNK = 256 * 1024  # the gateway's default server.buffer_size, for a like-for-like ceiling

DIRECTORY = web.AppKey("directory", Path)
OFFSETS = web.AppKey("offsets", dict[str, int])


def tus_headers(offset: int) -> dict[str, str]:
    return {"Tus-Resumable": "1.0.0", "Upload-Offset": str(offset)}


async def append_body(request: web.Request, upload_id: str) -> int:
    """Append the request body to the upload's file; return the new offset."""
    path = request.app[DIRECTORY] / upload_id
    offsets = request.app[OFFSETS]
    with open(path, "ab") as out:  # noqa: ASYNC230 -- the plain blocking write is the point
        async for chunk in request.content.iter_chunked(READ_CHUNK):
            out.write(chunk)
            offsets[upload_id] += len(chunk)
    return offsets[upload_id]


async def post(request: web.Request) -> web.Response:
    upload_id = secrets.token_hex(16)
    (request.app[DIRECTORY] / upload_id).touch()
    request.app[OFFSETS][upload_id] = 0
    offset = await append_body(request, upload_id) if request.body_exists else 0
    location = f"{request.scheme}://{request.host}/files/{upload_id}"
    return web.Response(status=201, headers={**tus_headers(offset), "Location": location})


async def patch(request: web.Request) -> web.Response:
    upload_id = request.match_info["id"]
    if upload_id not in request.app[OFFSETS]:
        raise web.HTTPNotFound()
    offset = await append_body(request, upload_id)
    return web.Response(status=204, headers=tus_headers(offset))


async def head(request: web.Request) -> web.Response:
    offset = request.app[OFFSETS].get(request.match_info["id"])
    if offset is None:
        raise web.HTTPNotFound()
    return web.Response(status=200, headers={**tus_headers(offset), "Cache-Control": "no-store"})


def create_app(directory: Path) -> web.Application:
    app = web.Application()
    app[DIRECTORY] = directory
    app[OFFSETS] = {}
    app.router.add_post("/files/", post)
    app.router.add_patch("/files/{id}", patch)
    app.router.add_head("/files/{id}", head)
    return app


async def serve(host: str, port: int, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    runner = web.AppRunner(create_app(directory), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    print(f"bare-aiohttp listening on http://{host}:{port}/files/", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1082)
    parser.add_argument("--dir", type=Path, default=Path("bare-data"))
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.host, args.port, args.dir))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
