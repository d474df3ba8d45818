"""``xend-tmem hypervisor start | stop [--force] | status | serve``.

The simulated hypervisor is a process of its own that outlives xend (as Xen
outlives its toolstack). These commands manage it for the state directory of
the toolstack configuration (``-c FILE``, ``$XEND_CONFIG`` or the default):
``start`` launches it detached and returns once it answers (silent, like
``xend start``); ``stop`` refuses while guest domains run unless ``--force``,
which destroys them (saying which) as a host shutdown would; ``status`` says
whether it runs (exit 3 when not, as LSB and ``xend status``); ``serve`` runs
it attached (service managers, debugging).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, List, Optional, Tuple

from ..config import ToolstackConfig, load_toolstack_config
from ..detach import process_ended, terminate
from ..errors import ConfigError, XendTmemError

if TYPE_CHECKING:
    from ..hypervisor.client import HypervisorClient

STOP_TIMEOUT_S = 60.0
CALL_TIMEOUT_S = 30.0           # a hypervisor that does not answer is not waited for forever


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="toolstack configuration (default: $XEND_CONFIG or "
                                          "/etc/xen/xend-config.yaml)")
    sub = p.add_subparsers(dest="hv_command", required=True, metavar="COMMAND")
    sub.add_parser("start", help="start the hypervisor process if none runs")
    s = sub.add_parser("stop", help="stop the hypervisor process")
    s.add_argument("--force", action="store_true",
                   help="destroy the running domains (a host shutdown)")
    sub.add_parser("status", help="say whether the hypervisor process runs")
    sub.add_parser("serve", help="run the hypervisor process in the foreground")


def _state_dir(config: ToolstackConfig) -> str:
    return os.path.abspath(config.state_dir)


def cmd_start(config: ToolstackConfig) -> int:
    from ..hypervisor.client import options, spawn
    from ..hypervisor.server import running_pid
    pid = running_pid(_state_dir(config))
    if pid is not None:
        print(f"the hypervisor is already running (pid {pid})")
        return 0
    spawn(options(config.hypervisor, _state_dir(config)))
    return 0


def _running(config: ToolstackConfig) -> Optional[Tuple[int, "HypervisorClient"]]:
    """The running hypervisor's pid and a client of it; None (said so) if none runs."""
    from ..hypervisor.client import HypervisorClient
    from ..hypervisor.server import running_pid
    state_dir = _state_dir(config)
    pid = running_pid(state_dir)
    if pid is None:
        print("the hypervisor is not running")
        return None
    return pid, HypervisorClient(state_dir, timeout=CALL_TIMEOUT_S)


def cmd_stop(config: ToolstackConfig, force: bool) -> int:
    from ..hypervisor.server import running_pid
    found = _running(config)
    if found is None:
        return 0
    pid, client = found
    state_dir = client.state_dir
    try:
        guests = [d for d in client.list_domains() if d.domid != 0]
        if guests and not force:
            names = ", ".join(d.name for d in guests)
            print(f"Error: {len(guests)} domain{'s are' if len(guests) != 1 else ' is'} "
                  f"running ({names}): stopping the hypervisor destroys "
                  f"{'them' if len(guests) != 1 else 'it'}; use --force", file=sys.stderr)
            return 1
        for d in guests:
            client.destroy_domain(d.domid)
            print(f"destroyed domain {d.name} (id {d.domid})")
    except XendTmemError:
        if not force:
            raise
        # an unresponsive hypervisor: --force stops it anyway (its domains die with it)
    finally:
        client.close()
    if terminate(pid, lambda: running_pid(state_dir) is None and (pid <= 0 or process_ended(pid)),
                 STOP_TIMEOUT_S):
        return 0
    print(f"Error: the hypervisor (pid {pid}) did not stop within {STOP_TIMEOUT_S:.0f} s",
          file=sys.stderr)
    return 1


def cmd_status(config: ToolstackConfig) -> int:
    found = _running(config)
    if found is None:
        return 3
    pid, client = found
    try:
        identity = client.server_identity()
        n = len(client.list_domains()) - 1
    except XendTmemError:
        print(f"the hypervisor is running (pid {pid}) but does not answer")
        return 1
    finally:
        client.close()
    defects = identity.get("defects") or ()
    print(f"the hypervisor is running (pid {pid}, Xen {identity.get('release')}"
          f"{' with defects ' + ','.join(defects) if defects else ''}, "
          f"{n} guest domain{'s' if n != 1 else ''})")
    return 0


def cmd_serve(config: ToolstackConfig) -> int:
    from ..hypervisor.client import options
    from ..hypervisor.server import _report_to, serve
    return serve(options(config.hypervisor, _state_dir(config)), _report_to(None))


def run(args: argparse.Namespace) -> int:
    """The ``hypervisor`` command of ``xend-tmem``."""
    try:
        config = load_toolstack_config(args.config)
    except ConfigError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    try:
        if args.hv_command == "start":
            return cmd_start(config)
        if args.hv_command == "stop":
            return cmd_stop(config, args.force)
        if args.hv_command == "status":
            return cmd_status(config)
        return cmd_serve(config)
    except XendTmemError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="xend-tmem hypervisor")
    add_arguments(p)
    return run(p.parse_args(argv))
