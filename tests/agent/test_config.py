"""Configuration: the seed's example.yaml, LMCACHE_<KEY> overrides, unknown keys, wrong types."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from kvmesh.instance_agent.config import GIB, AgentConfig, ConfigError, load_config

EXAMPLE = Path(__file__).resolve().parents[2] / "example.yaml"


def test_example_yaml_loads_unchanged() -> None:
    cfg = load_config(EXAMPLE, env={})
    assert cfg.chunk_size == 256
    assert cfg.local_cpu is True
    assert cfg.max_local_cpu_bytes == 5 * GIB
    assert cfg.enable_controller is True
    assert cfg.lmcache_instance_id == "lmcache_default_instance"
    assert cfg.controller_pull_url == "localhost:9001"
    assert cfg.lmcache_worker_ports == [8001]
    assert cfg.worker_port(0) == 8001 and cfg.worker_port(1) == 8002
    assert cfg.p2p_host == "localhost" and cfg.p2p_init_ports == [8200]
    assert cfg.unknown_keys == []


def test_config_file_from_environment() -> None:
    cfg = load_config(env={"LMCACHE_CONFIG_FILE": str(EXAMPLE)})
    assert cfg.lmcache_instance_id == "lmcache_default_instance"


def test_environment_overrides_the_file() -> None:
    env = {"LMCACHE_CHUNK_SIZE": "16", "LMCACHE_LOCAL_CPU": "false", "LMCACHE_LOCAL_DISK": "file:///tmp/kvm",
           "LMCACHE_MAX_LOCAL_DISK_SIZE": "0.5", "LMCACHE_LMCACHE_WORKER_PORTS": "0, 9002",
           "LMCACHE_ENABLE_CONTROLLER": "0", "LMCACHE_CONTROLLER_URL": "localhost:7777",
           "LMCACHE_EXTRA_CONFIG": '{"max_tokens": 100}'}
    cfg = load_config(EXAMPLE, env=env)
    assert cfg.chunk_size == 16
    assert cfg.local_cpu is False
    assert cfg.local_disk == "/tmp/kvm"  # LMCache's file:// form accepted
    assert cfg.max_local_disk_bytes == GIB // 2
    assert cfg.lmcache_worker_ports == [0, 9002]
    assert cfg.worker_port(1) == 9002
    assert cfg.enable_controller is False
    assert cfg.controller_pull_url == "localhost:7777"  # alias
    assert cfg.max_tokens == 100


def test_unknown_keys_are_warned_and_listed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(EXAMPLE.read_text() + "chunck_size: 128\nmystery: 1\n")
    with caplog.at_level(logging.WARNING, logger="kvmesh.instance_agent.config"):
        cfg = load_config(path, env={})
    assert cfg.unknown_keys == ["chunck_size", "mystery"]
    assert cfg.chunk_size == 256
    assert "chunck_size" in caplog.text and "mystery" in caplog.text


@pytest.mark.parametrize(("text", "env", "key"), [
    ("chunk_size: big\n", {}, "chunk_size"),
    ("local_cpu: maybe\n", {}, "local_cpu"),
    ("max_local_cpu_size: [1]\n", {}, "max_local_cpu_size"),
    ("lmcache_worker_ports: [8001, x]\n", {}, "lmcache_worker_ports"),
    ("extra_config: 3\n", {}, "extra_config"),
    ("", {"LMCACHE_CHUNK_SIZE": "1.5"}, "LMCACHE_CHUNK_SIZE"),
    ("", {"LMCACHE_ENABLE_P2P": "perhaps"}, "LMCACHE_ENABLE_P2P"),
    ("chunk_size: 0\n", {}, "chunk_size"),
    ("lmcache_worker_ports: 70000\n", {}, "lmcache_worker_ports"),
    ("local_disk: /tmp/x\n", {}, "max_local_disk_size"),
    ("enable_controller: true\n", {}, "controller_pull_url"),
])
def test_wrong_values_are_a_clear_error_naming_the_key(tmp_path: Path, text: str, env: dict[str, str],
                                                       key: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=key):
        load_config(path, env=env)


def test_not_a_mapping_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path, env={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml", env={})


def test_instance_id_generated_when_absent() -> None:
    a, b = AgentConfig(), AgentConfig()
    assert a.lmcache_instance_id and a.lmcache_instance_id != b.lmcache_instance_id


def test_worker_without_a_port_is_an_error() -> None:
    cfg = AgentConfig(lmcache_worker_ports=[8001, 8002])
    with pytest.raises(ConfigError, match="worker 2"):
        cfg.worker_port(2)
