"""Destination paths: render the configured template, and keep every path inside the root.

A delivered path is relative, ``/``-separated, and each component is a name both OneDrive and
a local filesystem accept. OneDrive's rules ("Restrictions and limitations in OneDrive and
SharePoint"): these characters are not allowed in file or folder names: ``" * : < > ? / \\ |``;
names may not begin or end with a space or end with a period; ``.lock``, ``CON``, ``PRN``,
``AUX``, ``NUL``, ``COM0``-``COM9``, ``LPT0``-``LPT9``, ``desktop.ini`` are reserved, ``_vti_``
cannot appear anywhere and ``~$`` cannot start a name; the entire decoded path may be at most
400 characters. We also strip leading periods (no hidden files, no ``.``/``..``), replace
control characters, and cap a component at 255 UTF-8 bytes (the usual local filesystem limit).

Three entry points:

* :func:`render_path` fills a template such as ``{owner}/{date}/{filename}`` with untrusted
  values; each value is sanitized as part of one component, so a ``/`` or ``..`` inside a
  filename never creates or escapes a directory.
* :func:`sanitize_path` cleans a path a user supplied (a transfer's destination path); ``..``
  there is an attack, not a name, and is refused.
* :func:`split_target_path` is the destinations' last check before touching anything: the path
  must already be clean.
"""

from __future__ import annotations

import re
import string
import unicodedata
from datetime import date as date_type
from datetime import datetime

from .errors import InvalidTarget

__all__ = [
    "MAX_COMPONENT_BYTES",
    "MAX_PATH_CHARS",
    "TEMPLATE_FIELDS",
    "render_path",
    "sanitize_component",
    "sanitize_path",
    "split_target_path",
    "validate_template",
]

MAX_COMPONENT_BYTES = 255
MAX_PATH_CHARS = 400
TEMPLATE_FIELDS = frozenset({"owner", "filename", "upload_id", "date", "year", "month", "day"})

_FORBIDDEN = re.compile(r'["*:<>?/\\|\x00-\x1f\x7f]')
_RESERVED_STEMS = frozenset(
    {"CON", "PRN", "AUX", "NUL"} | {f"COM{i}" for i in range(10)} | {f"LPT{i}" for i in range(10)}
)
_RESERVED_NAMES = frozenset({".lock", "desktop.ini"})
_VTI = re.compile(r"_vti_", re.IGNORECASE)
_STRIP = " ."
_MAX_EXTENSION = 16


def _truncate(name: str) -> str:
    """Cut ``name`` to MAX_COMPONENT_BYTES of UTF-8, keeping a short extension."""
    if len(name.encode()) <= MAX_COMPONENT_BYTES:
        return name
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem or len(ext) > _MAX_EXTENSION:
        stem, ext = name, ""
    suffix = f".{ext}" if ext else ""
    budget = MAX_COMPONENT_BYTES - len(suffix.encode())
    cut = stem.encode()[:budget].decode(errors="ignore")
    return cut.rstrip(_STRIP) + suffix


def sanitize_component(value: str) -> str:
    """Turn any string into one safe path component (never empty, never ``.`` or ``..``)."""
    name = _FORBIDDEN.sub("_", unicodedata.normalize("NFC", value)).strip(_STRIP)
    name = _VTI.sub("_vti-", name)
    if name.startswith("~$"):
        name = "_" + name[1:]
    if name.split(".", 1)[0].upper() in _RESERVED_STEMS or name.lower() in _RESERVED_NAMES:
        name = "_" + name
    name = _truncate(name).strip(_STRIP)
    return name or "_"


def validate_template(template: str) -> None:
    """Raise ``ValueError`` (naming the problem) unless ``template`` can be rendered."""
    if not template or template.startswith(("/", "\\")):
        raise ValueError("path template must be a non-empty relative path")
    if "\\" in template or any(not part.strip() for part in template.split("/")):
        raise ValueError("path template must separate non-empty components with '/'")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"path template is malformed: {exc}") from exc
    fields = [name for _, name, _, _ in parsed if name is not None]
    if not fields:
        raise ValueError("path template needs at least one field, e.g. {filename}")
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in TEMPLATE_FIELDS or spec or conversion:
            raise ValueError(
                f"path template field {{{name}}} is not one of "
                + ", ".join(f"{{{f}}}" for f in sorted(TEMPLATE_FIELDS))
            )
    if "filename" not in fields and "upload_id" not in fields:
        # Without either, every upload of an owner/day would land on the same name.
        raise ValueError("path template must contain {filename} or {upload_id}")


def _join_checked(components: list[str]) -> str:
    path = "/".join(components)
    if not components:
        raise InvalidTarget("destination path is empty")
    if len(path) > MAX_PATH_CHARS:
        raise InvalidTarget(f"destination path is longer than {MAX_PATH_CHARS} characters")
    return path


def render_path(
    template: str,
    *,
    owner: str | None,
    filename: str | None,
    upload_id: str,
    date: date_type | datetime,
) -> str:
    """Render ``template`` (e.g. ``{owner}/{date}/{filename}``) into a clean relative path.

    Every value is confined to the component it appears in: separators, ``..`` and forbidden
    characters inside a value become harmless. A missing owner renders as ``anonymous``, a
    missing filename as the upload id. ``ValueError`` for a bad template, ``InvalidTarget`` when
    the result is too long.
    """
    validate_template(template)
    day = date.date() if isinstance(date, datetime) else date
    values = {
        "owner": owner or "anonymous",
        "filename": filename or upload_id,
        "upload_id": upload_id,
        "date": day.isoformat(),
        "year": f"{day.year:04d}",
        "month": f"{day.month:02d}",
        "day": f"{day.day:02d}",
    }
    # Neutralize separators in values before they meet the template's own "/".
    safe = {key: _FORBIDDEN.sub("_", value) for key, value in values.items()}
    rendered = template.format_map(safe)
    # Every component stays, even one a value left blank: it becomes "_" and never vanishes
    # (a vanished filename would deliver the file under its folder's name).
    components = [sanitize_component(part) for part in rendered.split("/")]
    return _join_checked(components)


def sanitize_path(path: str) -> str:
    """Clean a user-supplied relative path; refuse traversal instead of renaming it."""
    parts = [part for part in path.replace("\\", "/").split("/") if part.strip()]
    if any(part.strip() in {".", ".."} for part in parts):
        raise InvalidTarget("destination path must not contain '.' or '..' components")
    return _join_checked([sanitize_component(part) for part in parts])


def split_target_path(path: str) -> list[str]:
    """Check a rendered path and return its components; ``InvalidTarget`` unless it is clean.

    Clean means: relative, ``/``-separated, no empty/``.``/``..`` components, and every
    component already equal to its sanitized form.
    """
    if not path or path.startswith("/") or "\\" in path:
        raise InvalidTarget("destination path must be a non-empty relative path")
    components = path.split("/")
    for component in components:
        if component in {"", ".", ".."} or sanitize_component(component) != component:
            raise InvalidTarget(f"destination path component {component!r} is not allowed")
    _join_checked(components)
    return components
