"""A tuspy client process that dies in the middle of a PATCH (run by test_tuspy.py).

usage: python tuspy_killed_client.py ENDPOINT FILE URL_STORAGE CHUNK_SIZE CHUNKS

Uploads CHUNKS chunks with tuspy (``store_url=True``, the upload URL kept in a tinydb
FileStorage at URL_STORAGE), then starts the next PATCH, sends only half of its body, prints
``{"url": …, "sent": N}`` and waits to be killed with SIGKILL, like an application that crashes
mid-request. The test then resumes the upload from the stored URL in another process.
"""

from __future__ import annotations

import http.client
import json
import sys
import time
from urllib.parse import urlsplit

from tusclient.client import TusClient
from tusclient.storage.filestorage import FileStorage


def main() -> None:
    endpoint, path, storage_path, chunk_arg, chunks_arg = sys.argv[1:]
    chunk_size, chunks = int(chunk_arg), int(chunks_arg)
    storage = FileStorage(storage_path)  # type: ignore[no-untyped-call]
    uploader = TusClient(endpoint).uploader(
        file_path=path,
        chunk_size=chunk_size,
        metadata={"filename": "killed.bin"},
        store_url=True,
        url_storage=storage,
    )
    for _ in range(chunks):
        uploader.upload_chunk()  # type: ignore[no-untyped-call]

    # The next chunk, cut off half-way: headers promise chunk_size bytes, half of them come.
    with open(path, "rb") as source:
        source.seek(uploader.offset)
        body = source.read(chunk_size)
    url = str(uploader.url)
    target = urlsplit(url)
    conn = http.client.HTTPConnection(str(target.hostname), target.port, timeout=30)
    conn.putrequest("PATCH", target.path)
    for name, value in {
        "Tus-Resumable": "1.0.0",
        "Upload-Offset": str(uploader.offset),
        "Content-Type": "application/offset+octet-stream",
        "Content-Length": str(len(body)),
    }.items():
        conn.putheader(name, value)
    conn.endheaders()
    half = body[: len(body) // 2]
    conn.send(half)
    print(json.dumps({"url": url, "sent": uploader.offset + len(half)}), flush=True)
    time.sleep(120)  # killed long before


if __name__ == "__main__":
    main()
