"""The toolstack configuration: xend's keys and defaults, new keys, clear errors."""
from __future__ import annotations

from pathlib import Path

import pytest

from xend_tmem import config as cfgmod
from xend_tmem.config import ToolstackConfig, load_toolstack_config, parse_toolstack_config
from xend_tmem.errors import ConfigError
from xend_tmem.plugins import get_plugin_manager

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "xend-config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_missing_default_file_means_xends_defaults(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("XEND_CONFIG", raising=False)
    monkeypatch.setattr(cfgmod, "DEFAULT_PATH", str(tmp_path / "absent.yaml"))
    c = load_toolstack_config()
    assert c == ToolstackConfig()
    # SPEC §9's defaults
    assert (c.unix_xmlrpc_server, c.relocation_server, c.relocation_port) == (True, False, 8002)
    # hosts-allow: localhost only, deliberately stricter than SPEC §9's empty default
    assert (c.relocation_address, c.relocation_hosts_allow) == ("", cfgmod.DEFAULT_HOSTS_ALLOW)
    assert (c.relocation_ssl_server, c.relocation_ssl_port) == (False, 8003)
    assert c.relocation_ssl is False
    assert (c.logfile, c.loglevel) == ("/var/log/xen/xend.log", "DEBUG")
    assert c.unix_socket == "/var/run/xend/xmlrpc.sock"
    assert c.checkpoint_plugins == ("tmem",)
    assert (c.hypervisor.backend, c.hypervisor.tmem_version) == ("sim", 1)


def test_environment_then_explicit_path(tmp_path, monkeypatch) -> None:
    env_file = write(tmp_path, "xend-relocation-port: 9001\n", "env.yaml")
    arg_file = write(tmp_path, "xend-relocation-port: 9002\n", "arg.yaml")
    monkeypatch.setenv("XEND_CONFIG", str(env_file))
    assert load_toolstack_config().relocation_port == 9001
    assert load_toolstack_config(str(arg_file)).relocation_port == 9002
    assert load_toolstack_config().path == str(env_file)


def test_a_named_file_must_exist(tmp_path, monkeypatch) -> None:
    missing = tmp_path / "nope.yaml"
    monkeypatch.setenv("XEND_CONFIG", str(missing))
    with pytest.raises(ConfigError, match=f"^{missing}: configuration file not found$"):
        load_toolstack_config()


@pytest.mark.parametrize("text, expected", [
    ("yes", True), ("no", False), ("'y'", True), ("'n'", False), ("1", True), ("0", False),
    ("on", True), ("off", False), ("true", True), ("false", False), ("t", True), ("f", False),
    ("'YES'", True), ("'Off'", False),
])
def test_booleans_accept_xends_spellings(tmp_path, text: str, expected: bool) -> None:
    path = write(tmp_path, f"xend-relocation-server: {text}\nxend-relocation-ssl: {text}\n")
    c = load_toolstack_config(str(path))
    assert c.relocation_server is expected and c.relocation_ssl is expected


@pytest.mark.parametrize("text, key", [
    ("xend-relocation-server: maybe", "xend-relocation-server"),
    ("xend-relocation-server: 2", "xend-relocation-server"),
    ("xend-relocation-port: http", "xend-relocation-port"),
    ("xend-relocation-port: 70000", "xend-relocation-port"),
    ("xend-relocation-port: true", "xend-relocation-port"),
    ("xend-relocation-ssl-port: -1", "xend-relocation-ssl-port"),
    ("loglevel: LOUD", "loglevel"),
    ("logfile: [a, b]", "logfile"),
    ("logfile: ''", "logfile"),
    ("xend-relocation-hosts-allow: '^10\\.0\\.(0'", "xend-relocation-hosts-allow"),
    ("xend-relocation-hosts-allow: {a: 1}", "xend-relocation-hosts-allow"),
    ("hypervisor: {tmem-version: 2}", "hypervisor.tmem-version"),
    ("hypervisor: {backend: xen}", "hypervisor.backend"),
    ("hypervisor: {tmem-capacity-mb: lots}", "hypervisor.tmem-capacity-mb"),
    ("hypervisor: {colour: blue}", "hypervisor.colour"),
    ("hypervisor: 3", "hypervisor"),
    ("checkpoint-plugins: {tmem: 1}", "checkpoint-plugins"),
    ("checkpoint-plugins: [no-such-plugin]", "checkpoint-plugins"),
    ("checkpoint-plugins: [tmem, tmem]", "checkpoint-plugins"),
    ("tmem: 5", "tmem"),
    ("xend-relocation-sever: yes", "xend-relocation-sever"),
    ("xend-relocation-ssl-server: yes", "xend-relocation-server-ssl-key-file"),
])
def test_wrong_values_and_unknown_keys_name_the_key_and_file(tmp_path, text: str, key: str) -> None:
    path = write(tmp_path, text + "\n")
    with pytest.raises(ConfigError) as info:
        load_toolstack_config(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}: ") and key in message
    assert "\n" not in message


