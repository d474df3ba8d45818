"""``xm``: the administrator's command, talking to xend over XML-RPC (SPEC §9).

Commands, options, messages and exit codes are xm's: every error starts
``Error: ``; usage errors and refusals exit 1; an unknown domain exits 3; a
daemon that is not there gives ``Unable to connect to xend: ... Is xend
running?``. Domain names are accepted wherever xm took ids (the tmem commands
too, which took ids only). Paths are made absolute here, as xm did, because the
daemon has its own working directory.

``save``, ``restore`` and ``migrate`` run as daemon jobs that ``xm`` polls: on a
terminal (stderr) it draws a bar per phase with bytes, rate and ETA; off a
terminal it prints only the final report (``--json`` for the same as JSON)
unless ``--progress`` asks for progress lines fit for a log; ``--quiet`` never
shows progress. The report is the one the daemon rendered with its plugins.
Ctrl-C cancels the job; the daemon then resumes the source domain.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import stat
import sys
import time
import xmlrpc.client
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence, TextIO

from .. import __version__
from ..errors import ConfigError
from ..tmem.settings import PLANS
from . import rpc

POLL_S = 0.1
# without a progress display only the end matters: one long poll a second (the
# daemon answers when the job ends) instead of ten requests, each a thread in xend
QUIET_POLL_S = 1.0
CANCEL_WAIT_S = 60.0
EXIT_OK, EXIT_ERROR, EXIT_NO_DOMAIN = 0, 1, 3


class XmError(Exception):
    """An error ``xm`` reports itself (``Error: <message>``, exit ``code``)."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


class XmUsageError(XmError):
    """A command used wrongly: ``xm`` prints that command's usage, then the error."""


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, but usage errors read ``Error: ...`` and exit 1 as xm's did."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"Error: {message}", file=sys.stderr)
        sys.exit(EXIT_ERROR)


# -- talking to the daemon ---------------------------------------------------------

def server_socket() -> str:
    """The daemon's socket: ``$XM_SERVER``, else the ``xend-unix-socket`` of the
    configuration ``$XEND_CONFIG`` names (so a second daemon on this host is
    reached with its config alone), else xend's default."""
    if os.environ.get(rpc.ENV_SERVER):
        return rpc.server_path(None)
    # imported here: xm starts for every command, and a save or restore is timed
    # around the whole command (the config, SXP and progress modules are ~0.07 s)
    from ..config import ENV_VAR as ENV_CONFIG, load_toolstack_config
    if os.environ.get(ENV_CONFIG):
        try:
            return load_toolstack_config(None).unix_socket
        except ConfigError as exc:
            raise XmError(f"{exc} (from ${ENV_CONFIG}; set XM_SERVER to give the socket "
                          "directly)") from None
    return rpc.server_path(None)


def server() -> xmlrpc.client.ServerProxy:
    return rpc.connect(server_socket(), timeout=None)


# The daemon's replies are XML-RPC values of any type; each is checked against the
# shape its call returns before use, so a mismatched xend is an error, not a traceback.

def _unexpected(call: str, reply: object, wanted: str) -> XmError:
    return XmError(f"xend answered {call} with {type(reply).__name__}, not {wanted} "
                   "(an older or newer xend?)")


def _struct(reply: object, call: str) -> Dict[str, Any]:
    if not isinstance(reply, dict):
        raise _unexpected(call, reply, "a struct")
    return reply


def _structs(reply: object, call: str) -> List[Dict[str, Any]]:
    if not isinstance(reply, list) or not all(isinstance(d, dict) for d in reply):
        raise _unexpected(call, reply, "an array of structs")
    return reply


def _int(reply: object, call: str) -> int:
    if not isinstance(reply, int) or isinstance(reply, bool):
        raise _unexpected(call, reply, "an int")
    return reply


def _text(reply: object, call: str) -> str:
    if not isinstance(reply, str):
        raise _unexpected(call, reply, "a string")
    return reply


