"""`tusgate` -- the command line. The only place that reads the environment and argv.

    tusgate up       everything on one machine: embedded nats-server, gateway, one worker
    tusgate serve    one gateway instance (NATS at TUSGATE_NATS_URL)
    tusgate process  processing workers (NATS at TUSGATE_NATS_URL)
    tusgate upload FILE [--url URL] [--async]
    tusgate status ID [--url URL]
    tusgate events [--follow] [--subject S]

The client commands (upload, status, transfer) send `Authorization: Bearer $TUSGATE_TOKEN`
when that variable is set (a gateway with auth.kind jwt wants it).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from events.errors import NatsServerError
from events.natsd import EmbeddedNats
from gateway.app import S3_NEEDS_NATS, create_app
from gateway.client_cli import (
    DEFAULT_URL,
    print_events,
    show_status,
    transfer_body,
    transfer_command,
    upload_file,
)
from gateway.http_errors import OneLineErrorRunner
from gateway.settings import FIELDS, ConfigError, Settings, load_settings

__all__ = ["main", "run_gateway"]

# Short names that scripts rely on (SPEC §7), besides the generated --section-key flags.
ALIASES = {
    "data_dir": ["--data-dir"],
    "server_host": ["--host"],
    "server_port": ["--port"],
    "server_behind_proxy": ["--behind-proxy"],
    "nats_port": ["--nats-port"],
    "nats_url": ["--nats-url"],
}


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML file with settings ([section] key = value)")
    group = parser.add_argument_group("settings (each also TUSGATE_<SECTION>_<KEY>)")
    for f in FIELDS:
        flags = [f.flag, *[a for a in ALIASES.get(f.name, []) if a != f.flag]]
        if f.type is bool:
            group.add_argument(
                *flags, dest=f.name, default=None, nargs="?", const="true", metavar="BOOL",
                help=f"{f.doc} (default {str(f.default).lower()}; env {f.env})",
            )
        else:
            group.add_argument(
                *flags, dest=f.name, default=None, metavar=f.type.__name__.upper(),
                help=f"{f.doc} (default {f.default!s}; env {f.env})",
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tusgate", description="A resumable transfer gateway.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="run everything on this machine (embedded mode)")
    _add_setting_flags(up)
    serve = commands.add_parser("serve", help="run one gateway instance")
    _add_setting_flags(serve)
    process = commands.add_parser("process", help="run processing workers")
    _add_setting_flags(process)

    upload = commands.add_parser("upload", help="upload a file (resumable), then follow processing")
    upload.add_argument("file", type=Path)
    upload.add_argument("--url", default=DEFAULT_URL, help=f"TUS endpoint (default {DEFAULT_URL})")
    upload.add_argument("--async", dest="respond_async", action="store_true",
                        help="send Prefer: respond-async and follow Progress-Location")
    upload.add_argument("--chunk-size", type=int, default=8 * 1024 * 1024, help="bytes per PATCH")
    status = commands.add_parser("status", help="print the status of an upload")
    status.add_argument("id")
    status.add_argument("--url", default=DEFAULT_URL, help=f"TUS endpoint (default {DEFAULT_URL})")
    transfer = commands.add_parser("transfer", help="server-side transfers into a destination")
    actions = transfer.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="request a transfer")
    source = create.add_mutually_exclusive_group(required=True)
    source.add_argument("--s3", metavar="BUCKET/KEY", help="an S3 object")
    source.add_argument("--url", dest="source_url", metavar="URL", help="an http(s) URL")
    create.add_argument("--to", required=True, metavar="onedrive:/PATH|local:/PATH",
                        type=_destination_arg, help="where the file goes")
    create.add_argument("--conflict", choices=("fail", "replace", "rename"), default="fail")
    create.add_argument("--description")
    create.add_argument("--delete-source", action="store_true", help="delete the S3 object after success")
    create.add_argument("--follow", action="store_true", help="follow progress to the end")
    for name in ("status", "cancel"):
        action = actions.add_parser(name, help=f"{name} of a transfer")
        action.add_argument("id")
    for action in (create, *[actions.choices[n] for n in ("status", "cancel")]):
        action.add_argument("--server", default=DEFAULT_URL, help=f"gateway URL (default {DEFAULT_URL})")
    events = commands.add_parser("events", help="print events from NATS as JSON lines")
    events.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    events.add_argument("--subject", action="append", default=None,
                        help="subject filter, e.g. tusgate.upload.> (repeatable)")
    events.add_argument("--nats-url", default=None, help="default: TUSGATE_NATS_URL or nats://127.0.0.1:4222")
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {f.name: getattr(args, f.name, None) for f in FIELDS}
    return load_settings(config_file=args.config, overrides=overrides)


async def run_gateway(settings: Settings, *, stop: asyncio.Event) -> None:
    if settings.auth_kind == "none" and not _is_loopback(settings.server_host):
        logging.getLogger("tusgate").warning(
            "auth.kind is none and the gateway listens on %s: whoever reaches it can upload, "
            "read and delete every upload (set TUSGATE_AUTH_KIND=jwt, or listen on 127.0.0.1)",
            settings.server_host,
        )
    app = create_app(settings)
    runner = OneLineErrorRunner(
        app,
        access_log=None,
        shutdown_timeout=5.0,
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.server_host, settings.server_port)
    try:
        await site.start()
        port = runner.addresses[0][1] if runner.addresses else settings.server_port
        print(
            f"tusgate listening on http://{settings.server_host}:{port}{settings.server_base_path}",
            flush=True,
        )
        await stop.wait()
    finally:
        await runner.cleanup()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def run_up(settings: Settings, *, stop: asyncio.Event) -> None:
    """Embedded mode: a nats-server of our own (unless TUSGATE_NATS_URL), gateway and worker."""
    nats: EmbeddedNats | None = None
    if not settings.nats_url:
        nats = EmbeddedNats(Path(settings.data_dir), port=settings.nats_port)
        await nats.astart()
        print(f"nats listening on {nats.url}", flush=True)
        settings = settings.replace(nats_url=nats.url)
    try:
        tasks = [asyncio.create_task(run_gateway(settings, stop=stop), name="gateway")]
        if settings.processing_enabled:
            tasks.append(asyncio.create_task(run_worker(settings, stop=stop), name="worker"))
        # Whichever part ends first (Ctrl-C, or a crash) ends the others: all or nothing.
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        stop.set()
        await asyncio.gather(*tasks)
    finally:
        if nats is not None:
            await nats.astop()


async def run_worker(settings: Settings, *, stop: asyncio.Event) -> None:
    from processing.cli import run_process

    await run_process(settings, stop)


def _run(coro_factory: Any) -> int:
    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await coro_factory(stop)

    asyncio.run(runner())
    return 0


def _destination_arg(value: str) -> str:
    kind, sep, path = value.partition(":")
    if kind not in ("onedrive", "local") or not sep or not path:
        raise argparse.ArgumentTypeError("expected onedrive:/path or local:/path")
    return value


def _transfer(a: argparse.Namespace) -> int:
    if a.action == "create":
        body = transfer_body(a.s3, a.source_url, a.to, a.conflict, a.description, a.delete_source)
        return asyncio.run(transfer_command("create", url=a.server, body=body, follow=a.follow))
    return asyncio.run(transfer_command(a.action, url=a.server, transfer_id=a.id))


def _nats_url_for_client(args: argparse.Namespace) -> str:
    return str(args.nats_url or os.environ.get("TUSGATE_NATS_URL") or "nats://127.0.0.1:4222")


CLIENT_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "upload": lambda a: upload_file(a.file, url=a.url, chunk_size=a.chunk_size,
                                    respond_async=a.respond_async),
    "status": lambda a: asyncio.run(show_status(a.id, a.url)),
    "transfer": _transfer,
    "events": lambda a: asyncio.run(
        print_events(_nats_url_for_client(a), follow=a.follow, subjects=a.subject or ["tusgate.>"])
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in CLIENT_COMMANDS:
        return CLIENT_COMMANDS[args.command](args)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = settings_from_args(args)
        if args.command == "process" or (args.command == "up" and settings.processing_enabled):
            from processing.config import validate_settings  # the worker's own settings

            validate_settings(settings)
        Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    except ConfigError as exc:
        print(f"tusgate: invalid configuration: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"tusgate: cannot use data dir: {exc}", file=sys.stderr)
        return 2
    servers = {"up": run_up, "serve": run_gateway, "process": run_worker}
    if args.command in ("serve", "process") and not settings.nats_url:
        if args.command == "process" or settings.store_kind == "s3":
            why = S3_NEEDS_NATS if args.command == "serve" else "nats_url: required by process"
            print(f"tusgate: invalid configuration: {why}", file=sys.stderr)
            return 2
        logging.getLogger("tusgate").warning("no TUSGATE_NATS_URL: a pure TUS server, no events")
    try:
        return _run(lambda stop: servers[args.command](settings, stop=stop))
    except NatsServerError as exc:
        print(f"tusgate: cannot start nats-server: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. the port is taken
        print(f"tusgate: cannot start: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
