"""Fixtures for the tus-js-client tests: a real server subprocess and the Node client."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    from tests.helpers.gateway_proc import REPO_ROOT, ServerProcess, running_server
except ModuleNotFoundError:  # `pytest` run without the repository root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.helpers.gateway_proc import REPO_ROOT, ServerProcess, running_server

UPLOAD_SCRIPT = Path(__file__).with_name("upload.mjs")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """`tusgate serve` on a free loopback port with its own data dir, processing disabled."""
    with running_server(tmp_path_factory.mktemp("gateway")) as server:
        yield server
        # Shown by pytest next to a failure of the module's tests: the server's side of it.
        print(f"--- {server.kind} log ---\n{server.log()}")


@pytest.fixture(scope="module")
def gateway_server(gateway: ServerProcess) -> str:
    """The TUS endpoint of the running server, e.g. ``http://127.0.0.1:PORT/files/``."""
    return gateway.endpoint


@pytest.fixture(scope="session")
def node_upload_cmd() -> list[str]:
    """``node tests/js/upload.mjs``; skips when the npm packages are not installed."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    if not (REPO_ROOT / "node_modules" / "tus-js-client").is_dir():
        pytest.skip("node_modules is missing: run `npm ci` at the repository root")
    return [node, str(UPLOAD_SCRIPT)]