def test_yaml_errors_say_where(tmp_path) -> None:
    path = write(tmp_path, "logfile: /x\nloglevel: [DEBUG\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line 3"):
        load_toolstack_config(str(path))
    path = write(tmp_path, "- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping of settings"):
        load_toolstack_config(str(path))


def test_empty_file_means_defaults(tmp_path) -> None:
    c = load_toolstack_config(str(write(tmp_path, "# nothing set\n")))
    assert c.relocation_port == 8002 and c.path == str(tmp_path / "xend-config.yaml")


def test_relative_paths_follow_the_config_file(tmp_path) -> None:
    sub = tmp_path / "etc"
    sub.mkdir()
    path = write(sub, "xend-unix-socket: run/x.sock\nxend-pid-file: ../x.pid\n"
                      "xend-state-dir: /abs/state\nlogfile: log/xend.log\n")
    c = load_toolstack_config(str(path))
    assert c.unix_socket == str(sub / "run" / "x.sock")
    assert c.pid_file == str(tmp_path / "x.pid")
    assert c.state_dir == "/abs/state"
    assert c.logfile == str(sub / "log" / "xend.log")


def test_hosts_allow_string_or_list_compiled_for_whole_matches() -> None:
    c = parse_toolstack_config({"xend-relocation-hosts-allow": r"^10\.0\.0\.1$  host\.example"})
    assert c.relocation_hosts_allow == (r"^10\.0\.0\.1$", r"host\.example")
    assert [p.pattern for p in c.hosts_allow_patterns()] == list(c.relocation_hosts_allow)
    c = parse_toolstack_config({"xend-relocation-hosts-allow": ["a", "b.*"]})
    assert c.relocation_hosts_allow == ("a", "b.*")
    c = parse_toolstack_config({"xend-relocation-hosts-allow": None})
    assert c.relocation_hosts_allow == ()


def test_plugin_sections_pass_through_untouched_even_when_disabled() -> None:
    c = parse_toolstack_config({"checkpoint-plugins": [], "tmem": {"plan": "precopy", "x": 1}})
    assert c.checkpoint_plugins == ()
    assert c.plugin_settings == {"tmem": {"plan": "precopy", "x": 1}}
    c = parse_toolstack_config({"tmem": None})
    assert c.plugin_settings == {"tmem": {}}


def test_hypervisor_section() -> None:
    c = parse_toolstack_config({"hypervisor": {"backend": "sim", "tmem-version": 0,
                                               "tmem-capacity-mb": "64", "seed": 3}})
    hvc = c.hypervisor
    assert (hvc.tmem_version, hvc.tmem_capacity_mb, hvc.seed) == (0, 64, 3)


def test_the_shipped_example_loads_and_its_tmem_section_is_valid() -> None:
    c = load_toolstack_config(str(REPO / "config" / "xend-config.yaml"))
    assert c.checkpoint_plugins == ("tmem",)
    assert c.relocation_port == 8002 and c.unix_socket == "/var/run/xend/xmlrpc.sock"
    hooks = get_plugin_manager(c.checkpoint_plugins, c.plugin_settings)
    assert hooks.enabled == ["tmem"]
    for pattern in c.hosts_allow_patterns():
        assert not pattern.fullmatch("127.0.0.10")
    assert any(p.fullmatch("127.0.0.1") for p in c.hosts_allow_patterns())
