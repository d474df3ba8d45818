"""The toolstack configuration: xend's settings, in YAML, plus the checkpoint plugins.

xend read ``/etc/xen/xend-config.sxp``; this toolstack reads the same settings, under
the same key names and with the same defaults (SPEC §9), from a YAML mapping at
``$XEND_CONFIG`` or ``/etc/xen/xend-config.yaml``. A missing *default* file means
all defaults (xend behaved the same); a file named explicitly must exist.

Keys xend never had: ``xend-unix-socket``, ``xend-pid-file``, ``xend-state-dir`` (so a
test or a second daemon can run unprivileged in a temporary directory),
``hypervisor`` (the backend and its tmem), ``migration`` (the host's rate cap and
stop rule), ``checkpoint-plugins`` (entry-point names
of the enabled plugins) and one section per plugin, passed through untouched for
the plugin to validate. Anything else, and any value of the wrong type, is a
:class:`~xend_tmem.errors.ConfigError` naming the file and the key, so the daemon
can refuse to start with one clear line instead of misbehaving later.

Relative paths are taken relative to the configuration file's directory, so a
config file and the state it names can move together.
"""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Pattern, Tuple


from .errors import ConfigError
from .hypervisor.profiles import SWITCHABLE_DEFECTS
from .xen import XEN_MAX_ITERS
from .yamlfile import parse_yaml

ENV_VAR = "XEND_CONFIG"
DEFAULT_PATH = "/etc/xen/xend-config.yaml"
XEN_RELEASE_DEFAULT = "4.0.2"
_RELEASE_RE = re.compile(r"4\.([0-5])\.(\d+|x)")
LOGLEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

_TRUE = ("yes", "y", "1", "on", "true", "t")
_FALSE = ("no", "n", "0", "off", "false", "f")


@dataclass(frozen=True)
class HypervisorSettings:
    """The ``hypervisor:`` section: which backend the daemon owns and its tmem."""

    backend: str = "sim"
    xen_release: str = XEN_RELEASE_DEFAULT   # the Xen release the simulator imitates
    defects: Tuple[str, ...] = ()             # hypervisor defects switched on (H1-H3)
    tmem_capacity_mb: int = 1024
    tmem_prealloc_mb: int = 0
    seed: Optional[int] = None

    @property
    def tmem_version(self) -> int:
        """The tmem spec version of :attr:`xen_release`: 0 on 4.0.0-4.0.1, else 1."""
        return 0 if self.xen_release in ("4.0.0", "4.0.1") else 1


MIGRATION_KEYS = ("max-rate-mbit", "downtime-limit-ms", "on-limit-miss", "max-iters",
                  "max-total-s")
ON_LIMIT_MISS = ("best-effort", "strict")


@dataclass(frozen=True)
class MigrationSettings:
    """The ``migration:`` section: the host's rate cap and stop rule (issue 7).

    The stop rule is the host's, not a plugin's: iterate while the expected
    downtime exceeds ``downtime_limit_ms``, within ``max_iters`` rounds and
    ``max_total_s`` (:func:`xend_tmem.tmem.policy.should_stop`).
    """

    max_rate_mbit: float = 0.0          # sender's rate cap, megabits/s (xm migrate -r); 0 = none
    downtime_limit_ms: float = 300.0
    on_limit_miss: str = "best-effort"  # or strict: abort and leave the source running
    max_iters: int = XEN_MAX_ITERS      # Xen's own ceiling by default
    max_total_s: float = 0.0            # 0 = no cap on a migration's total time
    downtime_limit_from: str = ""       # the key that set the limit ("" = the default)

    @property
    def max_rate_bps(self) -> Optional[float]:
        """The rate cap in bytes per second, ``None`` when uncapped."""
        return self.max_rate_mbit * 1e6 / 8 if self.max_rate_mbit else None

    def limits(self) -> Any:
        """The policy's :class:`~xend_tmem.tmem.policy.Limits` for these settings."""
        from .tmem.policy import Limits
        return Limits(downtime_limit_ms=self.downtime_limit_ms,
                      on_limit_miss=self.on_limit_miss, max_iters=self.max_iters,
                      max_total_s=self.max_total_s)