def _job(proxy: xmlrpc.client.ServerProxy, start: Callable[[], object], label: str,
         show_progress: bool, stream: TextIO, total_hint: Optional[int] = None
         ) -> Dict[str, Any]:
    """Start a job, poll it to the end (drawing progress), return its result.
    ``start`` makes the call that starts it (its reply is the job id).
    ``total_hint``: the bytes to expect when the daemon does not say (a restore
    reads the whole image file), for a percentage and an ETA."""
    from .progress import ProgressDisplay, summary_line
    job_id = _int(start(), f"xend.job.{label}")
    display = ProgressDisplay(stream, label) if show_progress else None
    status: Dict[str, Any] = {}
    cancelled = False
    deadline: Optional[float] = None
    while True:
        try:
            asked = time.monotonic()
            # the daemon answers as soon as the job ends (or after the wait)
            wait = POLL_S if display is not None else max(POLL_S, QUIET_POLL_S)
            status = _struct(proxy.xend.job.status(job_id, wait) if POLL_S > 0
                             else proxy.xend.job.status(job_id), "xend.job.status")
            if display is not None:
                total = status.get("total")
                display.update(status["phase"], status["done"],
                               total_hint if total is None else total, status.get("phase_start"))
            if status["state"] != "running":
                break
            if deadline is not None and time.monotonic() > deadline:
                raise XmError(f"job {job_id} did not stop within {CANCEL_WAIT_S:.0f} s of "
                              "being cancelled; see the xend log")
            time.sleep(max(0.0, POLL_S - (time.monotonic() - asked)))
        except KeyboardInterrupt:
            if cancelled:
                raise
            cancelled = True
            deadline = time.monotonic() + CANCEL_WAIT_S
            if display is not None:
                display.finish(None)
            print("Cancelling (press Ctrl-C again to stop waiting)...", file=sys.stderr)
            proxy = server()          # the interrupted call may have left the old one mid-request
            proxy.xend.job.cancel(job_id)
    if status["state"] == "done":
        result = _struct(status["result"], "xend.job.status")
        if display is not None:
            display.finish(summary_line(result))
        return result
    if display is not None:
        display.finish(None)
    raise xmlrpc.client.Fault(status.get("fault_code") or 2, status.get("error") or "failed")


