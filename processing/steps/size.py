"""Size: refuse uploads over the configured limit (``checks_max_size``), and sources whose
size is not the one announced (a staged file changed or was truncated underneath)."""

from __future__ import annotations

from dataclasses import dataclass

from processing.errors import CheckFailed, SourceUnavailable
from processing.steps.base import StepContext

__all__ = ["SizeLimit"]


@dataclass(frozen=True)
class SizeLimit:
    """``max_size`` bytes at most; 0 means no limit (only the consistency check)."""

    max_size: int = 0
    name: str = "size"

    async def run(self, ctx: StepContext) -> str:
        size = ctx.source.size
        if ctx.job.size is not None and size != ctx.job.size:
            raise SourceUnavailable(f"staged bytes are {size} bytes, the upload has {ctx.job.size}")
        if self.max_size and size > self.max_size:
            raise CheckFailed(
                "too_large", f"{size} bytes is over the limit of {self.max_size} bytes"
            )
        return f"{size} bytes" + (f" (limit {self.max_size})" if self.max_size else "")
