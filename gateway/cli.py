"""`tusgate` -- the command line. The only place that reads the environment and argv.

    tusgate up       everything on one machine (for now: the gateway on the filesystem store)
    tusgate serve    one gateway instance
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.app import create_app
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
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {f.name: getattr(args, f.name, None) for f in FIELDS}
    return load_settings(config_file=args.config, overrides=overrides)


async def run_gateway(settings: Settings, *, stop: asyncio.Event) -> None:
    app = create_app(settings)
    runner = web.AppRunner(
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


def _run(coro_factory: Any) -> int:
    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await coro_factory(stop)

    asyncio.run(runner())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = settings_from_args(args)
        Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    except ConfigError as exc:
        print(f"tusgate: invalid configuration: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"tusgate: cannot use data dir: {exc}", file=sys.stderr)
        return 2
    try:
        return _run(lambda stop: run_gateway(settings, stop=stop))
    except OSError as exc:  # e.g. the port is taken
        print(f"tusgate: cannot start: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
