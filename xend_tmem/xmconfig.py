"""xm's own domain files, read safely: Python-syntax files and SXP, besides YAML.

Xen's ``xm create`` *executed* a domain file as Python (``name = "web1"``,
``memory = 512``, ``disk = [...]``). This reader never executes anything: the
file is parsed with :mod:`ast` and every statement must be ``setting =
literal`` (strings, numbers, lists, tuples, dicts, ``True``/``False``/``None``);
anything else (an import, a call, an expression such as ``256 * 2``, an
``if``) is refused with an error naming the file and line. SXP domain files
(``(vm (name web1) (memory 512) ...)``) are read with the SXP codec.

What the simulator does with the settings (see :class:`DomainFile`): ``name``,
``memory`` and ``vcpus`` build the domain; every other xm setting is read,
type-checked where xm checked it, and reported in a note as not simulated (the
simulated guest has no kernel image, disks, network or device model). An HVM
file (``builder = 'hvm'``) is created as a simulated PV guest with the same
name, memory and vcpus, and the note says so. tmem pools and the guest's
workload exist only in the YAML form of a domain file (``config/web1.yaml``);
such keys in an xm or SXP file are refused with a pointer to it.
"""
from __future__ import annotations

import ast
import difflib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping

from .codec import sxp
from .domconfig import parse_domain_config
from .errors import ConfigError
from .yamlfile import parse_yaml

MAX_FILE_BYTES = 1 << 20          # a domain file is a few hundred bytes; refuse huge input
BUILT = ("name", "memory", "vcpus")
YAML_ONLY = ("tmem", "workload")
YAML_POINTER = ("tmem pools and the guest workload are set in the YAML form of a domain "
                "file (see config/web1.yaml), not in xm's format")

# Xen 4.0 xm create's variables (xm/create.py), by the type xm required.
_INT_SETTINGS = {"memory", "maxmem", "vcpus", "maxvcpus", "vcpu_avail", "shadow_memory",
                 "cpu_cap", "cpu_weight", "videoram", "rtc_timeoffset", "localtime",
                 "tsc_mode", "timer_mode", "machine_address_size"}
_LIST_SETTINGS = {"disk", "vif", "vfb", "vtpm", "pci", "vscsi", "ioports", "irq", "cpuid",
                  "cpuid_check"}
_OTHER_SETTINGS = {
    "name", "uuid", "kernel", "ramdisk", "extra", "root", "builder", "bootloader", "bootargs",
    "cpus", "on_poweroff", "on_reboot", "on_crash", "on_xend_start", "on_xend_stop",
    "device_model", "boot", "vnc", "vncunused", "vncdisplay", "vnclisten", "vncpasswd",
    "vncconsole", "sdl", "stdvga", "serial", "usb", "usbdevice", "acpi", "apic", "pae", "hap",
    "viridian", "monitor", "nographic", "soundhw", "keymap", "hpet", "vpt_align",
    "guest_os_type", "xauthority", "display", "access_control", "security", "vhpt",
    "suppress_spurious_page_faults", "superpages", "s3_integrity", "opengl",
    "xen_platform_pci", "e820_host", "gfx_passthru", "ip", "netmask", "gateway", "hostname",
    "dhcp", "nfs_server", "nfs_root", "interface", "console_autoconnect", "features", "fda",
    "fdb", "loader", "nomigrate", "pci_msitranslate", "pci_power_mgmt", "blkif", "netif",
    "tpmif", "description", "extid", "pool_name", "bootentry",
}
XM_SETTINGS = frozenset(_INT_SETTINGS | _LIST_SETTINGS | _OTHER_SETTINGS)

_STATEMENT_KINDS = {
    ast.Import: "an import", ast.ImportFrom: "an import", ast.Expr: "an expression",
    ast.If: "an if", ast.For: "a for", ast.While: "a while", ast.With: "a with",
    ast.FunctionDef: "a def", ast.ClassDef: "a class", ast.AugAssign: "an augmented assignment",
    ast.Delete: "a del", ast.Try: "a try", ast.Global: "a global", ast.Assert: "an assert",
}


