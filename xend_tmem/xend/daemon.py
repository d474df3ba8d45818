"""``xend start | stop | restart | status | reload | foreground``: the daemon's life cycle.

The daemon attaches to the configured hypervisor backend (by default the
simulated hypervisor's own process for the state directory, started if none
runs), serves ``xm`` over XML-RPC on a unix socket, runs the relocation server
when the configuration enables it, and logs to its log file. The hypervisor
outlives the daemon: ``stop`` and ``restart`` close xend's connection and leave
it and every domain running; ``start`` logs the domains it finds. ``foreground`` runs it
attached (service managers, tests); ``start`` launches ``foreground`` detached
and returns once the daemon answers on its socket, or prints why it could not.

Nothing a stopped daemon leaves blocks the next start: the pid file is guarded
by an advisory lock that dies with the process (a stale file is simply reused),
and a socket nobody listens on is removed before binding. SIGTERM and SIGINT
stop the daemon cleanly: running jobs are cancelled (their sources resume),
incoming migrations are broken off (their half-built domains removed), then the
socket and the pid file go, the pid file last so ``xend stop`` returns only when
everything is released. The handlers only record a signal (the main loop acts on
it: a handler that took a lock could wait for the main thread it interrupted), and
SIGUSR1 writes every thread's stack to the log. ``reload`` (or SIGHUP) re-reads the
configuration file without a restart
(:meth:`~xend_tmem.xend.service.XendService.reload` says what applies live and what
waits for a restart).
"""
from __future__ import annotations

import argparse
import errno
import faulthandler
import http.client
import logging
import os
import signal
import ssl
import sys
import threading
import xmlrpc.client
from typing import TYPE_CHECKING, Any, List, NoReturn, Optional, Sequence, Tuple

from ..config import ToolstackConfig, load_toolstack_config
from ..detach import (READY, process_ended, remove_stale_socket, report_ready, spawn_detached,
                      terminate)
from ..pidlock import PidLock, lock_holder, read_pid
from .. import fdwait
from ..errors import ConfigError, PluginError, XendTmemError
from ..hypervisor.backends import load_backend
from ..plugins import CheckpointHooks, get_plugin_manager
from .relocation.protocol import server_context
from .relocation.server import RelocationServer
from . import rpc
from .rpcserver import UnixXMLRPCServer, serve_in_thread
from .service import XendService

if TYPE_CHECKING:
    from ..hypervisor.interface import Hypervisor

log = logging.getLogger("xend_tmem.xend")

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 60.0
LOG_FORMAT = "[%(asctime)s %(process)d] %(levelname)s (%(name)s) %(message)s"


class StartError(XendTmemError):
    """The daemon cannot start (already running, address in use, bad config)."""


# -- pid file ------------------------------------------------------------------

class PidFile(PidLock):
    """xend's pid file: our lock, and never a file a stock xend (which does not
    lock its pid file) still owns."""

    def __init__(self, path: str) -> None:
        super().__init__(path, lambda pid: StartError(
            f"xend is already running (pid {pid}, pid file {path})"))

    def before_takeover(self) -> None:
        other = foreign_owner(self.path)
        if other is not None:
            raise StartError(f"pid file {self.path} belongs to running process {other} "
                             f"({_cmdline(other)}), which is not xend-tmem (a stock xend?); it "
                             f"is left alone: give this daemon its own xend-pid-file (and "
                             f"socket, state dir and ports; INSTALL.md, 'Two daemons on one "
                             f"host'), or remove the file if that process is no xend")


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            text = f.read(4096).replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return "command unknown"
    return text[:120] or "command unknown"


def _started_at(pid: int) -> Optional[float]:
    """When ``pid`` started (epoch seconds), from /proc; None if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            btime = next(int(ln.split()[1]) for ln in f if ln.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return btime + ticks / os.sysconf("SC_CLK_TCK")


def foreign_owner(path: str) -> Optional[int]:
    """The pid in an unlocked pid file if that process runs and is not us: a
    daemon that does not lock its pid file (xend) owns it. A process started
    after the file was written only reused a stale pid: None then."""
    pid = read_pid(path)
    if pid is None or pid == os.getpid() or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    if process_ended(pid):
        return None                 # killed, not yet reaped: gone
    started = _started_at(pid)
    try:
        written = os.stat(path).st_mtime
    except OSError:
        return None
    if started is not None and started > written + 1.0:
        return None
    return pid


def running_pid(path: str) -> Optional[int]:
    """The pid of the daemon holding ``path``'s lock, or ``None`` if none does."""
    return lock_holder(path)


