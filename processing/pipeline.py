"""The pipeline of one attempt: open the bytes, run the checks, deliver, write the manifest.

    open source ─▶ steps (size, sniff, checksum, hook)  ─▶ deliver          ─▶ manifest
                   progress step "processing"              progress step
                                                           "finalizing"

It knows nothing of NATS: the worker gives it a :class:`Reporter` (which turns step results and
progress into events) and a CheckpointStore (NATS KV), and decides what a failure means for
the message. Everything that goes wrong leaves as a ProcessingError or DeliveryError; the
worker maps both through :func:`processing.errors.as_processing_error`.

Where a file goes: an upload goes to the configured destination, at the path rendered from
the template (``{owner}/{date}/{filename}``: the date is the upload's creation day, UTC); a
transfer names its destination kind, path and conflict behaviour itself, and must name the
configured kind.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from events.model import S3Source, UploadSource
from processing.destinations import (
    CheckpointStore,
    DeliveryError,
    DeliveryResult,
    DeliveryTarget,
    Destination,
    Manifest,
    render_path,
    sanitize_path,
)
from processing.destinations.base import CONFLICT_BEHAVIOURS, Conflict
from processing.errors import ProcessingError, SourceUnavailable
from processing.job import Job
from processing.sources import ByteSource
from processing.staging import S3ClientFactory, open_source
from processing.steps.base import Step, StepContext
from processing.steps.sniff import GENERIC_BINARY

__all__ = ["Pipeline", "PipelineResult", "Reporter", "SourceOpener"]

log = logging.getLogger("tusgate.processing")

Phase = Literal["processing", "finalizing"]
#: Opens the bytes of a job (the default: the upload's staged bytes; transfers need more).
SourceOpener = Callable[[Job], Awaitable[tuple[ByteSource, Job]]]


class Reporter(Protocol):
    """Where the pipeline says how it is going (the worker publishes it as events)."""

    async def step_finished(self, step: str, ok: bool, detail: str | None) -> None: ...

    async def progress(self, phase: Phase, done: int, total: int | None) -> None: ...


@dataclass(frozen=True)
class PipelineResult:
    delivery: DeliveryResult
    #: ``processing.finished``'s destination: ``{"local": {"path"}}`` or
    #: ``{"onedrive": {"drive", "path"}}``.
    destination: dict[str, Any]
    content_type: str
    manifest_path: str | None = None
    #: The ETag of the S3 object delivered (an ``{"s3": ...}`` transfer): ``delete_source``
    #: deletes that version only.
    source_etag: str | None = None


async def open_upload_source(job: Job) -> tuple[ByteSource, Job]:
    """The default SourceOpener: an upload's staged bytes. Transfers need a resolver that
    knows the stores (see :func:`processing.config.build_source_opener`)."""
    if job.storage is None:
        raise SourceUnavailable(
            f"{job.kind} {job.id} has no staged bytes to read", code="source_unsupported"
        )
    return await open_source(job.storage), job


def result_destination(result: DeliveryResult) -> dict[str, Any]:
    """``local:<path>`` / ``onedrive:<drive>/root:/<path>`` as the event's destination object."""
    kind, _, rest = result.destination.partition(":")
    if kind == "onedrive" and "/root:/" in rest:
        drive = rest.split("/root:/", 1)[0].strip("/")
        return {"onedrive": {"drive": drive, "path": "/" + result.path}}
    return {kind or "local": {"path": result.path}}


