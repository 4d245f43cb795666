"""Errors of the delivery layer: one root, a few named kinds.

::

    DeliveryError(code, message, retryable)
    ├── InvalidTarget           invalid_target           the path is unusable (traversal, ...)
    ├── DeliveryConflict        conflict                 conflict=fail and the name is taken
    ├── DeliveryCanceled        canceled                 the cancel event was set
    ├── ChecksumMismatch        checksum_mismatch        bytes differ from the declared hash
    ├── SourceFailed            source_failed            the ByteSource could not be read
    │                                                    (or the source's own, more precise
    │                                                    code: source_changed, too_large, ...)
    ├── DestinationUnavailable  destination_unavailable  5xx, throttling, timeouts, dropped
    │                                                    connections, disk errors, once the
    │                                                    retry budget is spent (retryable)
    ├── Unauthorized            unauthorized             401/403, or no token could be had
    └── DestinationRejected     destination_rejected     any other 4xx from the remote

``retryable`` is the decision the worker needs: ``True`` → ``nak`` with a delay and try again
later (the checkpoint lets the next attempt resume); ``False`` → emit ``processing.aborted``.
Foreign exceptions (httpx, OSError, azure-identity) are translated where they are caught, with
the original kept as ``__cause__``; nothing else leaves a destination.
"""

from __future__ import annotations

__all__ = [
    "ChecksumMismatch",
    "DeliveryCanceled",
    "DeliveryConflict",
    "DeliveryError",
    "DestinationRejected",
    "DestinationUnavailable",
    "InvalidTarget",
    "SourceFailed",
    "Unauthorized",
]


class DeliveryError(Exception):
    """Root of every error a destination raises."""

    code: str = "delivery_failed"
    default_retryable: bool = False

    def __init__(
        self, message: str, *, retryable: bool | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = self.default_retryable if retryable is None else retryable
        if code is not None:
            self.code = code

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r}, retryable={self.retryable})"

    def as_dict(self) -> dict[str, object]:
        """The ``error`` object of the status JSON (SPEC §3.3)."""
        return {"code": self.code, "message": self.message, "retryable": self.retryable}


class InvalidTarget(DeliveryError):
    code = "invalid_target"


class DeliveryConflict(DeliveryError):
    code = "conflict"


class DeliveryCanceled(DeliveryError):
    code = "canceled"


class ChecksumMismatch(DeliveryError):
    code = "checksum_mismatch"


class SourceFailed(DeliveryError):
    code = "source_failed"


class DestinationUnavailable(DeliveryError):
    code = "destination_unavailable"
    default_retryable = True


class Unauthorized(DeliveryError):
    code = "unauthorized"


class DestinationRejected(DeliveryError):
    code = "destination_rejected"
