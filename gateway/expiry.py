"""The expiration sweeper: unfinished uploads idle past `store_expiration` lose their bytes.

An expired upload keeps a tombstone, so it answers 410 Gone afterwards (not 404): the client
learns it must start over. A sweep skips uploads whose lock is held -- bytes are arriving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from gateway.store.base import UploadInfo
from gateway.tus.context import TusContext

__all__ = ["run_sweeper", "sweep_expired"]

log = logging.getLogger("tusgate.gateway")


async def sweep_expired(ctx: TusContext, now: float | None = None) -> list[str]:
    lister = ctx.store.lister
    if lister is None or not ctx.settings.store_expiration:
        return []
    now = time.time() if now is None else now
    is_expired = expired_by(ctx, now)
    expired = []
    async for info in lister.list_uploads():
        if info.gone or not is_expired(info) or ctx.locker.is_held(info.id):
            continue
        # Checked again by the store as it writes the tombstone: another gateway instance may
        # have written to the upload since it was listed.
        if not await lister.discard_bytes(info.id, "expired", only_if=is_expired):
            continue
        ctx.digests.forget(info.id)
        await ctx.lifecycle.expired(info)
        expired.append(info.id)
    if expired:
        log.info("expired %d unfinished uploads", len(expired))
    return expired


def expired_by(ctx: TusContext, now: float) -> Callable[[UploadInfo], bool]:
    """Whether an upload is expired at `now`."""

    def expired(info: UploadInfo) -> bool:
        expires_at = ctx.expires_at(info)
        return expires_at is not None and expires_at <= now

    return expired


async def run_sweeper(ctx: TusContext) -> None:
    while True:
        await asyncio.sleep(ctx.settings.store_sweep_interval)
        try:
            await sweep_expired(ctx)
        except Exception:  # a failed sweep must not end the sweeper; the next one retries
            log.exception("expiry sweep failed")