@dataclass
class DomainFile:
    """A domain file read for ``xm create``.

    ``config`` is the domain config mapping the hypervisor builds the domain
    from (:func:`~xend_tmem.domconfig.parse_domain_config` accepts it);
    ``settings`` every xm setting read (literal values); ``notes`` what the
    simulator does not do with them, for ``xm`` to print.
    """

    format: str                       # "xm", "sxp" or "yaml"
    config: Dict[str, Any]
    builder: str = "linux"            # "linux" (PV) or "hvm"
    settings: Dict[str, Any] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)


def load_domain_file(path: str) -> DomainFile:
    """Read and check a domain file of any of the three forms (bounded read)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return parse_domain_file(data, path)


def parse_domain_file(data: bytes, source: str) -> DomainFile:
    """Detect the form (YAML by extension or ``key: value`` lines, SXP by its
    ``(``, else xm's Python syntax) and read it; errors name ``source`` and line."""
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{source}: file too large for a domain file "
                          f"({len(data)} bytes; at most {MAX_FILE_BYTES})")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text (byte {exc.start})") from None
    if source.endswith((".yaml", ".yml")):
        return _yaml(text, source)
    if _first_significant(text).startswith("("):
        return _sxp(text, source)
    try:
        tree = ast.parse(text, filename=source, mode="exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        if _looks_like_yaml(text):
            return _yaml(text, source)
        line = getattr(exc, "lineno", None)
        detail = getattr(exc, "msg", None) or type(exc).__name__
        raise ConfigError(f"{source}:{line or 1}: Python syntax error in a domain file: "
                          f"{detail}") from None
    if tree.body and all(isinstance(s, ast.AnnAssign) and s.value is None for s in tree.body):
        return _yaml(text, source)    # ``name: web1`` lines: YAML, not Python
    return _xm(tree, source)


# -- xm's Python syntax ------------------------------------------------------------------

def _xm(tree: ast.Module, source: str) -> DomainFile:
    settings: Dict[str, Any] = {}
    lines: Dict[str, int] = {}
    notes: List[str] = []
    for stmt in tree.body:
        line = stmt.lineno
        if not isinstance(stmt, ast.Assign):
            kind = _STATEMENT_KINDS.get(type(stmt), f"a {type(stmt).__name__.lower()}")
            raise ConfigError(f"{source}:{line}: only 'setting = literal' lines are allowed, "
                              f"found {kind} statement (a domain file is read, never executed)")
        if len(stmt.targets) != 1 or not isinstance(stmt.targets[0], ast.Name):
            raise ConfigError(f"{source}:{line}: assign one setting per statement, as in "
                              f"'name = value'")
        key = stmt.targets[0].id
        if key in YAML_ONLY:
            raise ConfigError(f"{source}:{line}: '{key}': {YAML_POINTER}")
        try:
            value = ast.literal_eval(stmt.value)
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            raise ConfigError(f"{source}:{line}: {key}: the value must be a literal (a string, "
                              f"number, list ...), not an expression (a domain file is read, "
                              f"never executed)") from None
        if key not in XM_SETTINGS:
            close = difflib.get_close_matches(key, sorted(XM_SETTINGS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            notes.append(f"{source}:{line}: '{key}' is not an xm domain setting{hint}; ignored")
            continue
        settings[key] = _check_type(key, value, f"{source}:{line}")
        lines[key] = line
    return _finish("xm", settings, lines, notes, source)


def _check_type(key: str, value: Any, where: str) -> Any:
    if key in _INT_SETTINGS:
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)             # xm accepted memory = '512'
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {key}: expected a number, got {value!r:.60}")
        return value
    if key in _LIST_SETTINGS:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {key}: expected a list such as "
                              f"{key} = ['...'], got {value!r:.60}")
        return list(value)
    if key == "name" and not isinstance(value, str):
        raise ConfigError(f"{where}: name: expected a string, got {value!r:.60}")
    return value


def _finish(form: str, settings: Dict[str, Any], lines: Mapping[str, int], notes: List[str],
            source: str) -> DomainFile:
    """The domain config and the notes on what the simulator leaves out."""
    if "name" not in settings:
        raise ConfigError(f"{source}: name: required (name = \"...\")")
    config: Dict[str, Any] = {"name": settings["name"],
                              "memory": settings.get("memory", 128),
                              "vcpus": settings.get("vcpus", 1)}
    try:
        parse_domain_config(dict(config), source=source)
    except ConfigError as exc:
        raise _with_line(exc, source, lines) from None
    builder = str(settings.get("builder", "linux"))
    if builder == "hvm":
        notes.append(f"{source}: builder='hvm': the simulator has no HVM guests or device "
                     f"model; the domain runs as a simulated PV guest with the same name, "
                     f"memory and vcpus")
    maxmem = settings.get("maxmem")
    if maxmem is not None and maxmem != config["memory"]:
        notes.append(f"{source}:{lines.get('maxmem', 0)}: maxmem={maxmem} is not simulated: a "
                     f"simulated domain's maximum is its memory ({config['memory']} MiB)")
    left = [k for k in settings if k not in BUILT and k not in ("builder", "maxmem")]
    if left:
        notes.append(f"{source}: read but not simulated (the simulated guest has no kernel "
                     f"image, disks, network or device model): {', '.join(left)}")
    return DomainFile(format=form, config=config, builder=builder, settings=settings,
                      notes=notes)


def _with_line(exc: ConfigError, source: str, lines: Mapping[str, int]) -> ConfigError:
    """``SRC: memory: ...`` -> ``SRC:LINE: memory: ...`` when the line is known."""
    message = str(exc)
    prefix = f"{source}: "
    if message.startswith(prefix):
        rest = message[len(prefix):]
        key = rest.split(":", 1)[0]
        if key in lines:
            return ConfigError(f"{source}:{lines[key]}: {rest}")
    return exc


# -- SXP -----------------------------------------------------------------------------------

_SXP_BUILT = {"name", "memory", "vcpus", "maxmem"}


def _sxp(text: str, source: str) -> DomainFile:
    form = sxp.parse(text, source=source)
    if not isinstance(form, list) or not form or form[0] not in ("vm", "domain"):
        raise ConfigError(f"{source}: an SXP domain file is one (vm ...) or (domain ...) form")
    settings: Dict[str, Any] = {}
    notes: List[str] = []
    for item in form[1:]:
        if not isinstance(item, list) or not item or not isinstance(item[0], str):
            raise ConfigError(f"{source}: expected (key value) forms inside ({form[0]} ...), "
                              f"got {sxp.to_string(item)[:60]!r}")
        key = item[0]
        if key in YAML_ONLY:
            raise ConfigError(f"{source}: ({key} ...): {YAML_POINTER}")
        if key in ("memory", "maxmem", "vcpus"):
            value = item[1] if len(item) == 2 else None
            if not isinstance(value, str) or not value.isdigit():
                raise ConfigError(f"{source}: ({key} ...): expected a number, got "
                                  f"{sxp.to_string(item)[:60]!r}")
            settings[key] = int(value)
        elif key == "name":
            settings[key] = item[1] if len(item) == 2 else None
        elif key == "image":
            kinds = [c[0] for c in item[1:] if isinstance(c, list) and c]
            settings["builder"] = "hvm" if "hvm" in kinds else "linux"
            settings["image"] = sxp.to_string(item)
        elif key == "device":
            settings.setdefault("device", []).append(sxp.to_string(item))
        else:
            settings[key] = sxp.to_string(item)
    if not isinstance(settings.get("name", ""), str):
        raise ConfigError(f"{source}: (name ...): expected one name")
    return _finish("sxp", settings, {}, notes, source)


# -- YAML ------------------------------------------------------------------------------------

def _yaml(text: str, source: str) -> DomainFile:
    mapping = parse_yaml(text, source)
    if not isinstance(mapping, dict):
        raise ConfigError(f"{source}: expected a domain file (YAML mapping, xm's "
                          f"'setting = value' lines or an SXP (vm ...) form)")
    return DomainFile(format="yaml", config=dict(mapping))


def _first_significant(text: str) -> str:
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            return stripped
    return ""


def _looks_like_yaml(text: str) -> bool:
    try:
        return isinstance(parse_yaml(text, "<probe>"), dict)
    except ConfigError:
        return False


__all__ = ["DomainFile", "load_domain_file", "parse_domain_file", "MAX_FILE_BYTES",
           "XM_SETTINGS"]
