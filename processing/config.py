"""Build the processing service from the settings (``processing_*``, ``checks_*``,
``destination_*``, ``graph_*``, ``store_*`` in gateway/settings.py).

Everything is checked when the worker starts: a bad value raises ``ConfigError`` naming the
key, as for the gateway's own settings (the CLI prints it as one line).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from events.model import S3Source, UploadSource, UrlSource, storage_from_json
from gateway.settings import ConfigError, Settings, read_secret
from gateway.store.base import DataStore, StoreError
from gateway.store.kvrecords import KvRecords
from processing.destinations import (
    FRAGMENT_UNIT,
    MAX_FRAGMENT_SIZE,
    Destination,
    LocalFolderDestination,
    OneDriveDestination,
    OneDriveSettings,
    build_token_provider,
    validate_template,
)
from processing.errors import SourceUnavailable
from processing.job import Job
from processing.pipeline import Pipeline
from processing.sources import ByteSource
from processing.ssrf import AddressPolicy, parse_networks
from processing.staging import open_source, shared_file_store
from processing.steps import (
    CommandHook,
    HttpHook,
    SizeLimit,
    SniffType,
    Step,
    TypePolicy,
    VerifyChecksum,
    parse_patterns,
)

__all__ = [
    "JobSources",
    "WorkerConfig",
    "build_destination",
    "build_pipeline",
    "build_source_opener",
    "build_steps",
    "parse_backoff",
    "transfer_max_size",
    "url_policy",
    "validate_settings",
    "worker_config",
]


@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    """How the worker consumes (see processing.worker for what each one does)."""

    concurrency: int = 4
    max_deliver: int = 5
    ack_wait: float = 30.0
    backoff: tuple[float, ...] = (2.0, 10.0, 30.0, 120.0, 300.0)
    stop_timeout: float = 10.0
    retention: float = 0.0
    sweep_interval: float = 60.0
    replicas: int = 1
    #: Seconds between progress events of one job (SPEC §5: at most one per second).
    progress_interval: float = 1.0
    #: Seconds one fetch waits for events: also how long a stop may take to be noticed.
    fetch_timeout: float = 1.0

    @property
    def heartbeat(self) -> float:
        """`in_progress` and lease renewal every third of ack_wait: two may be lost."""
        return self.ack_wait / 3

    def backoff_for(self, attempt: int) -> float:
        """Delay before the retry that follows failed attempt number `attempt` (1-based)."""
        return self.backoff[min(attempt, len(self.backoff)) - 1]


def parse_backoff(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(
            f"processing_backoff: expected seconds like 2,10,30, got {text!r}"
        ) from None
    if not values or any(v < 0 for v in values):
        raise ConfigError(f"processing_backoff: expected seconds >= 0 like 2,10,30, got {text!r}")
    return values


def worker_config(settings: Settings) -> WorkerConfig:
    return WorkerConfig(
        concurrency=settings.processing_concurrency,
        max_deliver=settings.processing_max_deliver,
        ack_wait=settings.processing_ack_wait,
        backoff=parse_backoff(settings.processing_backoff),
        stop_timeout=settings.processing_stop_timeout,
        retention=settings.store_retention,
        sweep_interval=settings.store_sweep_interval,
        replicas=settings.nats_replicas,
    )


def build_steps(settings: Settings) -> list[Step]:
    """size → sniff → checksum → hook (the hook last: it sees what the others found)."""
    policy = TypePolicy(
        allow=_patterns(settings, "checks_allow_types"),
        deny=_patterns(settings, "checks_deny_types"),
    )
    steps: list[Step] = [SizeLimit(settings.checks_max_size), SniffType(policy), VerifyChecksum()]
    hook = _hook(settings)
    if isinstance(hook, CommandHook):
        steps.append(hook)
    elif hook is not None:
        steps.append(HttpHook(hook, settings.checks_hook_timeout))
    return steps


def _hook(settings: Settings) -> CommandHook | str | None:
    """The command hook, the hook URL, or None (checked, nothing opened)."""
    if settings.checks_hook_command and settings.checks_hook_url:
        raise ConfigError("checks_hook_url: set either checks_hook_command or checks_hook_url")
    if settings.checks_hook_command:
        try:
            return CommandHook.from_command_line(
                settings.checks_hook_command, settings.checks_hook_timeout
            )
        except ValueError as exc:
            raise ConfigError(f"checks_hook_command: {exc}") from None
    if settings.checks_hook_url:
        if not settings.checks_hook_url.startswith(("http://", "https://")):
            raise ConfigError("checks_hook_url: must be an http(s) URL")
        return str(settings.checks_hook_url)
    return None


def transfer_max_size(settings: Settings) -> int:
    """The largest transfer source: ``transfers_max_size`` (0: ``server_max_size``), or
    ``checks_max_size`` when that is smaller -- the size check would refuse the rest anyway,
    only after the whole download."""
    limit = settings.transfers_max_size or settings.server_max_size
    if settings.checks_max_size:
        limit = min(limit, settings.checks_max_size)
    return int(limit)


def url_policy(settings: Settings) -> AddressPolicy:
    """Which addresses URL sources may connect to (SPEC §4: private ones refused by default)."""
    try:
        networks = parse_networks(settings.transfers_allow_networks)
    except ValueError as exc:
        raise ConfigError(f"transfers_allow_networks: {exc}") from None
    return AddressPolicy(allow_private=settings.transfers_allow_private, allow_networks=networks)


def validate_settings(settings: Settings) -> None:
    """Check every processing setting without opening anything; ConfigError names the key."""
    worker_config(settings)
    url_policy(settings)
    _patterns(settings, "checks_allow_types")
    _patterns(settings, "checks_deny_types")
    _hook(settings)
    _template(settings)
    if settings.destination_kind == "onedrive":
        onedrive_settings(settings)


def _template(settings: Settings) -> str:
    try:
        validate_template(settings.destination_path_template)
    except ValueError as exc:
        raise ConfigError(f"destination_path_template: {exc}") from None
    return str(settings.destination_path_template)


def _patterns(settings: Settings, name: str) -> tuple[str, ...]:
    try:
        return parse_patterns(getattr(settings, name))
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def onedrive_settings(settings: Settings, **overrides: Any) -> OneDriveSettings:
    size = settings.graph_fragment_size
    if size % FRAGMENT_UNIT or size > MAX_FRAGMENT_SIZE:
        raise ConfigError(
            f"graph_fragment_size: must be a multiple of {FRAGMENT_UNIT} bytes (320 KiB) and "
            f"at most {MAX_FRAGMENT_SIZE}, not {size}"
        )
    try:
        base = OneDriveSettings(
            base_url=settings.graph_base_url, drive=settings.graph_drive, fragment_size=size
        )
        return dataclasses.replace(base, **overrides)
    except ValueError as exc:
        raise ConfigError(f"graph: {exc}") from None


def build_destination(settings: Settings, **onedrive_overrides: Any) -> Destination:
    """The configured destination; `onedrive_overrides` tune OneDriveSettings (tests, bench)."""
    if settings.destination_kind == "local":
        return LocalFolderDestination(settings.delivered_dir)
    drive_settings = onedrive_settings(settings, **onedrive_overrides)
    try:
        provider = build_token_provider(
            base_url=settings.graph_base_url,
            token=settings.graph_token or None,
            tenant_id=settings.graph_tenant_id or None,
            client_id=settings.graph_client_id or None,
            client_secret=read_secret(
                settings.graph_client_secret,
                settings.graph_client_secret_file,
                "graph_client_secret_file",
            ),
            certificate_path=settings.graph_certificate_path or None,
        )
    except ValueError as exc:
        raise ConfigError(f"graph_client_id: {exc}") from None
    return _OwningOneDrive(drive_settings, provider)


class _OwningOneDrive(OneDriveDestination):
    """A OneDrive destination that also closes its token provider (the credential)."""

    def __init__(self, settings: OneDriveSettings, provider: Any) -> None:
        super().__init__(settings, provider)
        self._provider = provider

    async def aclose(self) -> None:
        await super().aclose()
        await self._provider.aclose()


class JobSources:
    """Opens the bytes of a job (the pipeline's SourceOpener), built from the settings.

    * an upload: its staged bytes (:func:`processing.staging.open_source`): a file of the
      filesystem store, or the object of the S3 store (ranged GETs);
    * a transfer of ``{"upload": id}``: that upload of the configured store -- the filesystem
      store in ``<data_dir>/uploads``, or the S3 store (its record in NATS KV through
      `records`, which the worker sets to its own; its object by ranged GETs) -- only if the
      transfer's owner owns it and it is complete (``source_not_found`` otherwise, whether it
      exists or not);
    * ``{"s3": {"bucket", "key"}}``: the object (``s3_endpoint_url``, ``s3_region``, AWS
      credentials from the standard chain), refused (``too_large``) after its HEAD when it is
      over :func:`transfer_max_size`;
    * ``{"url": ...}``: the URL, refusing private/loopback/link-local addresses unless
      ``transfers_allow_private`` / ``transfers_allow_networks`` let them through (SSRF), at
      most :func:`transfer_max_size` bytes (a larger declared ``Content-Length`` is refused
      before the body is read), spooled under ``<data_dir>/spool`` when the server cannot
      serve ranges.

    The S3 clients are made on first use (also for discarding S3-staged bytes and deleting
    sources, see :attr:`s3_client`) and closed by :meth:`aclose`.
    """

    def __init__(self, settings: Settings, *, records: KvRecords | None = None) -> None:
        self.settings = settings
        self.max_size = transfer_max_size(settings)
        self.policy = url_policy(settings)
        self.records = records
        self._s3: dict[str | None, Any] = {}
        self._uploads: DataStore | None = None

    def s3_client(self, endpoint_url: str | None = None) -> Any:
        endpoint = endpoint_url or self.settings.s3_endpoint_url or None
        if endpoint not in self._s3:
            from processing.sources_s3 import make_s3_client  # boto3 only when it is used

            self._s3[endpoint] = make_s3_client(endpoint, self.settings.s3_region)
        return self._s3[endpoint]

    async def aclose(self) -> None:
        close_store = getattr(self._uploads, "close", None)  # the S3 store's thread pool
        if close_store is not None:
            close_store()
        clients, self._s3 = list(self._s3.values()), {}
        for client in clients:
            close = getattr(client, "close", None)
            if close is not None:
                close()

    async def __call__(self, job: Job) -> tuple[ByteSource, Job]:
        if job.kind == "upload":
            if job.storage is None:
                raise SourceUnavailable(f"upload {job.id} has no staged bytes")
            return await open_source(job.storage, s3_client=self.s3_client), job
        source = job.transfer_source
        if isinstance(source, UploadSource):
            return await self._upload(job, source.upload_id)
        if isinstance(source, S3Source):
            from processing.sources_s3 import S3ByteSource

            s3 = await S3ByteSource.open(self.s3_client(), source.bucket, source.key)
            if s3.size > self.max_size:
                raise SourceUnavailable(
                    f"{s3.uri} is {s3.size} bytes, over the limit of {self.max_size}",
                    code="too_large",
                )
            name = source.key.rsplit("/", 1)[-1] or None
            return s3, dataclasses.replace(
                job, size=s3.size, filename=name, declared_type=s3.content_type
            )
        if isinstance(source, UrlSource):
            from processing.sources_url import UrlByteSource, UrlSourceSettings

            spool = Path(self.settings.data_dir) / "spool"
            spool.mkdir(parents=True, exist_ok=True)
            url = await UrlByteSource.open(
                source.url,
                UrlSourceSettings(max_size=self.max_size, spool_dir=spool, policy=self.policy),
            )
            return url, dataclasses.replace(
                job, size=url.size, filename=url.filename, declared_type=url.content_type
            )
        raise SourceUnavailable(f"unknown transfer source {job.source}", code="source_unsupported")

    def _upload_store(self) -> DataStore:
        """The gateway's store, as the worker sees it (read-only use: `get_info`)."""
        if self._uploads is None:
            if self.settings.store_kind == "file":
                self._uploads = shared_file_store(self.settings.uploads_dir)
            elif self.records is None:
                raise SourceUnavailable(
                    "transfers of S3-staged uploads need the upload records in NATS",
                    code="source_unsupported",
                )
            else:
                from gateway.store.s3store import S3Store  # boto3 only when it is used

                self._uploads = S3Store(
                    self.s3_client(),
                    self.settings.s3_bucket,
                    self.records,
                    prefix=self.settings.s3_prefix,
                    endpoint_url=self.settings.s3_endpoint_url or None,
                    max_size=self.settings.server_max_size,
                    part_size=self.settings.s3_part_size,
                    threads=2,
                )
        return self._uploads

    async def _upload(self, job: Job, upload_id: str) -> tuple[ByteSource, Job]:
        try:
            info = await self._upload_store().get_info(upload_id)
        except StoreError:
            info = None
        if info is None or info.owner != job.owner or not info.is_complete:
            raise SourceUnavailable(
                f"upload {upload_id} not found or not complete", code="source_not_found"
            )
        storage = storage_from_json(info.storage)
        metadata = info.metadata
        job = dataclasses.replace(
            job,
            size=info.size,
            filename=metadata.get("filename"),
            declared_type=metadata.get("filetype"),
            metadata=metadata,
        )
        return await open_source(storage, s3_client=self.s3_client), job


def build_source_opener(settings: Settings, *, records: KvRecords | None = None) -> JobSources:
    return JobSources(settings, records=records)


def build_pipeline(
    settings: Settings, *, steps: Sequence[Step] | None = None, **onedrive_overrides: Any
) -> Pipeline:
    validate_settings(settings)
    sources = build_source_opener(settings)
    return Pipeline(
        destination=build_destination(settings, **onedrive_overrides),
        steps=build_steps(settings) if steps is None else steps,
        path_template=_template(settings),
        conflict=settings.destination_conflict,
        manifest=settings.destination_manifest,
        open_job_source=sources,
        default_drive=settings.graph_drive,
        s3_client=sources.s3_client,
    )
