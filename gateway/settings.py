"""One typed, validated settings object, built from defaults < TOML file < environment < flags.

Every setting is declared once in `FIELDS`: its section, key, type, default and unit. From that
table come the dataclass, the `TUSGATE_<SECTION>_<KEY>` environment variables, the TOML keys
(`[section] key = ...`), the command-line flags (`--section-key`) and docs/configuration.md.
Invalid configuration raises `ConfigError` naming the key; the CLI prints it as one line.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["FIELDS", "ConfigError", "Field", "Settings", "load_settings"]

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
MAX_INT64 = 2**63 - 1

DEFAULT_MAX_SIZE = 250 * GiB  # OneDrive's per-file limit: nothing bigger could be delivered
DEFAULT_BUFFER = 256 * KiB


class ConfigError(ValueError):
    """Invalid configuration; the message names the key and says what is wrong, in one line."""


@dataclass(frozen=True)
class Field:
    section: str  # "" for top-level keys such as data_dir
    key: str
    type: type
    default: Any
    doc: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    secret: bool = False  # never shown: left out of repr(settings)

    @property
    def name(self) -> str:
        return f"{self.section}_{self.key}" if self.section else self.key

    @property
    def env(self) -> str:
        return "TUSGATE_" + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


FIELDS: tuple[Field, ...] = (
    Field("", "data_dir", Path, Path("./data"), "where uploads, NATS data and deliveries live"),
    Field("server", "host", str, "127.0.0.1", "address the gateway listens on"),
    Field("server", "port", int, 1080, "TCP port of the gateway", minimum=0),
    Field("server", "base_path", str, "/files/", "URL path of the TUS endpoint"),
    Field("server", "behind_proxy", bool, False, "trust Forwarded / X-Forwarded-* for URLs"),
    Field("server", "max_size", int, DEFAULT_MAX_SIZE, "Tus-Max-Size in bytes", minimum=0),
    Field("server", "buffer_size", int, DEFAULT_BUFFER, "bytes read per body chunk", minimum=4096),
    Field("server", "max_metadata_size", int, 16 * KiB, "bytes of Upload-Metadata", minimum=256),
    Field("server", "idle_timeout", float, 60.0, "seconds a body may stall before the request "
          "is ended (slow clients)", minimum=0.1),
    Field("server", "lock_timeout", float, 5.0, "seconds to wait for a stuck request to release "
          "an upload before answering 423", minimum=0.0),
    Field("server", "max_uploads_per_owner", int, 0, "request bodies one owner may stream "
          "into this instance at once; one more is answered 429 (0 = no limit)", minimum=0),
    Field("server", "cors_origins", str, "*", "allowed CORS origins, comma-separated, or *"),
    Field("store", "kind", str, "file", "staging store", choices=("file", "s3")),
    Field("store", "expiration", float, 86400.0, "seconds an unfinished upload lives after its "
          "last byte (0 = forever)", minimum=0.0),
    Field("store", "sweep_interval", float, 60.0, "seconds between expiry sweeps", minimum=0.05),
    Field("store", "retention", float, 0.0, "seconds staged bytes of a delivered upload are "
          "kept", minimum=0.0),
    Field("store", "fsync", bool, False, "fsync each PATCH (power-loss durability; a process "
          "crash never loses written bytes either way)"),
    Field("nats", "url", str, "", "NATS server URL; empty under `up` = start an embedded one"),
    Field("nats", "port", int, 4222, "port of the embedded nats-server under `up`", minimum=0),
    Field("nats", "replicas", int, 1, "replicas of the TUSGATE stream", minimum=1),
    Field("processing", "enabled", bool, True, "finalize uploads (false: a pure TUS server)"),
    Field("processing", "wait", float, 60.0, "seconds a completing request waits for the "
          "outcome before answering 202", minimum=0.0),
    Field("processing", "concurrency", int, 4, "deliveries one worker runs at once", minimum=1),
    Field("processing", "max_deliver", int, 5, "attempts per upload before processing.aborted",
          minimum=1),
    Field("processing", "ack_wait", float, 30.0, "seconds without a heartbeat before NATS hands "
          "an event to another worker (heartbeats every third of it)", minimum=1.0),
    Field("processing", "backoff", str, "2,10,30,120,300", "seconds before retry 1, 2, ... "
          "(comma-separated; the last repeats)"),
    Field("processing", "stop_timeout", float, 10.0, "seconds in-flight deliveries may finish "
          "at shutdown before they are left to another worker", minimum=0.0),
    Field("checks", "max_size", int, 0, "largest upload in bytes that is delivered (0 = no "
          "limit)", minimum=0),
    Field("checks", "allow_types", str, "", "content types delivered, comma-separated, "
          "`image/*` wildcards (empty = all); judged on sniffed and declared type"),
    Field("checks", "deny_types", str, "", "content types refused, comma-separated, `image/*` "
          "wildcards; judged on sniffed and declared type"),
    Field("checks", "hook_command", str, "", "command given the upload's facts as JSON on "
          "stdin; a non-zero exit vetoes (reason on stdout)"),
    Field("checks", "hook_url", str, "", "URL POSTed the upload's facts as JSON; a non-2xx "
          "answer vetoes (reason in the body)"),
    Field("checks", "hook_timeout", float, 30.0, "seconds a hook may take", minimum=0.1),
    Field("transfers", "max_size", int, 0, "largest transfer source in bytes (0 = "
          "server_max_size; a smaller checks_max_size wins): a URL declaring more is refused "
          "before its body is read, one sending more is cut off; an S3 object after its HEAD",
          minimum=0),
    Field("transfers", "allow_private", bool, False, "let URL sources reach private, loopback "
          "and link-local addresses (the SSRF check off: trusted networks and tests only)"),
    Field("transfers", "allow_networks", str, "", "CIDRs URL sources may reach although they "
          "are private, comma-separated (e.g. 10.1.0.0/16, fd00::/8); all else stays refused"),
    Field("s3", "bucket", str, "", "S3 bucket of the S3 store"),
    Field("s3", "prefix", str, "uploads/", "key prefix inside the bucket"),
    Field("s3", "endpoint_url", str, "", "S3-compatible endpoint (empty = AWS)"),
    Field("s3", "region", str, "us-east-1", "S3 region"),
    Field("s3", "part_size", int, 8 * MiB, "bytes per multipart part (at least 5 MiB; larger "
          "for uploads that 10,000 parts of it cannot hold); a PATCH buffers about two parts",
          minimum=5 * MiB),
    Field("s3", "buffer_limit", int, 256 * MiB, "bytes of part buffers all PATCHes of one "
          "instance may hold at once (0 = no limit); a PATCH past it waits for room, up to "
          "server.idle_timeout, then answers 503 having kept what arrived", minimum=0),
    Field("destination", "kind", str, "local", "where uploads are delivered",
          choices=("local", "onedrive")),
    Field("destination", "local_path", str, "", "folder of the local destination "
          "(empty = <data_dir>/delivered)"),
    Field("destination", "path_template", str, "{owner}/{date}/{filename}", "path of a "
          "delivered upload; fields {owner} {date} {year} {month} {day} {filename} {upload_id}"),
    Field("destination", "conflict", str, "rename", "when the name is taken",
          choices=("fail", "replace", "rename")),
    Field("destination", "manifest", bool, False, "write <file>.manifest.json beside each "
          "delivered file"),
    Field("graph", "base_url", str, "https://graph.microsoft.com/v1.0", "Microsoft Graph URL"),
    Field("graph", "token", str, "", "static bearer token instead of azure-identity; never "
          "logged", secret=True),
    Field("graph", "drive", str, "me", "drive: me, drives/ID, users/ID, users/{owner} (each "
          "owner's own drive), groups/ID, sites/ID"),
    Field("graph", "fragment_size", int, 10 * MiB, "bytes per upload-session fragment (a "
          "multiple of 320 KiB, at most 60 MiB)", minimum=320 * KiB),
    Field("graph", "tenant_id", str, "", "Entra tenant of the app registration"),
    Field("graph", "client_id", str, "", "application (client) id"),
    Field("graph", "client_secret", str, "", "client secret (else certificate, else "
          "DefaultAzureCredential); never logged", secret=True),
    Field("graph", "client_secret_file", str, "", "file holding the client secret (e.g. a "
          "mounted secret)"),
    Field("graph", "certificate_path", str, "", "PEM/PKCS12 certificate of the app"),
    Field("auth", "kind", str, "none", "authentication: none (every client is `anonymous`; "
          "for loopback) or jwt (bearer tokens; their `sub` owns what it creates)",
          choices=("none", "jwt")),
    Field("auth", "jwt_secret", str, "", "HS256 shared secret of the tokens (prefer the "
          "environment or jwt_secret_file); never logged", secret=True),
    Field("auth", "jwt_secret_file", str, "", "file holding the HS256 secret"),
    Field("auth", "jwks_url", str, "", "JWKS URL of the issuer's keys, for RS256 tokens"),
    Field("auth", "issuer", str, "", "required `iss` of the tokens (empty = not checked)"),
    Field("auth", "audience", str, "", "required `aud` of the tokens (empty = not checked)"),
    Field("auth", "leeway", float, 30.0, "seconds of clock skew allowed on exp/nbf",
          minimum=0.0),
)


def _make_settings_class() -> type:
    return dataclasses.make_dataclass(
        "_SettingsBase",
        [(f.name, f.type, dataclasses.field(default=f.default, repr=not f.secret)) for f in FIELDS],
        frozen=True,
        kw_only=True,
    )


@dataclass(frozen=True, kw_only=True)
class Settings(_make_settings_class()):  # type: ignore[misc]
    """All settings, flat: `settings.server_port`, `settings.store_kind`, ..."""

    def __post_init__(self) -> None:
        for f in FIELDS:
            value = getattr(self, f.name)
            if f.choices and value not in f.choices:
                raise ConfigError(f"{f.name}: must be one of {', '.join(f.choices)}, not {value!r}")
            if f.minimum is not None and value < f.minimum:
                raise ConfigError(f"{f.name}: must be >= {f.minimum}, not {value!r}")
        if not self.server_base_path.startswith("/") or not self.server_base_path.endswith("/"):
            raise ConfigError("server_base_path: must start and end with '/'")
        if self.server_max_size > MAX_INT64:
            raise ConfigError("server_max_size: must fit in 63 bits")
        if self.store_kind == "s3" and not self.s3_bucket:
            raise ConfigError("s3_bucket: required when store_kind is s3")
        if self.store_kind == "s3" and self.server_max_size > 5 * 1024 * GiB:
            raise ConfigError("server_max_size: an S3 object holds at most 5 TiB")
        if self.s3_part_size > 5 * GiB:
            raise ConfigError("s3_part_size: S3 parts are at most 5 GiB")
        if self.auth_kind == "jwt" and not (
            self.auth_jwt_secret or self.auth_jwt_secret_file or self.auth_jwks_url
        ):
            raise ConfigError("auth_jwt_secret: jwt needs a secret, a secret file or a jwks_url")

    @property
    def uploads_dir(self) -> Path:
        return Path(self.data_dir) / "uploads"

    @property
    def delivered_dir(self) -> Path:
        return Path(self.destination_local_path or Path(self.data_dir) / "delivered")

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def read_secret(value: str, path: str, key: str) -> str | None:
    """A secret given as a setting (best from the environment) or in the file `path` (e.g. a
    mounted secret); None when neither. ConfigError naming `key` for an unreadable file."""
    if value:
        return value
    if not path:
        return None
    try:
        secret = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path} ({exc.strerror})") from None
    if not secret:
        raise ConfigError(f"{key}: {path} is empty")
    return secret


def _convert(f: Field, raw: Any) -> Any:
    try:
        if f.type is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if f.type is int and isinstance(raw, float):
            raise ValueError(raw)
        converter: Callable[[Any], Any] = f.type
        return converter(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{f.name}: expected {f.type.__name__}, got {raw!r}") from None


def _from_toml(path: Path) -> dict[str, Any]:
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {path} is not valid TOML: {exc}") from None
    values: dict[str, Any] = {}
    by_place = {(f.section, f.key): f for f in FIELDS}
    for key, value in doc.items():
        if isinstance(value, dict):
            for sub, subvalue in value.items():
                f = by_place.get((key, sub))
                if f is None:
                    raise ConfigError(f"config: unknown key [{key}] {sub} in {path}")
                values[f.name] = _convert(f, subvalue)
        else:
            f = by_place.get(("", key))
            if f is None:
                raise ConfigError(f"config: unknown key {key} in {path}")
            values[f.name] = _convert(f, value)
    return values


def load_settings(
    *,
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Defaults < TOML file < environment < explicit overrides (flags). Raises ConfigError."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    if config_file is None and environ.get("TUSGATE_CONFIG"):
        config_file = Path(environ["TUSGATE_CONFIG"])
    if config_file is not None:
        values.update(_from_toml(config_file))
    for f in FIELDS:
        if f.env in environ:
            values[f.name] = _convert(f, environ[f.env])
    for name, value in (overrides or {}).items():
        if value is not None:
            f = next(x for x in FIELDS if x.name == name)
            values[name] = _convert(f, value)
    return Settings(**values)


def configuration_markdown() -> str:
    """docs/configuration.md, generated from FIELDS (a test keeps the file in step)."""
    lines = [
        "# Configuration",
        "",
        "Generated from `gateway/settings.py` by `python -m gateway.settings > docs/configuration.md`.",
        "",
        "Precedence: defaults < TOML file (`--config FILE` or `TUSGATE_CONFIG`) < environment",
        "< command-line flags. Invalid values stop the program at start with one line naming the key.",
        "In TOML, keys live in their section: `[server]` `port = 8080`; `data_dir` is top-level.",
        "",
        "| flag | environment | TOML | default | meaning |",
        "|---|---|---|---|---|",
    ]
    for f in FIELDS:
        toml_key = f"[{f.section}] {f.key}" if f.section else f.key
        default = str(f.default).lower() if f.type is bool else f.default
        choices = f" ({' / '.join(f.choices)})" if f.choices else ""
        lines.append(f"| `{f.flag}` | `{f.env}` | `{toml_key}` | `{default}` | {f.doc}{choices} |")
    lines += [
        "",
        "Short flags that scripts rely on: `--data-dir`, `--host`, `--port`, `--behind-proxy`,",
        "`--nats-port`, `--nats-url`.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(configuration_markdown(), end="")
