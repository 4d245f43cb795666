"""processing.config: the transfer settings (size limit, SSRF policy) from gateway settings."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from gateway.settings import ConfigError, Settings, load_settings
from processing.config import JobSources, transfer_max_size, url_policy, validate_settings

GiB = 1024**3


def settings(tmp_path: Path, **values: object) -> Settings:
    return load_settings(environ={}, overrides={"data_dir": str(tmp_path), **values})


def test_the_transfer_size_limit(tmp_path: Path) -> None:
    assert transfer_max_size(settings(tmp_path)) == 250 * GiB  # server_max_size
    assert transfer_max_size(settings(tmp_path, transfers_max_size=10)) == 10
    assert transfer_max_size(settings(tmp_path, checks_max_size=5)) == 5
    assert transfer_max_size(settings(tmp_path, transfers_max_size=10, checks_max_size=5)) == 5
    assert transfer_max_size(settings(tmp_path, transfers_max_size=5, checks_max_size=10)) == 5
    assert JobSources(settings(tmp_path, transfers_max_size=7)).max_size == 7


def test_the_url_address_policy(tmp_path: Path) -> None:
    loopback = ipaddress.ip_address("127.0.0.1")
    assert url_policy(settings(tmp_path)).refusal(loopback) == "loopback"
    assert url_policy(settings(tmp_path, transfers_allow_private=True)).refusal(loopback) is None
    listed = url_policy(settings(tmp_path, transfers_allow_networks="10.0.0.0/8, 127.0.0.1"))
    assert listed.refusal(loopback) is None
    assert listed.refusal(ipaddress.ip_address("10.2.3.4")) is None
    assert listed.refusal(ipaddress.ip_address("192.168.1.1")) == "private"


def test_the_environment_names(tmp_path: Path) -> None:
    loaded = load_settings(
        environ={
            "TUSGATE_TRANSFERS_ALLOW_PRIVATE": "true",
            "TUSGATE_TRANSFERS_ALLOW_NETWORKS": "fd00::/8",
            "TUSGATE_TRANSFERS_MAX_SIZE": "1048576",
        }
    )
    assert loaded.transfers_allow_private is True
    assert loaded.transfers_allow_networks == "fd00::/8"
    assert loaded.transfers_max_size == 1048576


def test_a_bad_network_fails_at_start_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^transfers_allow_networks: .*'10\.0\.0\.300'"):
        validate_settings(settings(tmp_path, transfers_allow_networks="10.0.0.0/8,10.0.0.300"))
