"""Strict parsing of the TUS request headers. Each parser raises a TusError naming the header."""

from __future__ import annotations

import base64
import binascii
import re
from urllib.parse import urlsplit

from gateway import errors
from gateway.errors import TusError

__all__ = [
    "CHECKSUM_ALGORITHMS",
    "TUS_VERSION",
    "parse_checksum",
    "parse_concat",
    "parse_int_header",
    "parse_metadata",
]

TUS_VERSION = "1.0.0"
MAX_INT64 = 2**63 - 1
CHECKSUM_ALGORITHMS = ("sha1", "md5", "sha256", "sha512", "crc32")
_DIGEST_SIZES = {"sha1": 20, "md5": 16, "sha256": 32, "sha512": 64, "crc32": 4}

_DIGITS = re.compile(r"^[0-9]{1,19}\Z")
_METADATA_KEY = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")  # an HTTP token: no space, no comma
_BASE64 = re.compile(r"^[A-Za-z0-9+/]*={0,2}\Z")
_UPLOAD_ID = re.compile(r"^[0-9a-f]{32}\Z")


def parse_int_header(value: str | None, spec: errors.ErrorSpec, name: str) -> int:
    """A non-negative decimal that fits in 63 bits (`Upload-Offset`, `Upload-Length`)."""
    if value is None:
        raise spec.error(f"{name} is missing")
    value = value.strip()
    if not _DIGITS.match(value):
        raise spec.error(f"{name} must be a non-negative integer")
    number = int(value)
    if number > MAX_INT64:
        raise spec.error(f"{name} exceeds 2^63-1")
    return number


def parse_metadata(value: str | None, max_size: int) -> str | None:
    """Validate `Upload-Metadata` and return it unchanged (it is echoed exactly as received).

    "The Upload-Metadata request and response header MUST consist of one or more comma-separated
    key-value pairs. The key and value MUST be separated by a space. The key MUST NOT contain
    spaces and commas and MUST NOT be empty. The value MUST be Base64 encoded."
    """
    if value is None:
        return None
    if len(value) > max_size:
        raise errors.INVALID_METADATA.error(f"longer than {max_size} bytes")
    if value == "":
        return value  # an empty header carries no pairs; a blank one is a pair with no key
    seen: set[str] = set()
    for pair in value.split(","):
        parts = pair.strip().split(" ")
        if len(parts) > 2 or not parts[0]:
            raise errors.INVALID_METADATA.error(f"bad pair {pair.strip()[:40]!r}")
        key = parts[0]
        if not _METADATA_KEY.match(key):
            raise errors.INVALID_METADATA.error(f"bad key {key[:40]!r}")
        if key in seen:
            raise errors.INVALID_METADATA.error(f"duplicate key {key[:40]!r}")
        seen.add(key)
        if len(parts) == 2 and parts[1]:
            encoded = parts[1]
            if not _BASE64.match(encoded) or len(encoded) % 4:
                raise errors.INVALID_METADATA.error(f"value of {key[:40]!r} is not base64")
            try:
                base64.b64decode(encoded, validate=True)
            except binascii.Error:
                raise errors.INVALID_METADATA.error(f"value of {key[:40]!r} is not base64") from None
    return value


def parse_checksum(value: str) -> tuple[str, bytes]:
    """`Upload-Checksum: <algorithm> <base64 digest>` -> (algorithm, digest bytes)."""
    parts = value.strip().split(" ")
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise errors.INVALID_CHECKSUM.error("expected '<algorithm> <base64 digest>'")
    algorithm, encoded = parts[0].lower(), parts[1]
    if algorithm not in CHECKSUM_ALGORITHMS:
        raise errors.UNSUPPORTED_CHECKSUM.error(
            f"{algorithm[:20]!r}; supported: {','.join(CHECKSUM_ALGORITHMS)}"
        )
    try:
        digest = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        raise errors.INVALID_CHECKSUM.error("digest is not base64") from None
    if len(digest) != _DIGEST_SIZES[algorithm]:
        raise errors.INVALID_CHECKSUM.error(f"a {algorithm} digest has {_DIGEST_SIZES[algorithm]} bytes")
    return algorithm, digest


def parse_concat(value: str | None, base_path: str, own_host: str) -> tuple[bool, list[str]]:
    """`Upload-Concat` -> (is_partial, partial ids of a final upload).

    A final upload lists its partials as absolute URLs or as paths, separated by spaces.
    Only ids under our own endpoint are accepted, so a final cannot point anywhere else.
    """
    if value is None:
        return False, []
    value = value.strip()
    if value == "partial":
        return True, []
    if not value.startswith("final;"):
        raise errors.INVALID_CONCAT.error("expected 'partial' or 'final;<urls>'")
    ids: list[str] = []
    for url in value[len("final;") :].split():
        if "://" in url:
            parts = urlsplit(url)
            if parts.netloc.lower() != own_host.lower():
                raise errors.INVALID_CONCAT.error(f"{url[:80]!r} is not an upload of this server")
            path = parts.path
        else:
            path = url.split("?", 1)[0]
        if not path.startswith(base_path):
            raise errors.INVALID_CONCAT.error(f"{url[:80]!r} is not an upload of this server")
        upload_id = path[len(base_path) :].rstrip("/")
        if not _UPLOAD_ID.match(upload_id):
            raise errors.NOT_FOUND.error(f"partial upload {upload_id[:40]!r}")
        ids.append(upload_id)
    if not ids:
        raise errors.INVALID_CONCAT.error("a final upload needs at least one partial upload")
    return False, ids


def valid_upload_id(upload_id: str) -> bool:
    return bool(_UPLOAD_ID.match(upload_id))


def require_tus_resumable(value: str | None) -> None:
    if value != TUS_VERSION:
        raise TusError(errors.UNSUPPORTED_VERSION, f"this server speaks {TUS_VERSION}")