def _file_size(path: str) -> Optional[int]:
    """A regular file's size (a restore's expected bytes); None for anything else."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def _show_progress(args: argparse.Namespace) -> bool:
    """On a terminal a bar per phase; off one only with ``--progress`` (lines for a log)."""
    return not args.quiet and (args.progress or sys.stderr.isatty())


def _print_result(args: argparse.Namespace, result: Dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        from .progress import shown_lines
        for line in shown_lines(result):
            print(line)


# -- commands -------------------------------------------------------------------

def cmd_create(args: argparse.Namespace) -> int:
    """A YAML domain file goes to xend by path (xend reads it); xm's own
    Python-syntax and SXP files are read here, never executed, as xm did
    (:mod:`xend_tmem.xmconfig`), and xend gets the config they make."""
    path = os.path.abspath(args.config)
    if not os.access(path, os.R_OK):
        raise XmError(f"xm create: Unable to read file {path}")
    print(f'Using config file "{args.config}".')
    try:
        from ..xmconfig import load_domain_file
        domain_file = load_domain_file(path)
    except ConfigError as exc:
        raise XmError(str(exc)) from None
    for note in domain_file.notes:
        print(f"Note: {note}")
    if domain_file.format == "yaml":
        out = _struct(server().xend.domain.create(path), "xend.domain.create")
    else:
        out = _struct(server().xend.domain.create_config(domain_file.config, path),
                      "xend.domain.create_config")
    print(f"Started domain {out['name']} (id={out['domid']})")
    return EXIT_OK


LIST_HEADER = "%-40s %5s %5s %5s %10s %9s" % ("Name", "ID", "Mem", "VCPUs", "State", "Time(s)")


def format_list_row(d: Dict[str, Any]) -> str:
    return "%-40s %5s %5d %5d %10s %8.1f" % (d["name"], d["domid"], d["memory"], d["vcpus"],
                                             d["state"], d["cpu_time"])


def cmd_list(args: argparse.Namespace) -> int:
    proxy = server()
    if args.domains:
        doms = [_struct(proxy.xend.domain(d), "xend.domain") for d in args.domains]
        if args.state:
            doms = [d for d in doms if _has_state(d, args.state)]
    else:
        doms = _structs(proxy.xend.domains_with_state(bool(args.long), args.state or "all",
                                                      False), "xend.domains_with_state")
    if args.long:
        for d in doms:
            print(d["sxp"])
        return EXIT_OK
    print(LIST_HEADER)
    for d in sorted(doms, key=lambda d: d["name"]):
        print(format_list_row(d))
    return EXIT_OK


def _has_state(d: Dict[str, Any], state: str) -> bool:
    if state == "all":
        return True
    names = ("running", "blocked", "paused", "shutdown", "crashed", "dying")
    flags: Dict[str, str] = dict(zip(names, d["state"]))
    if state not in flags:
        raise XmError(f"Invalid state {state!r}")
    return flags[state] != "-"


def cmd_destroy(args: argparse.Namespace) -> int:
    server().xend.domain.destroy(args.dom)
    return EXIT_OK


def cmd_pause(args: argparse.Namespace) -> int:
    server().xend.domain.pause(args.dom)
    return EXIT_OK


def cmd_unpause(args: argparse.Namespace) -> int:
    server().xend.domain.unpause(args.dom)
    return EXIT_OK


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def cmd_save(args: argparse.Namespace) -> int:
    """The daemon writes the image; xm sends its umask so a new image gets the
    mode the caller's own files get (``0666 & ~umask``)."""
    path = os.path.abspath(args.file)
    real = os.path.realpath(path)
    through = os.path.exists(real) and not os.path.isdir(real) and not os.path.isfile(real)
    writable = os.access(real, os.W_OK) if through else \
        os.access(os.path.dirname(real), os.W_OK)
    if not writable or os.path.isdir(real):
        raise XmError(f"xm save: Unable to create file {path}")
    proxy = server()
    umask = _current_umask()
    try:
        result = _job(proxy, lambda: proxy.xend.job.save(args.dom, path, bool(args.checkpoint),
                                                         umask),
                      "save", _show_progress(args), sys.stderr)
    except xmlrpc.client.Fault as fault:
        if fault.faultString.startswith(path + ":"):     # an OS error at the target
            raise XmError(f"xm save: {fault.faultString}") from None
        raise
    _print_result(args, result)
    return EXIT_OK


def cmd_restore(args: argparse.Namespace) -> int:
    path = os.path.abspath(args.file)
    if not os.access(path, os.R_OK) or os.path.isdir(path):
        raise XmError(f"xm restore: Unable to read file {path}")
    proxy = server()
    # --width: the saving tools' unsigned long, for an image whose width the
    # stream does not reveal (the daemon infers it otherwise)
    call_args = (path, bool(args.paused)) + ((args.width,) if args.width else ())
    result = _job(proxy, lambda: proxy.xend.job.restore(*call_args),
                  "restore", _show_progress(args), sys.stderr, _file_size(path))
    _print_result(args, result)
    return EXIT_OK


