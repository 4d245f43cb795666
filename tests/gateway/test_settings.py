"""Settings: precedence, validation with one clear line, and docs generated from the table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.settings import ConfigError, configuration_markdown, load_settings

ROOT = Path(__file__).resolve().parents[2]


def test_precedence_defaults_toml_env_flags(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('data_dir = "/srv/x"\n[server]\nport = 2000\nhost = "0.0.0.0"\n')
    s = load_settings(config_file=config, environ={"TUSGATE_SERVER_PORT": "3000"})
    assert (s.server_port, s.server_host, str(s.data_dir)) == (3000, "0.0.0.0", "/srv/x")
    s = load_settings(config_file=config, environ={"TUSGATE_SERVER_PORT": "3000"}, overrides={"server_port": "4000"})
    assert s.server_port == 4000
    assert load_settings(environ={}).server_port == 1080


@pytest.mark.parametrize(
    ("environ", "names"),
    [
        ({"TUSGATE_SERVER_PORT": "abc"}, "server_port"),
        ({"TUSGATE_SERVER_PORT": "-1"}, "server_port"),
        ({"TUSGATE_STORE_KIND": "ftp"}, "store_kind"),
        ({"TUSGATE_PROCESSING_ENABLED": "maybe"}, "processing_enabled"),
        ({"TUSGATE_STORE_KIND": "s3"}, "s3_bucket"),
    ],
)
def test_invalid_values_name_the_key(environ: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        load_settings(environ=environ)


def test_unknown_toml_key(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[server]\nprot = 1\n")
    with pytest.raises(ConfigError, match="prot"):
        load_settings(config_file=config, environ={})


def test_cli_invalid_config_is_one_line_and_nonzero(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--data-dir", str(tmp_path)],
        env={"TUSGATE_SERVER_PORT": "nope", "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "server_port" in lines[0], proc.stderr


def test_configuration_doc_is_generated_from_the_table() -> None:
    assert (ROOT / "docs" / "configuration.md").read_text() == configuration_markdown()


def test_secrets_come_from_settings_or_files_and_never_show(tmp_path: Path) -> None:
    from gateway.settings import read_secret

    secret_file = tmp_path / "secret"
    secret_file.write_text("s3cr3t-from-file\n")
    assert read_secret("direct", str(secret_file), "k") == "direct"
    assert read_secret("", str(secret_file), "k") == "s3cr3t-from-file"
    assert read_secret("", "", "k") is None
    with pytest.raises(ConfigError, match="^graph_client_secret_file: cannot read"):
        read_secret("", str(tmp_path / "missing"), "graph_client_secret_file")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        read_secret("", str(tmp_path / "empty"), "k")
    settings = load_settings(
        environ={
            "TUSGATE_GRAPH_CLIENT_SECRET": "graph-secret-value",
            "TUSGATE_GRAPH_TOKEN": "graph-token-value",
            "TUSGATE_AUTH_KIND": "jwt",
            "TUSGATE_AUTH_JWT_SECRET": "jwt-secret-value",
        }
    )
    shown = repr(settings)
    assert "graph_client_id" in shown  # the rest is shown as usual
    for value in ("graph-secret-value", "graph-token-value", "jwt-secret-value"):
        assert value not in shown