# xend-relocation-hosts-allow when the key is absent: this host only (issue 8 #7)
DEFAULT_HOSTS_ALLOW: Tuple[str, ...] = (r"^localhost$", r"^127\.0\.0\.1$", r"^::1$",
                                        r"^::ffff:127\.0\.0\.1$")


@dataclass(frozen=True)
class ToolstackConfig:
    """Everything the daemon and its relocation server are configured with."""

    path: Optional[str] = None
    unix_xmlrpc_server: bool = True
    unix_socket: str = "/var/run/xend/xmlrpc.sock"
    pid_file: str = "/var/run/xend.pid"
    state_dir: str = "/var/lib/xend"
    logfile: str = "/var/log/xen/xend.log"
    loglevel: str = "DEBUG"
    relocation_server: bool = False
    relocation_port: int = 8002
    relocation_address: str = ""
    # built-in default: localhost only -- deliberately stricter than xend's empty
    # (every host) default, SPEC §9; an explicit '' still means every host
    relocation_hosts_allow: Tuple[str, ...] = DEFAULT_HOSTS_ALLOW
    relocation_ssl_server: bool = False
    relocation_ssl_port: int = 8003
    relocation_ssl_key_file: Optional[str] = None
    relocation_ssl_cert_file: Optional[str] = None
    relocation_ssl: bool = False
    relocation_ssl_ca_file: Optional[str] = None
    relocation_ssl_peer_fingerprint: Optional[str] = None
    hypervisor: HypervisorSettings = field(default_factory=HypervisorSettings)
    migration: MigrationSettings = field(default_factory=MigrationSettings)
    checkpoint_plugins: Tuple[str, ...] = ("tmem",)
    plugin_settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def hosts_allow_patterns(self) -> List[Pattern[str]]:
        """Compiled ``xend-relocation-hosts-allow`` patterns (empty list = allow all)."""
        return [re.compile(p) for p in self.relocation_hosts_allow]

    def relocation_tls(self) -> Any:
        """The TLS settings of both relocation directions: this host's key pair
        (the server's, presented as a client too) and how peers are verified."""
        from .xend.relocation.protocol import TlsSettings
        return TlsSettings(cert_file=self.relocation_ssl_cert_file,
                           key_file=self.relocation_ssl_key_file,
                           ca_file=self.relocation_ssl_ca_file,
                           peer_fingerprint=self.relocation_ssl_peer_fingerprint)


# -- value checkers: each returns the converted value or raises ValueError(problem) --

def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        low = value.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
    raise ValueError("expected a boolean (yes/no, y/n, 1/0, on/off, true/false, t/f), "
                     f"got {value!r}")


def _int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    raise ValueError(f"expected an integer, got {value!r}")