# -- pieces of the running daemon ------------------------------------------------

def setup_logging(config: ToolstackConfig) -> logging.Handler:
    directory = os.path.dirname(config.logfile)
    if directory:
        os.makedirs(directory, exist_ok=True)
    handler = logging.FileHandler(config.logfile)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(getattr(logging, config.loglevel))
    return handler


def load_hooks(config: ToolstackConfig) -> Tuple[CheckpointHooks, List[str]]:
    """The plugin manager; a broken plugin is left out and reported, not fatal.

    A plugin's *configuration* error is fatal (the daemon refuses to start), as
    for any other key of the configuration file.
    """
    where = config.path or "configuration"
    settings = config.plugin_settings
    try:
        return get_plugin_manager(config.checkpoint_plugins, settings), []
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except PluginError as first:
        good: List[str] = []
        errors: List[str] = []
        for name in config.checkpoint_plugins:
            try:
                get_plugin_manager([name], settings)
            except PluginError as exc:
                errors.append(str(exc))
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            else:
                good.append(name)
        if not errors:
            raise first
        for message in errors:
            log.error("%s; continuing without it", message)
        return get_plugin_manager(good, settings), errors


def make_hypervisor(config: ToolstackConfig) -> "Hypervisor":
    """The configured backend (entry point named by ``hypervisor: backend:``): by
    default the hypervisor process of the state directory, started if none runs."""
    return load_backend(config.hypervisor, config.state_dir)


def log_domains(hv: "Hypervisor") -> None:
    """Say which domains xend found on the hypervisor it attached to."""
    guests = [d for d in hv.list_domains() if d.domid != 0]
    info = hv.host_info()
    log.info("attached to the %s hypervisor (Xen %s%s%s): %d domain%s", info.backend,
             info.xen_release, f", pid {info.pid}" if info.pid else "",
             f", defects {','.join(info.defects)}" if info.defects else "",
             len(guests), "" if len(guests) == 1 else "s")
    for d in guests:
        log.info("found domain %s (id %d, state %s)", d.name, d.domid, d.state)


IDENTIFY_METHOD = "xend_tmem.identify"
PROBE_TIMEOUT_S = 5.0
TWO_DAEMONS = ("give this daemon its own xend-unix-socket, xend-pid-file, xend-state-dir and "
               "relocation ports in its configuration (INSTALL.md, 'Two daemons on one host')")


def _clear_stale_socket(path: str, config_path: str = "") -> None:
    """Remove a socket nobody listens on; refuse one somebody answers on,
    saying whether it is another xend-tmem or something else (a stock xend,
    whose default socket is ours too), which is left alone."""
    if remove_stale_socket(path):
        return                     # nobody listened: a stopped daemon's leftover
    where = f" (config {config_path})" if config_path else ""
    try:
        who = getattr(rpc.connect(path, timeout=PROBE_TIMEOUT_S), IDENTIFY_METHOD)()
    except (xmlrpc.client.Error, OSError, http.client.HTTPException, ValueError):
        who = None
    if isinstance(who, dict) and who.get("product") == "xend-tmem":
        raise StartError(f"another xend-tmem (pid {who.get('pid')}, config "
                         f"{who.get('config') or 'defaults'}) is already serving {path}; stop it "
                         f"first (xend stop), or {TWO_DAEMONS}")
    raise StartError(f"{path} is served by another program, not xend-tmem (a stock xend?); "
                     f"it is left alone: {TWO_DAEMONS}{where}")


def _ssl_context(config: ToolstackConfig) -> ssl.SSLContext:
    """The TLS relocation server's context: its key pair, and with
    ``xend-relocation-ssl-ca-file`` the clients' certificates verified."""
    try:
        return server_context(config.relocation_tls())
    except (OSError, ssl.SSLError) as exc:
        ca = f", {config.relocation_ssl_ca_file}" if config.relocation_ssl_ca_file else ""
        raise StartError(f"cannot load the relocation TLS key, certificate or CA file "
                         f"({config.relocation_ssl_cert_file}, {config.relocation_ssl_key_file}"
                         f"{ca}): {exc}") from None


def raise_nofile_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit (many relocation peers
    and guests each hold descriptors); returns the soft limit now in force."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open file limit from %d to %d: %s", soft, want, exc)
    return soft


