"""Hook: ask an outside program or service whether the upload may be delivered.

Both kinds get the same JSON document, the upload's facts::

    {"id", "kind": "upload", "owner", "size", "filename", "content_type" (declared),
     "sniffed_type", "metadata", "checksums", "created_at", "source", "storage"}

(``storage`` is ``{"kind": "file", "path": ...}`` for the filesystem store: a command on the
same machine may read the bytes there; it must not change them.)

* **Command** (``checks_hook_command``, split like a shell would, but run without one): the
  document on stdin. Exit 0 accepts; any other exit status vetoes, its stdout (first line) is
  the reason. The command runs with the worker's environment minus every ``TUSGATE_*``
  variable (no secrets for hooks).
* **HTTP** (``checks_hook_url``): the document POSTed as ``application/json``. 2xx accepts; any
  other answer vetoes, with the reason from a JSON body's ``reason``/``detail``/``message`` or
  the body's first line -- except 429, 502, 503 and 504, which say the service is down, not
  no.

A veto is ``vetoed`` (not retryable; the client sees 422 with the reason). A hook that cannot
be asked -- the command is missing, killed by a signal, over ``checks_hook_timeout``; the URL
unreachable or unavailable -- is ``hook_unavailable``, retryable: the attempt is retried with
backoff, and after ``max_deliver`` attempts the upload is aborted. Hooks may therefore see the
same upload more than once and should be idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
from dataclasses import dataclass, field
from typing import Any

import httpx

from processing.errors import CheckFailed, HookUnavailable
from processing.steps.base import StepContext

__all__ = ["MAX_REASON", "CommandHook", "HttpHook", "hook_document"]

#: Characters of a veto reason that are kept (it ends up in a 422 body and an event).
MAX_REASON = 500
_UNAVAILABLE = frozenset({429, 502, 503, 504})


def hook_document(ctx: StepContext) -> dict[str, Any]:
    return {**ctx.job.facts(), "sniffed_type": ctx.facts.get("sniffed_type")}


def _reason(text: str, fallback: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return (lines[0] if lines else fallback)[:MAX_REASON]


def _hook_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TUSGATE_")}


@dataclass(frozen=True)
class CommandHook:
    argv: tuple[str, ...]
    timeout: float = 30.0
    name: str = "hook"

    @classmethod
    def from_command_line(cls, command: str, timeout: float) -> CommandHook:
        argv = tuple(shlex.split(command))
        if not argv:
            raise ValueError("hook command is empty")
        return cls(argv, timeout)

    async def run(self, ctx: StepContext) -> str:
        document = json.dumps(hook_document(ctx)).encode()
        try:
            process = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=_hook_environment(),
            )
        except OSError as exc:
            raise HookUnavailable(f"cannot run the hook {self.argv[0]!r}: {exc.strerror}") from exc
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(document), self.timeout)
        except TimeoutError:
            raise HookUnavailable(f"the hook took longer than {self.timeout:g}s") from None
        finally:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        status = process.returncode
        if status == 0:
            return "accepted" + (
                f": {_reason(stdout.decode(errors='replace'), '')}" if stdout.strip() else ""
            )
        if status is None or status < 0:
            raise HookUnavailable(f"the hook was killed by signal {-(status or 0)}")
        reason = _reason(stdout.decode(errors="replace"), "")
        if not reason:
            reason = _reason(stderr.decode(errors="replace"), f"the hook exited with {status}")
        raise CheckFailed("vetoed", reason)


@dataclass
class HttpHook:
    url: str
    timeout: float = 30.0
    client: httpx.AsyncClient | None = None
    name: str = "hook"
    _owned: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if self.client is None:
            self.client = httpx.AsyncClient(timeout=self.timeout, follow_redirects=False)
            self._owned = True

    async def aclose(self) -> None:
        if self._owned and self.client is not None:
            await self.client.aclose()

    async def run(self, ctx: StepContext) -> str:
        assert self.client is not None
        try:
            response = await self.client.post(
                self.url, json=hook_document(ctx), timeout=self.timeout
            )
        except httpx.HTTPError as exc:
            raise HookUnavailable(f"the hook URL did not answer: {type(exc).__name__}") from exc
        if 200 <= response.status_code < 300:
            return f"accepted (HTTP {response.status_code})"
        if response.status_code in _UNAVAILABLE:
            raise HookUnavailable(f"the hook URL answered {response.status_code}")
        raise CheckFailed("vetoed", self._reason(response))

    @staticmethod
    def _reason(response: httpx.Response) -> str:
        fallback = f"the hook answered HTTP {response.status_code}"
        try:
            body = response.json()
        except ValueError:
            return _reason(response.text, fallback)
        if isinstance(body, dict):
            for key in ("reason", "detail", "message", "title"):
                if isinstance(body.get(key), str) and body[key].strip():
                    return _reason(body[key], fallback)
        return fallback