def _port(value: Any) -> int:
    try:
        port = _int(value)
    except ValueError:
        raise ValueError(f"expected a TCP port number 0-65535, got {value!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"expected a TCP port number 0-65535, got {port}")
    return port


def _str(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    raise ValueError(f"expected a string, got {value!r}")


def _loglevel(value: Any) -> str:
    level = _str(value).strip().upper()
    if level == "WARN":
        level = "WARNING"
    if level not in LOGLEVELS:
        raise ValueError(f"expected one of {', '.join(LOGLEVELS)}, got {value!r}")
    return level


def _fingerprint(value: Any) -> Optional[str]:
    """A sha256 certificate fingerprint: 64 hex digits, colons allowed (as
    ``openssl x509 -fingerprint -sha256`` prints it); kept lower-case, bare."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"expected a sha256 fingerprint (64 hex digits), got {value!r}")
    bare = value.strip().replace(":", "").lower()
    if len(bare) != 64 or any(c not in "0123456789abcdef" for c in bare):
        raise ValueError("expected a sha256 fingerprint (64 hex digits, colons allowed, "
                         "as openssl x509 -noout -fingerprint -sha256 prints it)")
    return bare


def _hosts_allow(value: Any) -> Tuple[str, ...]:
    """xend's space-separated regular expressions; a YAML list is accepted too."""
    if value is None:
        return ()
    if isinstance(value, str):
        patterns = value.split()
    elif isinstance(value, list) and all(isinstance(p, str) for p in value):
        patterns = [p for p in value if p]
    else:
        raise ValueError(f"expected space-separated regular expressions, got {value!r}")
    for p in patterns:
        try:
            re.compile(p)
        except re.error as exc:
            raise ValueError(f"bad regular expression {p!r}: {exc}") from None
    return tuple(patterns)


def _plugin_list(value: Any) -> Tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = value.split()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"expected a list of plugin names, got {value!r}")
    return tuple(value)


# key -> (attribute, checker, is_path)
_KEYS: Dict[str, Tuple[str, Callable[[Any], Any], bool]] = {
    "xend-unix-xmlrpc-server": ("unix_xmlrpc_server", _bool, False),
    "xend-unix-socket": ("unix_socket", _str, True),
    "xend-pid-file": ("pid_file", _str, True),
    "xend-state-dir": ("state_dir", _str, True),
    "logfile": ("logfile", _str, True),
    "loglevel": ("loglevel", _loglevel, False),
    "xend-relocation-server": ("relocation_server", _bool, False),
    "xend-relocation-port": ("relocation_port", _port, False),
    "xend-relocation-address": ("relocation_address", _str, False),
    "xend-relocation-hosts-allow": ("relocation_hosts_allow", _hosts_allow, False),
    "xend-relocation-ssl-server": ("relocation_ssl_server", _bool, False),
    "xend-relocation-ssl-port": ("relocation_ssl_port", _port, False),
    "xend-relocation-server-ssl-key-file": ("relocation_ssl_key_file", _str, True),
    "xend-relocation-server-ssl-cert-file": ("relocation_ssl_cert_file", _str, True),
    "xend-relocation-ssl": ("relocation_ssl", _bool, False),
    "xend-relocation-ssl-ca-file": ("relocation_ssl_ca_file", _str, True),
    "xend-relocation-ssl-peer-fingerprint": ("relocation_ssl_peer_fingerprint", _fingerprint,
                                             False),
    "checkpoint-plugins": ("checkpoint_plugins", _plugin_list, False),
}
_REQUIRED_PATHS = ("xend-unix-socket", "xend-pid-file", "xend-state-dir", "logfile")


def _section(value: Any, where: str, section: str) -> Dict[str, Any]:
    """A section of the file: a mapping (absent: empty), or refused naming it."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {section}: expected a mapping, got {value!r}")
    return value


def _hypervisor(value: Any, where: str) -> HypervisorSettings:
    value = _section(value, where, "hypervisor")
    out: Dict[str, Any] = {}
    for key, raw in value.items():
        name = f"hypervisor.{key}"
        if key == "backend":
            backends = _installed_backend_names()
            if not isinstance(raw, str) or raw not in backends:
                close = difflib.get_close_matches(str(raw), backends, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"{where}: {name}: unknown backend {raw!r}{hint} "
                                  f"(installed: {', '.join(backends)})")
            out["backend"] = raw
        elif key == "xen-release":
            out["xen_release"] = _xen_release(raw, where, name)
        elif key == "tmem-version":
            # deprecated alias of xen-release: 0 = 4.0.0, 1 = 4.0.2
            try:
                version = _int(raw)
            except ValueError:
                version = -1
            if version not in (0, 1):
                raise ConfigError(f"{where}: {name}: expected tmem spec version 0 or 1, "
                                  f"got {raw!r} (deprecated: use xen-release)")
            if "xen-release" not in value:
                out["xen_release"] = "4.0.0" if version == 0 else "4.0.2"
        elif key == "defects":
            items = raw.split() if isinstance(raw, str) else raw
            if items is None:
                items = []
            if not isinstance(items, list) or not all(isinstance(d, str) for d in items):
                raise ConfigError(f"{where}: {name}: expected a list of defect names "
                                  f"({', '.join(SWITCHABLE_DEFECTS)}), got {raw!r}")
            for d in items:
                if d.upper() not in SWITCHABLE_DEFECTS:
                    raise ConfigError(f"{where}: {name}: unknown defect {d!r} "
                                      f"(switchable: {', '.join(SWITCHABLE_DEFECTS)})")
            out["defects"] = tuple(sorted({d.upper() for d in items}))
        elif key in ("tmem-capacity-mb", "tmem-prealloc-mb"):
            try:
                mb = _int(raw)
            except ValueError as exc:
                raise ConfigError(f"{where}: {name}: {exc}") from None
            if mb < 0:
                raise ConfigError(f"{where}: {name}: expected a size in MiB >= 0, got {mb}")
            out[key.replace("-", "_")] = mb
        elif key == "seed":
            if raw is not None:
                try:
                    raw = _int(raw)
                except ValueError as exc:
                    raise ConfigError(f"{where}: {name}: {exc}") from None
            out["seed"] = raw
        else:
            known = ("backend", "xen-release", "defects", "tmem-capacity-mb",
                     "tmem-prealloc-mb", "seed", "tmem-version")
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: {name}: unknown key{hint} "
                              f"(known: {', '.join(known[:-1])})")
    return HypervisorSettings(**out)


def _migration_number(raw: Any, where: str, name: str, lo: float, hi: float,
                      integer: bool = False) -> float:
    what = "an integer" if integer else "a number"
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) \
            or (integer and not isinstance(raw, int)) or raw != raw:
        raise ConfigError(f"{where}: {name}: expected {what} {lo:g}..{hi:g}, got {raw!r}")
    if not lo <= raw <= hi:
        raise ConfigError(f"{where}: {name}: expected {what} {lo:g}..{hi:g}, got {raw!r}")
    return raw


def _migration(value: Any, tmem: Any, where: str) -> MigrationSettings:
    """The ``migration:`` section; ``tmem.downtime-limit-ms`` is the old name of
    ``migration.downtime-limit-ms`` and still sets it (both given: they must agree)."""
    value = _section(value, where, "migration")
    out: Dict[str, Any] = {}
    for key, raw in value.items():
        name = f"migration.{key}"
        if key == "max-rate-mbit":
            out["max_rate_mbit"] = float(_migration_number(raw, where, name, 0, 1e6))
        elif key == "downtime-limit-ms":
            out["downtime_limit_ms"] = float(_migration_number(raw, where, name, 1, 3.6e6))
            out["downtime_limit_from"] = name
        elif key == "on-limit-miss":
            if raw not in ON_LIMIT_MISS:
                raise ConfigError(f"{where}: {name}: expected one of "
                                  f"{' | '.join(ON_LIMIT_MISS)}, got {raw!r}")
            out["on_limit_miss"] = raw
        elif key == "max-iters":
            out["max_iters"] = int(_migration_number(raw, where, name, 1, 1000, integer=True))
        elif key == "max-total-s":
            out["max_total_s"] = float(_migration_number(raw, where, name, 0, 86400))
        else:
            close = difflib.get_close_matches(str(key), MIGRATION_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: {name}: unknown key{hint} "
                              f"(known: {', '.join(MIGRATION_KEYS)})")
    if isinstance(tmem, dict) and "downtime-limit-ms" in tmem:
        alias = "tmem.downtime-limit-ms"
        old = float(_migration_number(tmem["downtime-limit-ms"], where, alias, 1, 3.6e6))
        if "downtime_limit_ms" not in out:
            out["downtime_limit_ms"], out["downtime_limit_from"] = old, alias
        elif out["downtime_limit_ms"] != old:
            raise ConfigError(f"{where}: {alias}: is the old name of migration.downtime-limit-ms "
                              f"and says {old:g} where migration says "
                              f"{out['downtime_limit_ms']:g}: keep one")
    return MigrationSettings(**out)


def _xen_release(raw: Any, where: str, name: str) -> str:
    """'4.0.2' style, 4.0.0 to 4.5.x; a bare '4.1' means '4.1.0'."""
    scalar = isinstance(raw, (str, float, int)) and not isinstance(raw, bool)
    text = str(raw).strip() if scalar else ""
    if re.fullmatch(r"4\.[0-5]", text):
        text += ".0"
    m = _RELEASE_RE.fullmatch(text)
    if not m:
        raise ConfigError(f"{where}: {name}: expected a Xen release 4.0.0 to 4.5.x "
                          f"(such as '4.0.2'), got {raw!r}")
    return text


def _installed_backend_names() -> List[str]:
    from .hypervisor.backends import installed_backends
    return sorted(installed_backends())


def _installed_plugin_names() -> List[str]:
    from .plugins import installed_plugins
    return sorted(installed_plugins())


def parse_toolstack_config(data: Any, path: Optional[str] = None) -> ToolstackConfig:
    """Validate an already-loaded YAML document read from ``path`` (named in errors;
    relative paths in it are resolved against its directory)."""
    where = path or "<config>"
    base_dir = os.path.dirname(os.path.abspath(path)) if path else None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of settings at the top level, "
                          f"got {type(data).__name__}")
    values: Dict[str, Any] = {}
    plugin_sections: Dict[str, Any] = {}
    unknown: List[str] = []
    for key, raw in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}: {key!r}: setting names must be strings")
        if key in _KEYS:
            attr, check, is_path = _KEYS[key]
            try:
                value = check(raw)
            except ValueError as exc:
                raise ConfigError(f"{where}: {key}: {exc}") from None
            if is_path:
                if not value and key in _REQUIRED_PATHS:
                    raise ConfigError(f"{where}: {key}: expected a path, got an empty value")
                if value and base_dir is not None:
                    value = os.path.normpath(os.path.join(base_dir, os.path.expanduser(value)))
                if not value:
                    value = None    # an optional path left empty: not set
            values[attr] = value
        elif key == "hypervisor":
            values["hypervisor"] = _hypervisor(raw, where)
        elif key == "migration":
            pass                    # below, once the tmem section (its alias) is known
        else:
            plugin_sections[key] = raw
    values["migration"] = _migration(data.get("migration"), data.get("tmem"), where)
    enabled = values.get("checkpoint_plugins", ToolstackConfig.checkpoint_plugins)
    installed = _installed_plugin_names()
    for name in enabled:
        if name not in installed:
            raise ConfigError(f"{where}: checkpoint-plugins: plugin {name!r} is not installed "
                              f"(installed: {', '.join(installed) or 'none'})")
        if enabled.count(name) > 1:
            raise ConfigError(f"{where}: checkpoint-plugins: plugin {name!r} is listed twice")
    if plugin_sections:
        known = set(enabled) | set(installed)
        for key, raw in plugin_sections.items():
            if key not in known:
                unknown.append(key)
                continue
            if raw is None:
                raw = {}
            if not isinstance(raw, dict):
                raise ConfigError(f"{where}: {key}: the plugin's section must be a mapping, "
                                  f"got {raw!r}")
        if unknown:
            close = difflib.get_close_matches(unknown[0], [*_KEYS, "hypervisor", "migration",
                                                           *known], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            more = f"; {len(unknown) - 1} more unknown" if len(unknown) > 1 else ""
            raise ConfigError(f"{where}: unknown setting {unknown[0]!r}{hint}{more}")
    values["plugin_settings"] = {k: dict(v or {}) for k, v in plugin_sections.items()}
    if values.get("relocation_ssl_server"):
        for key in ("xend-relocation-server-ssl-key-file", "xend-relocation-server-ssl-cert-file"):
            if not values.get(_KEYS[key][0]):
                raise ConfigError(f"{where}: {key}: required when xend-relocation-ssl-server is on")
        if values.get("relocation_ssl_peer_fingerprint") and \
                not values.get("relocation_ssl_ca_file"):
            raise ConfigError(f"{where}: xend-relocation-ssl-peer-fingerprint: a TLS relocation "
                              "server verifies clients only against "
                              "xend-relocation-ssl-ca-file (the peer's certificate or its CA): "
                              "set it too")
    return ToolstackConfig(path=path, **values)


def config_path(path: Optional[str] = None) -> Tuple[str, bool]:
    """The file to read and whether it must exist (explicit or from the environment)."""
    if path:
        return path, True
    env = os.environ.get(ENV_VAR)
    if env:
        return env, True
    return DEFAULT_PATH, False


def load_toolstack_config(path: Optional[str] = None) -> ToolstackConfig:
    """Read and validate the toolstack configuration.

    :param path: an explicit file; ``None`` means ``$XEND_CONFIG``, else the default
        path, whose absence means "all defaults".
    Raises :class:`ConfigError` naming the file and key for anything wrong.
    """
    path, required = config_path(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        if not required:
            return ToolstackConfig()
        raise ConfigError(f"{path}: configuration file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text file ({exc.reason} at byte {exc.start})") from None
    return parse_toolstack_config(parse_yaml(text, path), os.path.abspath(path))


__all__ = ["ToolstackConfig", "HypervisorSettings", "MigrationSettings", "load_toolstack_config",
           "parse_toolstack_config", "config_path", "ENV_VAR", "DEFAULT_PATH"]