def migrate_options(args: argparse.Namespace) -> Dict[str, Any]:
    """This migration's overrides of the daemon's ``migration:`` section (only
    those given, so the daemon's configuration supplies the rest)."""
    out: Dict[str, Any] = {}
    if args.resource is not None:
        if not 0 < args.resource <= 1e6:
            raise XmUsageError(f"-r/--resource: a rate in Mbit/s, 1..1000000, got "
                               f"{args.resource:g}")
        out["resource_mbit"] = float(args.resource)
    if args.downtime_limit_ms is not None:
        if not 1 <= args.downtime_limit_ms <= 3.6e6:
            raise XmUsageError(f"--downtime-limit-ms: 1..3600000, got {args.downtime_limit_ms:g}")
        out["downtime_limit_ms"] = float(args.downtime_limit_ms)
    if args.max_iters is not None:
        if not 1 <= args.max_iters <= 1000:
            raise XmUsageError(f"--max-iters: 1..1000, got {args.max_iters}")
        out["max_iters"] = int(args.max_iters)
    if args.plan is not None:
        out["plan"] = args.plan
    return out


def cmd_migrate(args: argparse.Namespace) -> int:
    options = migrate_options(args)
    proxy = server()
    ssl = True if args.ssl else None      # None: the daemon's xend-relocation-ssl
    extra = (options,) if options else ()    # a daemon without the knobs still takes the rest
    result = _job(proxy, lambda: proxy.xend.job.migrate(args.dom, args.host, bool(args.live),
                                                        args.port, args.node, ssl,
                                                        bool(args.change_home_server), *extra),
                  "migrate", _show_progress(args), sys.stderr)
    _print_result(args, result)
    return EXIT_OK


def cmd_migrate_cancel(args: argparse.Namespace) -> int:
    """Cancel a migration started elsewhere, as Ctrl-C on its ``xm migrate``
    would, and wait (up to :data:`CANCEL_WAIT_S`) until it has ended."""
    proxy = server()
    job_id = _int(proxy.xend.job.migrate_cancel(args.dom), "xend.job.migrate_cancel")
    deadline = time.monotonic() + CANCEL_WAIT_S
    while True:
        status = _struct(proxy.xend.job.status(job_id, POLL_S), "xend.job.status")
        if status["state"] != "running":
            break
        if time.monotonic() > deadline:
            raise XmError(f"the migration of {args.dom} did not stop within "
                          f"{CANCEL_WAIT_S:.0f} s of being cancelled; see the xend log")
    if status["state"] == "done":
        print(f"The migration of {args.dom} had already completed: it runs on the "
              "destination", file=sys.stderr)
        return EXIT_ERROR
    print(f"Migration of {args.dom} cancelled: {status.get('error') or status['state']}")
    return EXIT_OK


def _tmem_target(args: argparse.Namespace) -> Any:
    if args.all and args.dom is not None:
        raise XmError("give either a domain or -a, not both")
    if not args.all and args.dom is None:
        raise XmError(f"xm {args.command}: give a domain or -a for all domains")
    return -1 if args.all else args.dom


def cmd_tmem_list(args: argparse.Namespace) -> int:
    text = _text(server().xend.node.tmem_list(_tmem_target(args), bool(args.long)),
                 "xend.node.tmem_list")
    if text:
        print(text.rstrip("\n"))
    return EXIT_OK