class Pipeline:
    """Checks and delivery for jobs; one instance serves every job of a worker."""

    def __init__(
        self,
        *,
        destination: Destination,
        steps: Sequence[Step] = (),
        path_template: str = "{owner}/{date}/{filename}",
        conflict: Conflict = "rename",
        manifest: bool = False,
        open_job_source: SourceOpener = open_upload_source,
        default_drive: str = "me",
        s3_client: S3ClientFactory | None = None,
    ) -> None:
        self.destination = destination
        #: S3 clients by endpoint, for the worker's clean-ups after a delivery (S3-staged
        #: bytes, ``delete_source``); None: nothing in S3 is cleaned up.
        self.s3_client = s3_client
        self.steps = tuple(steps)
        self.path_template = path_template
        self.conflict = conflict
        self.manifest = manifest
        self.open_job_source = open_job_source
        self.default_drive = default_drive

    async def aclose(self) -> None:
        aclose_sources = getattr(self.open_job_source, "aclose", None)
        if aclose_sources is not None:
            await aclose_sources()
        for step in self.steps:
            aclose = getattr(step, "aclose", None)
            if aclose is not None:
                await aclose()
        await self.destination.aclose()

    async def run(
        self,
        job: Job,
        *,
        checkpoint: CheckpointStore,
        reporter: Reporter,
        cancel: asyncio.Event | None = None,
    ) -> PipelineResult:
        source, job = await self.open_job_source(job)
        try:
            return await self._run(job, source, checkpoint, reporter, cancel)
        finally:
            aclose = getattr(source, "aclose", None)  # a URL source's spool file and session
            if aclose is not None:
                await aclose()

    async def _run(
        self,
        job: Job,
        source: ByteSource,
        checkpoint: CheckpointStore,
        reporter: Reporter,
        cancel: asyncio.Event | None,
    ) -> PipelineResult:
        total = source.size

        async def checked(done: int) -> None:
            await reporter.progress("processing", done, total)

        ctx = StepContext(job=job, source=source, progress=checked)
        await reporter.progress("processing", 0, total)
        for step in self.steps:
            try:
                detail = await step.run(ctx)
            except ProcessingError as exc:
                await reporter.step_finished(step.name, False, exc.message)
                raise
            await reporter.step_finished(step.name, True, detail)

        target = self.target_for(job, ctx.facts.get("sniffed_type"))

        async def delivered(done: int) -> None:
            await reporter.progress("finalizing", done, total)

        await reporter.progress("finalizing", 0, total)
        try:
            result = await self.destination.deliver(
                source, target, checkpoint=checkpoint, progress=delivered, cancel=cancel
            )
        except DeliveryError as exc:
            await reporter.step_finished("deliver", False, exc.message)
            raise
        await reporter.step_finished("deliver", True, result.destination)
        manifest_path = None
        if self.manifest:
            manifest = Manifest.for_result(
                result,
                content_type=target.content_type,
                owner=job.owner,
                source=job.source,
                metadata=job.metadata,
                created_at=job.created_at,
            )
            manifest_path = await self.destination.write_manifest(result, manifest)
            await reporter.step_finished("manifest", True, manifest_path)
        return PipelineResult(
            delivery=result,
            destination=result_destination(result),
            content_type=target.content_type,
            manifest_path=manifest_path,
            source_etag=_s3_etag(job, source),
        )

    def target_for(self, job: Job, sniffed: str | None) -> DeliveryTarget:
        content_type = job.declared_type or sniffed or GENERIC_BINARY
        if job.destination is None:
            day = (job.created_at or datetime.now(UTC)).astimezone(UTC)
            path = render_path(
                self.path_template,
                owner=job.owner,
                filename=job.filename,
                upload_id=job.id,
                date=day,
            )
            return DeliveryTarget(
                key=job.id,
                path=path,
                conflict=self.conflict,
                content_type=content_type,
                sha256=job.sha256,
                owner=job.owner,
            )
        kind, options = _single(job.destination)
        if kind != self.destination.kind:
            raise ProcessingError(
                f"the transfer asks for a {kind!r} destination; this worker delivers to "
                f"{self.destination.kind!r}",
                code="destination_not_configured",
            )
        raw_path = options.get("path")
        if not isinstance(raw_path, str) or not raw_path.strip("/ "):
            raise ProcessingError("the transfer's destination has no path", code="invalid_target")
        conflict = options.get("conflict", self.conflict)
        if conflict not in CONFLICT_BEHAVIOURS:
            raise ProcessingError(
                f"conflict {conflict!r} is not one of {CONFLICT_BEHAVIOURS}", code="invalid_target"
            )
        drive = self._transfer_drive(job, options.get("drive")) if kind == "onedrive" else None
        return DeliveryTarget(
            key=job.id,
            path=sanitize_path(raw_path),
            conflict=conflict,
            content_type=content_type,
            sha256=job.sha256,
            owner=job.owner,
            drive=drive,
        )

    def _transfer_drive(self, job: Job, requested: Any) -> str | None:
        """A transfer may name the configured drive (or ``me`` for it), nothing else: the
        worker's Graph credential can often write into every user's drive, and the owner of a
        transfer must not choose one."""
        if requested in (None, "", "me", self.default_drive):
            return None
        if requested == self.default_drive.replace("{owner}", job.owner):
            return None
        raise ProcessingError(
            f"transfers may deliver to the configured drive only, not {requested!r}",
            code="drive_not_allowed",
        )


def _s3_etag(job: Job, source: ByteSource) -> str | None:
    if not isinstance(job.transfer_source, S3Source):
        return None
    etag = getattr(source, "etag", None)
    return etag if isinstance(etag, str) else None


def _single(destination: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(destination, dict) and len(destination) == 1:
        ((kind, options),) = destination.items()
        if isinstance(options, dict):
            return str(kind), options
    raise ProcessingError(
        'the transfer\'s destination must be one object such as {"local": {"path": ...}}',
        code="invalid_target",
    )


def upload_source_id(job: Job) -> str | None:
    """The upload a transfer copies, if its source is ``{"upload": id}``."""
    return job.transfer_source.upload_id if isinstance(job.transfer_source, UploadSource) else None
