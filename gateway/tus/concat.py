"""Concatenation: a final upload is the partial uploads it names, in order.

With every partial complete, the final is built at once by the store (the filesystem store lets
the kernel copy; S3 copies parts server-side). With unfinished partials (concatenation-unfinished)
the final waits: each partial records the finals waiting for it (`part_of`), and whichever of
"final created" and "last partial completed" happens second builds it.
"""

from __future__ import annotations

import logging

from gateway import errors
from gateway.store.base import UploadInfo
from gateway.tus.context import TusContext
from gateway.tus.write import finish_if_complete

__all__ = ["assemble_if_ready", "load_partials"]

log = logging.getLogger("tusgate.gateway")


async def load_partials(ctx: TusContext, ids: list[str], owner: str) -> list[UploadInfo]:
    partials = []
    for upload_id in ids:
        info = await ctx.store.core.get_info(upload_id)
        if not info.is_partial or info.owner != owner:
            raise errors.INVALID_CONCAT.error(f"{upload_id} is not a partial upload")
        partials.append(info)
    return partials


async def assemble_if_ready(ctx: TusContext, final_id: str) -> UploadInfo:
    """Build the final upload if all its partials are complete; returns its current info."""
    assert ctx.store.concater is not None
    async with ctx.locker.hold(final_id):
        final = await ctx.store.core.get_info(final_id)
        if final.assembled:
            return final
        partials = [await ctx.store.core.get_info(p) for p in final.partial_uploads]
        if not all(p.is_complete for p in partials):
            return final
        size = sum(p.size or 0 for p in partials)
        await ctx.store.concater.concat(final, partials)
        await ctx.store.core.update_info(final_id, lambda i: i.replace(size=size, assembled=True))
        final = await ctx.store.core.get_info(final_id)
    log.info("final upload %s assembled from %d partials", final_id, len(partials))
    if final.size != final.offset:
        raise errors.INVALID_CONCAT.error("assembled size does not match")
    await finish_if_complete(ctx, None, final, None)
    return final
