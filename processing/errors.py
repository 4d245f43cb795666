"""Errors of the processing pipeline: one root, carrying what `processing.aborted` says.

::

    ProcessingError(code, message, retryable)
    ├── CheckFailed          a check refused the upload (never retryable):
    │                        too_large, type_not_allowed, checksum_mismatch, checksum_invalid,
    │                        vetoed
    ├── HookUnavailable      hook_unavailable: the hook could not be asked (retryable)
    └── SourceUnavailable    the bytes cannot be read: source_failed, source_unsupported, or
                             the source's precise code (source_not_found, too_large,
                             address_not_allowed, source_http_404, ...; see
                             processing.sources_s3 and processing.sources_url)

The destinations raise :class:`~processing.destinations.errors.DeliveryError`, which has the
same three attributes; :func:`as_processing_error` turns either (or a foreign exception, as
``internal_error``, retryable) into what the worker reports. ``retryable`` is the worker's ack
decision: ``True`` → ``nak`` with a delay and try again; ``False`` → ``processing.aborted`` now.
"""

from __future__ import annotations

from processing.destinations.errors import DeliveryError
from processing.sources import SourceError

__all__ = [
    "CheckFailed",
    "HookUnavailable",
    "ProcessingError",
    "SourceUnavailable",
    "as_processing_error",
]


class ProcessingError(Exception):
    """Root of the pipeline's own errors."""

    code: str = "processing_failed"
    default_retryable: bool = False

    def __init__(
        self, message: str, *, code: str | None = None, retryable: bool | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.retryable = self.default_retryable if retryable is None else retryable

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code!r}, message={self.message!r}, "
            f"retryable={self.retryable})"
        )

    def as_dict(self) -> dict[str, object]:
        return {"code": self.code, "message": self.message, "retryable": self.retryable}


class CheckFailed(ProcessingError):
    """A configured check refused the upload; the client sees 422 with ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, code=code, retryable=False)


class HookUnavailable(ProcessingError):
    code = "hook_unavailable"
    default_retryable = True


class SourceUnavailable(ProcessingError):
    code = "source_failed"


def as_processing_error(exc: BaseException) -> ProcessingError:
    """What to report for any exception that ended an attempt."""
    if isinstance(exc, ProcessingError):
        return exc
    if isinstance(exc, DeliveryError):
        error = ProcessingError(exc.message, code=exc.code, retryable=exc.retryable)
    elif isinstance(exc, SourceError):
        error = SourceUnavailable(
            exc.message, code=getattr(exc, "code", "source_failed"), retryable=exc.retryable
        )
    else:
        # A bug or an unexpected failure: retry (bounded by max_deliver) rather than lose it.
        error = ProcessingError(
            f"unexpected {type(exc).__name__}: {exc}", code="internal_error", retryable=True
        )
    error.__cause__ = exc
    return error
