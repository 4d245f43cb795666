"""GET /metrics (Prometheus text format 0.0.4) and GET /healthz, /readyz (SPEC §3.5).

A few counters kept in process memory; each instance exposes its own and Prometheus sums them.

    tusgate_http_requests_total{method,status}      requests answered
    tusgate_bytes_received_total                    body bytes stored
    tusgate_active_uploads                          requests streaming bodies right now
    tusgate_upload_duration_seconds (histogram)     creation to last byte, completed uploads
    tusgate_events_published_total / _publish_failures_total / _events_pending   (outbox)
    tusgate_processing_outcomes_total{outcome}      finished / aborted seen by this instance
    tusgate_s3_buffer_bytes / _limit_bytes / _waits_total / _exhausted_total
                                                    the S3 store's budget of part buffers
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from gateway.errors import Handler

__all__ = ["METRICS", "Metrics", "add_metrics_routes", "metrics_middleware"]

DURATION_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)


@dataclass
class Metrics:
    requests: Counter[tuple[str, int]] = field(default_factory=Counter)
    bytes_received: int = 0
    active_uploads: int = 0
    duration_counts: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    duration_sum: float = 0.0
    outcomes: Counter[str] = field(default_factory=Counter)
    outbox: Any = None  # the FileOutbox, for its counters (None without NATS)
    budget: Any = None  # the S3 store's ByteBudget (None for other stores, or no limit)

    def observe_event(self, event: Any) -> None:
        name = getattr(event, "NAME", "")
        if name in ("processing.finished", "processing.aborted"):
            self.outcomes[name.rsplit(".", 1)[1]] += 1

    def observe_upload_duration(self, seconds: float) -> None:
        self.duration_counts[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.duration_sum += seconds

    def render(self) -> str:
        lines = [
            "# HELP tusgate_http_requests_total HTTP requests answered.",
            "# TYPE tusgate_http_requests_total counter",
        ]
        for (method, status), count in sorted(self.requests.items()):
            lines.append(f'tusgate_http_requests_total{{method="{method}",status="{status}"}} {count}')
        lines += [
            "# HELP tusgate_bytes_received_total Upload bytes stored.",
            "# TYPE tusgate_bytes_received_total counter",
            f"tusgate_bytes_received_total {self.bytes_received}",
            "# HELP tusgate_active_uploads Requests streaming an upload body now.",
            "# TYPE tusgate_active_uploads gauge",
            f"tusgate_active_uploads {self.active_uploads}",
            "# HELP tusgate_upload_duration_seconds Creation to last byte of completed uploads.",
            "# TYPE tusgate_upload_duration_seconds histogram",
        ]
        cumulative = 0
        for bound, count in zip((*DURATION_BUCKETS, "+Inf"), self.duration_counts, strict=True):
            cumulative += count
            lines.append(f'tusgate_upload_duration_seconds_bucket{{le="{bound}"}} {cumulative}')
        lines += [
            f"tusgate_upload_duration_seconds_sum {self.duration_sum}",
            f"tusgate_upload_duration_seconds_count {cumulative}",
        ]
        if self.outbox is not None:
            lines += [
                "# HELP tusgate_events_published_total Events acknowledged by JetStream.",
                "# TYPE tusgate_events_published_total counter",
                f"tusgate_events_published_total {self.outbox.published}",
                "# HELP tusgate_events_publish_failures_total Failed publish attempts (retried).",
                "# TYPE tusgate_events_publish_failures_total counter",
                f"tusgate_events_publish_failures_total {self.outbox.failed_attempts}",
                "# HELP tusgate_events_pending Events recorded, not yet acknowledged.",
                "# TYPE tusgate_events_pending gauge",
                f"tusgate_events_pending {self.outbox.pending}",
            ]
        if self.budget is not None:
            lines += [
                "# HELP tusgate_s3_buffer_bytes Bytes of S3 part buffers held by PATCHes now.",
                "# TYPE tusgate_s3_buffer_bytes gauge",
                f"tusgate_s3_buffer_bytes {self.budget.in_use}",
                "# HELP tusgate_s3_buffer_limit_bytes The most they may hold (s3.buffer_limit).",
                "# TYPE tusgate_s3_buffer_limit_bytes gauge",
                f"tusgate_s3_buffer_limit_bytes {self.budget.limit}",
                "# HELP tusgate_s3_buffer_waits_total PATCHes that waited for buffer room.",
                "# TYPE tusgate_s3_buffer_waits_total counter",
                f"tusgate_s3_buffer_waits_total {self.budget.waits}",
                "# HELP tusgate_s3_buffer_exhausted_total PATCHes answered 503 for want of room.",
                "# TYPE tusgate_s3_buffer_exhausted_total counter",
                f"tusgate_s3_buffer_exhausted_total {self.budget.exhausted}",
            ]
        lines += [
            "# HELP tusgate_processing_outcomes_total Processing outcomes seen by this instance.",
            "# TYPE tusgate_processing_outcomes_total counter",
        ]
        for outcome in ("finished", "aborted"):
            lines.append(f'tusgate_processing_outcomes_total{{outcome="{outcome}"}} {self.outcomes[outcome]}')
        return "\n".join(lines) + "\n"


METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)



@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        method = request.method if request.method in ("GET", "HEAD", "POST", "PATCH", "DELETE", "OPTIONS") else "OTHER"
        request.app[METRICS].requests[(method, status)] += 1


async def handle_metrics(request: web.Request) -> web.Response:
    return web.Response(
        text=request.app[METRICS].render(), content_type="text/plain", charset="utf-8",
        headers={"X-Content-Type-Options": "nosniff"},
    )


def add_metrics_routes(app: web.Application) -> None:
    app.router.add_get("/metrics", handle_metrics)
