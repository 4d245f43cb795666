"""Sniff: the real content type from the first bytes, and the allow/deny policy on it.

:func:`sniff` reads magic bytes from a small table (the signatures of the WHATWG MIME Sniffing
standard and of ``file(1)`` for the formats people upload: documents, images, audio, video,
archives, executables). A file that matches nothing is ``text/plain`` if its first bytes are
UTF-8 (or UTF-16 with a BOM) without control characters, else ``application/octet-stream``.
Those two results are *generic*: the sniffer could not say more (a CSV and a JSON file are both
``text/plain`` to it).

The policy (:class:`TypePolicy`) judges both the sniffed and the declared type (metadata
``filetype``), so a client cannot pass an executable as ``image/png``, nor a PNG it declares as
something denied:

* deny: refused when the sniffed **or** the declared type matches a deny pattern;
* allow (when not empty): the declared type, if any, must match, and so must the sniffed one --
  except that generic ``text/plain`` passes when the declared type is a textual one that the
  allow list accepts (``text/csv``, ``application/json`` ...).

Patterns are ``type/subtype``, ``type/*`` or ``*/*``, compared case-insensitively, parameters
(``; charset=...``) ignored.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

from processing.errors import CheckFailed
from processing.sources import read_range
from processing.steps.base import StepContext

__all__ = [
    "GENERIC_BINARY",
    "GENERIC_TEXT",
    "SNIFF_BYTES",
    "SniffType",
    "TypePolicy",
    "matches",
    "parse_patterns",
    "sniff",
]

#: Bytes read from the start of the file: enough for every signature here (tar's is at 257,
#: the OOXML part names within the first local headers).
SNIFF_BYTES = 8192
GENERIC_TEXT = "text/plain"
GENERIC_BINARY = "application/octet-stream"

# (offset, signature, type); the first match wins, so longer signatures come first.
_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"%PDF-", "application/pdf"),
    (0, b"\x89PNG\r\n\x1a\n", "image/png"),
    (0, b"\xff\xd8\xff", "image/jpeg"),
    (0, b"GIF87a", "image/gif"),
    (0, b"GIF89a", "image/gif"),
    (0, b"II*\x00", "image/tiff"),
    (0, b"MM\x00*", "image/tiff"),
    (0, b"\x00\x00\x01\x00", "image/x-icon"),
    (0, b"8BPS", "image/vnd.adobe.photoshop"),
    (0, b"\x00\x00\x00\x0cjP  \r\n\x87\n", "image/jp2"),
    (0, b"ID3", "audio/mpeg"),
    (0, b"OggS", "audio/ogg"),
    (0, b"fLaC", "audio/flac"),
    (0, b"#!AMR", "audio/amr"),
    (0, b"MThd", "audio/midi"),
    (0, b"FLV\x01", "video/x-flv"),
    (0, b"\x1f\x8b", "application/gzip"),
    (0, b"BZh", "application/x-bzip2"),
    (0, b"\xfd7zXZ\x00", "application/x-xz"),
    (0, b"\x28\xb5\x2f\xfd", "application/zstd"),
    (0, b"7z\xbc\xaf\x27\x1c", "application/x-7z-compressed"),
    (0, b"Rar!\x1a\x07", "application/vnd.rar"),
    (0, b"MSCF\x00\x00\x00\x00", "application/vnd.ms-cab-compressed"),
    (257, b"ustar", "application/x-tar"),
    (0, b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "application/x-ole-storage"),
    (0, b"{\\rtf", "application/rtf"),
    (0, b"SQLite format 3\x00", "application/vnd.sqlite3"),
    (0, b"\x00asm", "application/wasm"),
    (0, b"wOFF", "font/woff"),
    (0, b"wOF2", "font/woff2"),
    (0, b"OTTO", "font/otf"),
    (0, b"\x7fELF", "application/x-executable"),
    (0, b"MZ", "application/x-msdownload"),
    (0, b"\xfe\xed\xfa\xce", "application/x-mach-binary"),
    (0, b"\xfe\xed\xfa\xcf", "application/x-mach-binary"),
    (0, b"\xce\xfa\xed\xfe", "application/x-mach-binary"),
    (0, b"\xcf\xfa\xed\xfe", "application/x-mach-binary"),
    (0, b"\xca\xfe\xba\xbe", "application/java-vm"),
    (0, b"#!", "text/x-shellscript"),
)
_RIFF = {b"WEBP": "image/webp", b"WAVE": "audio/wav", b"AVI ": "video/x-msvideo"}
_FTYP = {
    b"heic": "image/heic",
    b"heix": "image/heic",
    b"mif1": "image/heif",
    b"avif": "image/avif",
    b"qt  ": "video/quicktime",
    b"M4A ": "audio/mp4",
    b"M4B ": "audio/mp4",
    b"3gp4": "video/3gpp",
    b"3gp5": "video/3gpp",
    b"3g2a": "video/3gpp2",
}
_OOXML = (
    (b"word/", "application/vnd.openxmlformats-officedocument.wordprocessingml.document"),
    (b"xl/", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"),
    (b"ppt/", "application/vnd.openxmlformats-officedocument.presentationml.presentation"),
)
# Types whose content is text: a generic text/plain sniff is consistent with them.
_TEXTUAL = re.compile(
    r"text/.*|application/(json|xml|javascript|ecmascript|x-yaml|yaml|toml|sql|x-sh|"
    r"x-ndjson|ld\+json|csv|x-tex|.*\+json|.*\+xml)|image/svg\+xml"
)
_CONTROL = frozenset(range(32)) - {9, 10, 12, 13, 27}


def _sniff_zip(head: bytes) -> str:
    # ODF and EPUB store their type uncompressed as the first member "mimetype".
    if head[30:38] == b"mimetype":
        kind = head[38:120].split(b"PK", 1)[0]
        if re.fullmatch(rb"application/[a-z0-9.+-]+", kind):
            return kind.decode()
    if b"[Content_Types].xml" in head or b"_rels/.rels" in head:
        for marker, kind_name in _OOXML:
            if marker in head:
                return kind_name
    if b"META-INF/MANIFEST.MF" in head[:200]:
        return "application/java-archive"
    return "application/zip"


def _sniff_text(head: bytes, complete: bool) -> str | None:
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return GENERIC_TEXT
    body = head.removeprefix(codecs.BOM_UTF8)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut by the end of the sample is still text.
        if complete or exc.start < len(body) - 3:
            return None
        text = body[: exc.start].decode("utf-8")
    if any(ord(ch) in _CONTROL for ch in text):
        return None
    start = text.lstrip()[:256].lower()
    if start.startswith(("<!doctype html", "<html", "<head", "<body")):
        return "text/html"
    if start.startswith("<svg") or (start.startswith("<?xml") and "<svg" in text[:1024].lower()):
        return "image/svg+xml"
    if start.startswith("<?xml"):
        return "application/xml"
    if start.startswith("%!ps"):
        return "application/postscript"
    return GENERIC_TEXT


def sniff(head: bytes, *, complete: bool = False) -> str:
    """The content type of a file whose first bytes are ``head`` (``complete``: that is all of
    it). Never fails: unknown binary is ``application/octet-stream``, empty is ``text/plain``."""
    if not head:
        return GENERIC_TEXT
    if head[:4] == b"RIFF" and head[8:12] in _RIFF:
        return _RIFF[head[8:12]]
    if head[4:8] == b"ftyp":
        return _FTYP.get(head[8:12], "video/mp4")
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "video/webm" if b"webm" in head[:64] else "video/x-matroska"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return _sniff_zip(head)
    for offset, signature, kind in _MAGIC:
        if head[offset : offset + len(signature)] == signature:
            return kind
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0 and head[1] & 0x06:
        return "audio/mpeg"  # an MPEG audio frame header without ID3 tag
    if head[:2] == b"BM" and len(head) >= 14 and head[6:10] == b"\x00\x00\x00\x00":
        return "image/bmp"
    return _sniff_text(head, complete) or GENERIC_BINARY


def _essence(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def parse_patterns(text: str) -> tuple[str, ...]:
    """``"image/*, application/pdf"`` → ``("image/*", "application/pdf")``; ValueError names
    a pattern that is not ``type/subtype``, ``type/*`` or ``*/*``."""
    patterns = []
    for raw in text.split(","):
        pattern = _essence(raw)
        if not pattern:
            continue
        if not re.fullmatch(r"(\*/\*|[a-z0-9!#$&^_.+-]+/(\*|[a-z0-9!#$&^_.+-]+))", pattern):
            raise ValueError(f"{raw.strip()!r} is not a content type pattern")
        patterns.append(pattern)
    return tuple(patterns)


def matches(content_type: str, patterns: tuple[str, ...]) -> bool:
    essence = _essence(content_type)
    major = essence.split("/", 1)[0]
    return any(p in ("*/*", essence) or p == f"{major}/*" for p in patterns)


@dataclass(frozen=True)
class TypePolicy:
    """The allow/deny judgement (see the module docstring)."""

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()

    def judge(self, sniffed: str, declared: str | None) -> None:
        """Raise CheckFailed(type_not_allowed) unless both types pass."""
        for label, kind in (("content", sniffed), ("declared type", declared)):
            if kind and matches(kind, self.deny):
                raise CheckFailed("type_not_allowed", f"{label} {_essence(kind)} is denied")
        if not self.allow:
            return
        if declared and not matches(declared, self.allow):
            raise CheckFailed(
                "type_not_allowed", f"declared type {_essence(declared)} is not allowed"
            )
        if matches(sniffed, self.allow):
            return
        if sniffed == GENERIC_TEXT and declared and _TEXTUAL.fullmatch(_essence(declared)):
            return  # text the sniffer cannot name, declared as a text type that is allowed
        raise CheckFailed("type_not_allowed", f"content {sniffed} is not allowed")


@dataclass(frozen=True)
class SniffType:
    """Read the first `SNIFF_BYTES`, record ``sniffed_type``, apply the policy."""

    policy: TypePolicy = TypePolicy()
    name: str = "sniff"

    async def run(self, ctx: StepContext) -> str:
        end = min(SNIFF_BYTES, ctx.source.size)
        head = await read_range(ctx.source, 0, end)
        sniffed = sniff(head, complete=end == ctx.source.size)
        ctx.facts["sniffed_type"] = sniffed
        declared = ctx.job.declared_type
        self.policy.judge(sniffed, declared)
        if declared and _essence(declared) != sniffed:
            return f"{sniffed} (declared {_essence(declared)})"
        return sniffed