def _relocation_servers(config: ToolstackConfig, service: XendService
                        ) -> List[RelocationServer]:
    wanted: List[Tuple[int, Optional[ssl.SSLContext]]] = []
    if config.relocation_server:
        wanted.append((config.relocation_port, None))
    if config.relocation_ssl_server:
        wanted.append((config.relocation_ssl_port, _ssl_context(config)))
    servers: List[RelocationServer] = []
    try:
        for port, ctx in wanted:
            address = config.relocation_address or "0.0.0.0"
            try:
                server = RelocationServer(
                    address, port, hosts_allow=config.hosts_allow_patterns(),
                    restore=service.incoming_restore, check_offer=service.check_offer,
                    discard=service.discard_domain, ssl_context=ctx,
                    restore_cost=service.restore_cost_ms,
                    peer_fingerprint=config.relocation_ssl_peer_fingerprint if ctx else None)
            except OSError as exc:
                key = "xend-relocation-ssl-port" if ctx is not None else "xend-relocation-port"
                hint = (f"; another xend (or a second daemon) may use it: give this one its "
                        f"own port ({key} in {config.path or 'the configuration'})"
                        if exc.errno == errno.EADDRINUSE else "")
                raise StartError(f"cannot listen for relocation on {address}:{port}: "
                                 f"{exc.strerror or exc}{hint}") from None
            servers.append(server)
    except BaseException:
        for s in servers:
            s.stop(1.0)
        raise
    return servers