def _tmem_simple(method: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        getattr(server().xend.node, method)(_tmem_target(args))
        return EXIT_OK
    return run


def cmd_tmem_flush(args: argparse.Namespace) -> int:
    server().xend.node.tmem_flush(_tmem_target(args), args.pages)
    return EXIT_OK


TMEM_SET_KEYS = ("weight", "cap", "compress")


def parse_tmem_settings(items: Sequence[str]) -> Dict[str, int]:
    """``weight=N cap=N compress=N`` -> dict; anything else is a usage error."""
    out: Dict[str, int] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in TMEM_SET_KEYS:
            raise XmError(f"xm tmem-set: expected weight=N, cap=N or compress=N, got {item!r}")
        if not value.isdigit():
            raise XmError(f"xm tmem-set: {key} must be a non-negative integer, got {value!r}")
        out[key] = int(value)
    if not out:
        raise XmError("xm tmem-set: nothing to set (give weight=N, cap=N and/or compress=N)")
    return out


def cmd_tmem_set(args: argparse.Namespace) -> int:
    settings = parse_tmem_settings(args.settings)
    target = _tmem_target(args)
    node = server().xend.node
    for key in TMEM_SET_KEYS:
        if key in settings:
            getattr(node, f"tmem_set_{key}")(target, settings[key])
    return EXIT_OK


def cmd_tmem_freeable(args: argparse.Namespace) -> int:
    print(_int(server().xend.node.tmem_query_freeable_mb(), "xend.node.tmem_query_freeable_mb"))
    return EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    pairs = server().xend.node.info()
    if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
        raise _unexpected("xend.node.info", pairs, "an array of (key, value) pairs")
    for key, value in pairs:
        print(f"{key:<23}: {value}")
    return EXIT_OK


# -- the parser -------------------------------------------------------------------

def _report_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress display (the final report is still printed)")
    p.add_argument("--progress", action="store_true",
                   help="show progress also when stderr is not a terminal: a line per "
                        "phase and every few seconds, for logs")
    p.add_argument("--json", action="store_true", help="print the final report as JSON")


def _one_domain(sub: Any, name: str, func: Callable[..., int], text: str,
                metavar: Optional[str] = None, arg_help: Optional[str] = None) -> None:
    """A command whose one argument is a domain."""
    p = sub.add_parser(name, help=text)
    p.add_argument("dom", metavar=metavar, help=arg_help)
    p.set_defaults(func=func)


def _tmem_dom(p: argparse.ArgumentParser) -> None:
    p.add_argument("-a", "--all", action="store_true", help="all domains")
    p.add_argument("dom", nargs="?", help="domain name or id")


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="xm", description="Manage xend-tmem domains "
                             "(XM_SERVER selects the daemon's socket). "
                             "'xm help COMMAND' shows one command's usage.")
    parser.add_argument("--version", action="version", version=f"xm (xend-tmem) {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_ArgumentParser)

    p = sub.add_parser("create", help="create a domain from a domain file (YAML, or xm's "
                                      "Python-syntax or SXP file, read without being run)")
    p.add_argument("config")
    p.set_defaults(func=cmd_create)

    p = sub.add_parser("list", help="list domains")
    p.add_argument("-l", "--long", action="store_true", help="each domain's SXP")
    p.add_argument("--state", help="only domains in this state (running, blocked, paused, ...)")
    p.add_argument("domains", nargs="*", metavar="DOM")
    p.set_defaults(func=cmd_list)

    for name, fn, text in (("destroy", cmd_destroy, "terminate a domain immediately"),
                           ("pause", cmd_pause, "pause a domain"),
                           ("unpause", cmd_unpause, "unpause a paused domain")):
        _one_domain(sub, name, fn, text)

    p = sub.add_parser("save", help="save a domain's state to a file")
    p.add_argument("-c", "--checkpoint", action="store_true",
                   help="leave the domain running after the snapshot")
    p.add_argument("dom")
    p.add_argument("file")
    _report_options(p)
    p.set_defaults(func=cmd_save)

    p = sub.add_parser("restore", help="restore a domain from a saved file")
    p.add_argument("-p", "--paused", action="store_true", help="leave it paused")
    p.add_argument("--width", type=int, choices=(4, 8), default=None,
                   help="bytes of the saving toolstack's unsigned long (4: 32-bit tools); "
                        "inferred from the image when omitted")
    p.add_argument("file")
    _report_options(p)
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("migrate", help="migrate a domain to another host")
    p.add_argument("-l", "--live", action="store_true", help="live migration")
    p.add_argument("-p", "--port", type=int, default=0,
                   help="relocation port (0: the configured one)")
    p.add_argument("-n", "--node", type=int, default=-1, help="NUMA node on the destination")
    p.add_argument("-s", "--ssl", action="store_true", help="use TLS")
    p.add_argument("-c", "--change_home_server", action="store_true",
                   help="accepted for compatibility (domains here are never managed)")
    p.add_argument("-r", "--resource", type=float, default=None, metavar="MBIT",
                   help="cap the transfer rate at MBIT megabits per second (default: the "
                        "configuration's migration.max-rate-mbit)")
    p.add_argument("--downtime-limit-ms", type=float, default=None, metavar="MS",
                   help="iterate until the expected downtime is under MS (default: "
                        "migration.downtime-limit-ms)")
    p.add_argument("--max-iters", type=int, default=None, metavar="N",
                   help="at most N live rounds (default: migration.max-iters)")
    p.add_argument("--plan", choices=PLANS, default=None,
                   help="the tmem plugin's plan for this migration (default: tmem.plan)")
    p.add_argument("dom")
    p.add_argument("host")
    _report_options(p)
    p.set_defaults(func=cmd_migrate)

    _one_domain(sub, "migrate-cancel", cmd_migrate_cancel, "cancel a migration in progress "
                "(from any shell; the domain keeps running here)", "DOM",
                "the migrating domain's name or id")

    p = sub.add_parser("tmem-list", help="list tmem pools")
    p.add_argument("-l", "--long", action="store_true")
    _tmem_dom(p)
    p.set_defaults(func=cmd_tmem_list)

    for name, method in (("tmem-freeze", "tmem_freeze"), ("tmem-thaw", "tmem_thaw"),
                         ("tmem-destroy", "tmem_destroy")):
        p = sub.add_parser(name, help=f"{name[5:]} the tmem of a domain (or all)")
        _tmem_dom(p)
        p.set_defaults(func=_tmem_simple(method))

    p = sub.add_parser("tmem-flush", help="flush tmem pages of a domain (or all)")
    p.add_argument("-p", "--pages", type=int, default=-1, help="pages to flush (-1: all)")
    _tmem_dom(p)
    p.set_defaults(func=cmd_tmem_flush)

    p = sub.add_parser("tmem-set", help="change tmem weight, cap or compress")
    p.add_argument("-a", "--all", action="store_true", help="all domains")
    p.add_argument("dom", nargs="?", help="domain name or id")
    p.add_argument("settings", nargs="*", metavar="weight=N|cap=N|compress=N")
    p.set_defaults(func=cmd_tmem_set)

    p = sub.add_parser("tmem-freeable", help="MiB of tmem that could be freed")
    p.set_defaults(func=cmd_tmem_freeable)

    p = sub.add_parser("info", help="host and daemon information")
    p.set_defaults(func=cmd_info)
    _add_everyday_commands(sub)
    return parser


# -- the everyday commands (issue 8 #9) ------------------------------------------------

def _all_guests(proxy: xmlrpc.client.ServerProxy) -> List[Dict[str, Any]]:
    return [d for d in _structs(proxy.xend.domains_with_state(False, "all", False),
                                "xend.domains_with_state") if d["domid"] != 0]


def _shutdown(reason: str) -> Callable[[argparse.Namespace], int]:
    """``xm shutdown``/``xm reboot``: ask the guests; ``-w`` waits until each is
    gone (shutdown) or back under a new id (reboot); ``-a`` every guest."""
    def run(args: argparse.Namespace) -> int:
        if args.all and args.dom is not None:
            raise XmUsageError("give either a domain or -a, not both")
        if not args.all and args.dom is None:
            raise XmUsageError(f"xm {args.command}: give a domain or -a for all domains")
        proxy = server()
        targets = [d["name"] for d in _all_guests(proxy)] if args.all else [args.dom]
        asked: Dict[int, str] = {}
        for dom in targets:
            out = _struct(proxy.xend.domain.shutdown(dom, reason), "xend.domain.shutdown")
            asked[out["domid"]] = out["name"]
            if not out["acknowledged"]:
                print(f"Domain {out['name']} is not running (paused or suspended): its guest "
                      f"acknowledges the {args.command} when it runs again", file=sys.stderr)
        if args.wait:
            _wait_for(proxy, asked, reason == "reboot")
        return EXIT_OK
    return run


def _wait_for(proxy: xmlrpc.client.ServerProxy, asked: Dict[int, str], reboot: bool) -> None:
    """Poll until every asked domain id is gone (and, for a reboot, its name is back)."""
    waiting = dict(asked)
    while waiting:
        domains = _structs(proxy.xend.domains_with_state(False, "all", False),
                           "xend.domains_with_state")
        ids = {d["domid"] for d in domains}
        names = {d["name"]: d["domid"] for d in domains}
        for domid, name in list(waiting.items()):
            if domid in ids:
                continue
            if reboot and names.get(name) is None:
                continue
            del waiting[domid]
            print(f"Domain {name} rebooted" if reboot else f"Domain {name} terminated")
        if waiting:
            time.sleep(POLL_S)


def cmd_mem_set(args: argparse.Namespace) -> int:
    server().xend.domain.setMemoryTarget(args.dom, args.mem)
    return EXIT_OK


VCPU_HEADER = "%-32s %5s %5s %5s %5s %9s %s" % ("Name", "ID", "VCPU", "CPU", "State", "Time(s)",
                                                "CPU Affinity")


def cmd_vcpu_list(args: argparse.Namespace) -> int:
    proxy = server()
    rows: List[Dict[str, Any]] = []
    for dom in args.domains or [None]:
        rows += _structs(proxy.xend.domain.getVCPUInfo(dom), "xend.domain.getVCPUInfo")
    print(VCPU_HEADER)
    for r in rows:
        print("%-32s %5d %5d %5s %5s %9.1f %s" % (r["name"], r["domid"], r["vcpu"],
                                                 r["cpu"] if r["cpu"] >= 0 else "-",
                                                 r["state"], r["cpu_time"], r["affinity"]))
    return EXIT_OK


def format_uptime(seconds: float) -> str:
    """xm's form: ``H:MM:SS``, with ``N day(s), `` in front after a day."""
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{days} day{'s' if days != 1 else ''}, {clock}" if days else clock


def cmd_uptime(args: argparse.Namespace) -> int:
    proxy = server()
    rows: List[Dict[str, Any]] = []
    for dom in args.domains or [None]:
        rows += _structs(proxy.xend.domain.uptime(dom), "xend.domain.uptime")
    print("%-32s %5s %s" % ("Name", "ID", "Uptime"))
    for r in rows:
        print("%-32s %5d %s" % (r["name"], r["domid"], format_uptime(r["uptime"])))
    return EXIT_OK


def cmd_dmesg(args: argparse.Namespace) -> int:
    dmesg = server().xend.node.dmesg
    sys.stdout.write(_text(dmesg.clear() if args.clear else dmesg.info(), "xend.node.dmesg"))
    return EXIT_OK


def cmd_log(args: argparse.Namespace) -> int:
    sys.stdout.write(_text(server().xend.node.log(), "xend.node.log"))
    return EXIT_OK


def cmd_domid(args: argparse.Namespace) -> int:
    print(_struct(server().xend.domain(args.dom), "xend.domain")["domid"])
    return EXIT_OK


def cmd_domname(args: argparse.Namespace) -> int:
    print(_struct(server().xend.domain(args.dom), "xend.domain")["name"])
    return EXIT_OK


def cmd_console(args: argparse.Namespace) -> int:
    sys.stdout.write(_text(server().xend.domain.console(args.dom), "xend.domain.console"))
    return EXIT_OK


def _add_everyday_commands(sub: Any) -> None:
    for name, reason, text in (("shutdown", "poweroff", "shut a domain down (the guest "
                                "acknowledges, then it is destroyed)"),
                               ("reboot", "reboot", "reboot a domain (the guest acknowledges, "
                                "then it restarts with the same config)")):
        p = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        p.add_argument("-w", "--wait", action="store_true",
                       help="wait until the shutdown or reboot is complete")
        p.add_argument("-a", "--all", action="store_true", help="every domain but Domain-0")
        p.add_argument("dom", nargs="?", metavar="DOM", help="domain name or id")
        p.set_defaults(func=_shutdown(reason))

    p = sub.add_parser("mem-set", help="set a domain's memory (the balloon target)")
    p.add_argument("dom", metavar="DOM", help="domain name or id")
    p.add_argument("mem", type=int, metavar="MB", help="target in MiB, up to its maximum")
    p.set_defaults(func=cmd_mem_set)

    p = sub.add_parser("vcpu-list", help="list the vcpus of domains")
    p.add_argument("domains", nargs="*", metavar="DOM")
    p.set_defaults(func=cmd_vcpu_list)

    p = sub.add_parser("uptime", help="time since each domain was built")
    p.add_argument("domains", nargs="*", metavar="DOM")
    p.set_defaults(func=cmd_uptime)

    p = sub.add_parser("dmesg", help="the hypervisor's console messages")
    p.add_argument("-c", "--clear", action="store_true", help="clear them after printing")
    p.set_defaults(func=cmd_dmesg)

    p = sub.add_parser("log", help="xend's log")
    p.set_defaults(func=cmd_log)

    _one_domain(sub, "domid", cmd_domid, "a domain's id from its name", "NAME")
    _one_domain(sub, "domname", cmd_domname, "a domain's name from its id", "ID")
    _one_domain(sub, "console", cmd_console, "print a domain's console log (the simulated "
                "guest takes no input, so xm does not attach)", "DOM", "domain name or id")

    p = sub.add_parser("help", help="list the commands, or show one command's usage")
    p.add_argument("topic", nargs="?", metavar="COMMAND")
    p.set_defaults(func=None, help_for=True)


def _subparsers(parser: argparse.ArgumentParser) -> Dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _help(parser: argparse.ArgumentParser, topic: Optional[str]) -> int:
    if topic is None:
        parser.print_help(sys.stdout)
        return EXIT_OK
    commands = _subparsers(parser)
    if topic not in commands:
        print(f"Error: unknown command {topic!r} (xm help lists the commands)", file=sys.stderr)
        return EXIT_ERROR
    commands[topic].print_help(sys.stdout)
    return EXIT_OK


def _fix_tmem_set(args: argparse.Namespace) -> None:
    """``xm tmem-set -a weight=3``: argparse puts ``weight=3`` in ``dom``."""
    if args.command == "tmem-set" and args.dom is not None and "=" in args.dom:
        args.settings = [args.dom, *args.settings]
        args.dom = None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # reported by the command's own parser, so its usage is the one shown
        command = _subparsers(parser).get(args.command or "", parser)
        command.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "help_for", False):
        return _help(parser, args.topic)
    if not getattr(args, "func", None):
        parser.print_usage(sys.stderr)
        print("Error: a command is required (xm -h lists them)", file=sys.stderr)
        return EXIT_ERROR
    _fix_tmem_set(args)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except XmUsageError as exc:
        _subparsers(parser)[args.command].print_usage(sys.stderr)
        print(f"Error: {exc}", file=sys.stderr)
        return exc.code
    except XmError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return exc.code
    except xmlrpc.client.Fault as fault:
        print(f"Error: {fault.faultString}", file=sys.stderr)
        return EXIT_NO_DOMAIN if fault.faultCode == rpc.FAULT_NO_SUCH_DOMAIN else EXIT_ERROR
    except BrokenPipeError:
        return EXIT_ERROR
    except (ConnectionRefusedError, FileNotFoundError, PermissionError) as exc:
        print(f"Error: Unable to connect to xend: {exc.strerror or exc}. Is xend running?",
              file=sys.stderr)
        return EXIT_ERROR
    except (OSError, http.client.HTTPException) as exc:
        detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        print(f"Error: lost the connection to xend: {detail}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("Error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
