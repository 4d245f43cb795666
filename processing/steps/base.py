"""What a pipeline step is, and what it is given.

A step checks one thing about a job and either passes (returning a one-line detail for the
``processing.step-finished`` event) or raises :class:`~processing.errors.CheckFailed` (a veto,
not retryable) / another :class:`~processing.errors.ProcessingError` (e.g. a hook that cannot be
reached, retryable). Steps run in the configured order; they may leave facts for later steps
(the sniffed content type, for the hook and the delivery).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from processing.job import Job
from processing.sources import ByteSource

__all__ = ["Step", "StepContext", "StepProgress"]

#: Called with the bytes of the source a step has read so far.
StepProgress = Callable[[int], Awaitable[None]]


async def _no_progress(done: int) -> None:
    return None


@dataclass
class StepContext:
    job: Job
    source: ByteSource
    #: Facts found by earlier steps: ``sniffed_type`` (sniff), ``verified`` (checksum) ...
    facts: dict[str, Any] = field(default_factory=dict)
    progress: StepProgress = _no_progress


class Step(Protocol):
    @property
    def name(self) -> str:
        """The step's name in ``processing.step-finished`` (``size``, ``sniff``, ...)."""
        ...

    async def run(self, ctx: StepContext) -> str:
        """Check the job; return a short detail, or raise a ProcessingError."""
        ...