class Daemon:
    """One running xend; :meth:`run` blocks until SIGTERM/SIGINT or :meth:`stop`."""

    def __init__(self, config: ToolstackConfig) -> None:
        self.config = config
        self.stop_event = threading.Event()
        self.reload_event = threading.Event()
        self.pidfile = PidFile(config.pid_file)
        self.rpc: Optional[UnixXMLRPCServer] = None
        self._serving = False
        self.service: Optional[XendService] = None
        self.hv: Optional["Hypervisor"] = None
        self._log_handler: Optional[logging.Handler] = None
        # signals: the handler only records them and the wakeup fd wakes :meth:`run`
        self._wake: Optional[Tuple[int, int]] = None      # (read end, write end)
        self._signalled_stop = False
        self._signalled_reload = False
        self._handlers_installed = False

    def start(self) -> None:
        """Acquire everything; on failure release what was acquired and raise."""
        cfg = self.config
        try:
            self.pidfile.acquire()
            if cfg.unix_xmlrpc_server:   # before the hypervisor: refuse a clash at once
                _clear_stale_socket(cfg.unix_socket, cfg.path or "")
            os.makedirs(cfg.state_dir, exist_ok=True)
            self._log_handler = setup_logging(cfg)
            log.info("xend starting (config %s)", cfg.path or "defaults")
            log.info("open file limit %d", raise_nofile_limit())
            hooks, plugin_errors = load_hooks(cfg)
            self.hv = make_hypervisor(cfg)
            log_domains(self.hv)
            self.service = XendService(cfg, self.hv, hooks, plugin_errors)
            self.service.recover()       # end what a killed xend left in flight (journal)
            self.service.finish_shutdowns()   # guests that shut down while xend was away
            if cfg.unix_xmlrpc_server:
                _clear_stale_socket(cfg.unix_socket, cfg.path or "")
                self.rpc = UnixXMLRPCServer(cfg.unix_socket)
                self.service.register(self.rpc)
            self.service.relocation_servers = _relocation_servers(cfg, self.service)
            for server in self.service.relocation_servers:
                server.start()
                log.info("relocation server on %s:%d%s", server.address, server.port,
                         " (TLS)" if server.ssl_context else "")
            if self.rpc is not None:
                serve_in_thread(self.rpc)
                self._serving = True
            os.chdir(cfg.state_dir)
            log.info("xend running: pid %d, socket %s, checkpoint plugins: %s", os.getpid(),
                     cfg.unix_socket if self.rpc else "(off)",
                     " ".join(hooks.enabled) or "(none)")
        except BaseException:
            self.shutdown()
            raise

    def stop(self) -> None:
        """Stop :meth:`run` (from another thread; SIGTERM/SIGINT go through
        :meth:`_on_signal`)."""
        self.stop_event.set()
        self._poke()

    def request_reload(self) -> None:
        """Re-read the configuration (done by :meth:`run`, not by the caller)."""
        self.reload_event.set()
        self._poke()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        """SIGTERM/SIGINT/SIGHUP: record it, nothing else. Python runs a handler in
        the main thread between two bytecodes, possibly while that thread holds a
        lock (an Event's, inside ``Event.wait``); a handler taking a lock (even
        ``Event.set``) can wait for itself forever. Plain attribute stores take
        none; the wakeup fd (written by the C-level handler) wakes :meth:`run`."""
        if signum == signal.SIGHUP:
            self._signalled_reload = True
        else:
            self._signalled_stop = True

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop, SIGHUP reloads, SIGUSR1 writes every thread's
        stack to the log (a hung daemon says where it hangs). Main thread only."""
        _, w = self._wake_pipe()
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self._handlers_installed = True
        stream = getattr(self._log_handler, "stream", None)
        if stream is not None:
            faulthandler.register(signal.SIGUSR1, file=stream, all_threads=True, chain=False)

    def _release_wakeup_fd(self) -> bool:
        """Detach the wakeup fd (and SIGUSR1 from the log, which closes next);
        False if that cannot be done here (not the main thread): the fd must then
        stay open. The handlers stay: a SIGTERM repeated while xend stops, or
        after, only sets a flag nobody reads, rather than killing it half-way."""
        if not self._handlers_installed:
            return True
        if threading.current_thread() is not threading.main_thread():
            return False
        faulthandler.unregister(signal.SIGUSR1)
        signal.set_wakeup_fd(-1)
        self._handlers_installed = False
        return True

    def _wake_pipe(self) -> Tuple[int, int]:
        if self._wake is None:
            r, w = os.pipe()
            os.set_blocking(r, False)
            os.set_blocking(w, False)
            self._wake = (r, w)
        return self._wake

    def _poke(self) -> None:
        """Wake :meth:`run` now rather than at its next poll."""
        wake = self._wake
        if wake is not None:
            try:
                os.write(wake[1], b"\0")
            except OSError:      # full (it is awake anyway) or closed (it has stopped)
                pass

    def run(self) -> None:
        r, _ = self._wake_pipe()
        while True:
            # the handlers' flags become events here, outside any handler
            if self._signalled_stop:
                self.stop_event.set()
            if self._signalled_reload:
                self._signalled_reload = False
                self.reload_event.set()
            if self.stop_event.is_set():
                break
            if self.reload_event.is_set():
                self.reload_event.clear()
                if self.service is not None:
                    try:
                        self.service.reload()
                    except XendTmemError as exc:
                        log.error("SIGHUP: configuration not reloaded: %s", exc)
                continue
            try:
                fdwait.wait(r, read=True, timeout=0.5)
                while os.read(r, 512):
                    pass
            except (BlockingIOError, InterruptedError):
                pass
        log.info("xend stopping")
        self.shutdown()

    def shutdown(self) -> None:
        """Release in reverse order; safe after a partial start."""
        if self.service is not None:
            self.service.stop()          # refuses new jobs, cancels and awaits running ones
            for job in self.service.jobs.shutdown(0.0):     # (bounded: awaited just now)
                log.error("job %d (%s %s) ignored its cancellation; xend stops without it. "
                          "It waits at:\n%s", job.id, job.op, job.target,
                          job.stack().rstrip() or "(unknown)")
        if self.rpc is not None and self._serving:
            self.rpc.shutdown()          # (xm pollers have seen their jobs end by now)
            self._serving = False
        if self.hv is not None:
            self.hv.close()              # the hypervisor and its domains keep running
            self.hv = None
        if self.rpc is not None:
            self.rpc.server_close()
            self.rpc = None
        if self._release_wakeup_fd() and self._wake is not None:
            for fd in self._wake:
                os.close(fd)
            self._wake = None
        if self._log_handler is not None:
            log.info("xend stopped")
            logging.getLogger().removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None
        self.pidfile.release()


def foreground(config: ToolstackConfig, ready_fd: Optional[int] = None) -> int:
    daemon = Daemon(config)
    try:
        daemon.start()
    except XendTmemError as exc:
        report_ready(ready_fd, f"Error: {exc}")
        return 1
    except OSError as exc:
        report_ready(ready_fd, f"Error: {exc.strerror or exc}"
                      + (f": {exc.filename}" if exc.filename else ""))
        return 1
    daemon.install_signal_handlers()
    report_ready(ready_fd, None)
    daemon.run()
    if daemon.service is not None and daemon.service.jobs.running():
        # the job pool's threads are joined when the interpreter exits: a job that
        # ignored its cancellation (logged by stop) must not keep a stopped xend alive
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


# -- the control commands --------------------------------------------------------

def cmd_start(config: ToolstackConfig) -> int:
    pid = running_pid(config.pid_file)
    if pid is not None:
        print(f"xend is already running (pid {pid})")
        return 0
    env = dict(os.environ)
    if config.path:
        env["XEND_CONFIG"] = config.path
    try:
        child, text = spawn_detached("xend_tmem.xend.daemon", ["foreground"], config.logfile,
                                     START_TIMEOUT_S, env=env)
    except OSError as exc:
        print(f"Error: cannot start xend: {exc.strerror or exc}"
              + (f": {exc.filename}" if exc.filename else ""), file=sys.stderr)
        return 1
    if text == READY:
        return 0
    if text:
        print(text, file=sys.stderr)
    elif child.poll() is None:
        print(f"Error: xend (pid {child.pid}) did not report ready within "
              f"{START_TIMEOUT_S:.0f} s; see {config.logfile}", file=sys.stderr)
    else:
        print(f"Error: xend exited during start (status {child.returncode}); see "
              f"{config.logfile}", file=sys.stderr)
    return 1


def cmd_stop(config: ToolstackConfig) -> int:
    pid = running_pid(config.pid_file)
    if pid is None:
        print("xend is not running")
        return 0
    if terminate(pid, lambda: running_pid(config.pid_file) is None, STOP_TIMEOUT_S, poll=0.1):
        return 0
    print(f"Error: xend (pid {pid}) did not stop within {STOP_TIMEOUT_S:.0f} s", file=sys.stderr)
    return 1


def cmd_status(config: ToolstackConfig) -> int:
    pid = running_pid(config.pid_file)
    if pid is None:
        print("xend is not running")
        return 3           # LSB: program is not running
    print(f"xend is running (pid {pid})")
    return 0


def cmd_reload(config: ToolstackConfig) -> int:
    """``xend reload``: the running daemon re-reads its configuration and says what
    changed; without the XML-RPC socket it gets SIGHUP (the log says what changed)."""
    pid = running_pid(config.pid_file)
    if pid is None:
        print("Error: xend is not running", file=sys.stderr)
        return 3
    if not config.unix_xmlrpc_server:
        os.kill(pid, signal.SIGHUP)
        print(f"sent SIGHUP to xend (pid {pid}); {config.logfile} says what changed")
        return 0
    try:
        lines: Any = rpc.connect(config.unix_socket, timeout=60.0).xend.reload()
    except xmlrpc.client.Fault as fault:
        print(f"Error: {fault.faultString}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"Error: cannot reach xend at {config.unix_socket}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    if not isinstance(lines, list):
        print(f"Error: xend answered reload with {lines!r}, not a list of changes",
              file=sys.stderr)
        return 1
    for line in lines or ["nothing changed"]:
        print(line)
    return 0


class _ArgumentParser(argparse.ArgumentParser):
    """Usage errors as ``Error: ...`` and exit 1, like every other xend/xm error."""

    def error(self, message: str) -> "NoReturn":
        self.print_usage(sys.stderr)
        print(f"Error: {message}", file=sys.stderr)
        sys.exit(1)


def build_parser() -> argparse.ArgumentParser:
    p = _ArgumentParser(prog="xend", description="The xend-tmem host daemon.")
    p.add_argument("-c", "--config", help="toolstack configuration (default: $XEND_CONFIG or "
                                          "/etc/xen/xend-config.yaml)")
    p.add_argument("--foreground", action="store_true", help="same as the foreground command")
    p.add_argument("command", nargs="?", choices=("start", "stop", "restart", "status",
                                                  "reload", "foreground"))
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = "foreground" if args.foreground else args.command
    if command is None:
        parser.print_usage(sys.stderr)
        print("Error: a command is required: start, stop, restart, status or foreground",
              file=sys.stderr)
        return 1
    try:
        config = load_toolstack_config(args.config)
    except ConfigError as exc:
        report_ready(args.ready_fd, f"Error: {exc}")
        return 1
    if command == "foreground":
        return foreground(config, args.ready_fd)
    if command == "start":
        return cmd_start(config)
    if command == "stop":
        return cmd_stop(config)
    if command == "status":
        return cmd_status(config)
    if command == "reload":
        return cmd_reload(config)
    rc = cmd_stop(config)
    return rc if rc else cmd_start(config)


if __name__ == "__main__":
    sys.exit(main())
