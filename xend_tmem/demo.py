"""``xend-tmem demo``: a live migration of a tmem-heavy domain between two daemons.

Starts two ``xend`` daemons on loopback in a temporary directory, creates a
simulated domain with RAM, gigabyte-scale tmem (persistent, ephemeral and
shared pools) and a running guest workload on the first, live-migrates it to
the second with ``xm migrate --live``, and checks that the tmem the destination
restored equals the source's at suspend (the ``tmem-digest`` plugin records
both). ``xm migrate --progress`` shows each phase with its rate and ETA (a bar
per phase on a terminal, a line per phase and every few seconds in a log).
Everything is driven through the commands an administrator uses; the
daemons, their hypervisor processes (``xend-tmem hypervisor stop --force``) and
the directory are removed at the end, also on failure or Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import yaml

from .xen import LAYOUTS
from .tmem.settings import PLANS
from .xend.progress import plural, shown_lines

SIZES = {  # --size: (persistent tmem MiB, RAM MiB)
    "small": (64, 64),
    "default": (1024, 256),
    "large": (4096, 512),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", choices=sorted(SIZES), default="default",
                   help="small: 64 MiB tmem / 64 MiB RAM; default: 1 GiB / 256 MiB; "
                        "large: 4 GiB / 512 MiB")
    p.add_argument("--tmem-mib", type=int, help="persistent tmem to migrate (overrides --size)")
    p.add_argument("--ram-mib", type=int, help="guest RAM (overrides --size)")
    p.add_argument("--plan", choices=PLANS, default="auto", help="the tmem migration plan")
    p.add_argument("--layout", choices=LAYOUTS, default="released", help="the stream layout")
    p.add_argument("--downtime-limit-ms", type=int, default=300)
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    p.add_argument("--json", action="store_true", help="print the migration report as JSON")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class _Host:
    """One daemon of the demo: its config, environment and commands."""

    def __init__(self, name: str, root: Path, args: argparse.Namespace, capacity_mb: int) -> None:
        self.name = name
        self.dir = root / name
        self.dir.mkdir()
        self.port = _free_port()
        self.config = self.dir / "xend-config.yaml"
        self.config.write_text(yaml.safe_dump({
            "logfile": str(self.dir / "xend.log"),
            "loglevel": "INFO",
            "xend-unix-socket": str(self.dir / "xmlrpc.sock"),
            "xend-pid-file": str(self.dir / "xend.pid"),
            "xend-state-dir": str(self.dir / "state"),
            "xend-relocation-server": True,
            "xend-relocation-address": "127.0.0.1",
            "xend-relocation-port": self.port,
            "xend-relocation-hosts-allow": r"^127\.0\.0\.1$ ^localhost$",
            "hypervisor": {"backend": "sim", "xen-release": "4.0.2",
                           "tmem-capacity-mb": capacity_mb},
            "checkpoint-plugins": ["tmem", "tmem-digest"],
            "migration": {"downtime-limit-ms": args.downtime_limit_ms},
            "tmem": {"plan": args.plan, "layout": args.layout},
        }, sort_keys=False))
        self.env = dict(os.environ, XEND_CONFIG=str(self.config),
                        XM_SERVER=str(self.dir / "xmlrpc.sock"))
        self.started = False

    def run(self, *cmd: str, capture: bool = True, check: bool = True,
            show_stderr: bool = False) -> subprocess.CompletedProcess[str]:
        """``show_stderr``: the command's stderr goes straight to ours (its progress)."""
        r = subprocess.run(list(cmd), env=self.env, text=True,
                           stdout=subprocess.PIPE if capture else None,
                           stderr=subprocess.PIPE if capture and not show_stderr else None)
        if check and r.returncode:
            msg = (r.stderr or r.stdout or "").strip().splitlines()
            raise DemoError(f"{' '.join(cmd[:3])} on host {self.name} failed: "
                            f"{msg[-1] if msg else f'exit {r.returncode}'}")
        return r

    def xend(self, command: str) -> None:
        self.run(sys.executable, "-m", "xend_tmem.xend.daemon", command)
        self.started = command == "start"

    def xm(self, *args: str, capture: bool = True, check: bool = True,
           show_stderr: bool = False) -> subprocess.CompletedProcess[str]:
        return self.run(sys.executable, "-m", "xend_tmem.xend.xm", *args, capture=capture,
                        check=check, show_stderr=show_stderr)


class DemoError(Exception):
    pass


def _domain(tmem_mib: int, ram_mib: int) -> Dict[str, Any]:
    persistent = tmem_mib * 256
    return {
        "name": "demo1", "memory": ram_mib, "vcpus": 2,
        "workload": {"ram_dirty_pages_per_s": 1500, "tmem_puts_per_s": 3000,
                     "tmem_gets_per_s": 2000, "tmem_flushes_per_s": 800, "seed": 7},
        "tmem": {"version": 1, "client": {"compress": False, "weight": 20, "cap": 50},
                 "pools": [
                     {"id": 0, "persistent": True,
                      "bulk": {"pages": persistent, "objects": max(1, persistent // 64),
                               "seed": 1}},
                     {"id": 1, "persistent": False,
                      "bulk": {"pages": max(1, persistent // 8), "objects": 64, "seed": 2}},
                     {"id": 2, "persistent": True, "shared": True, "uuid": [0xFEED, 0xBEEF],
                      "bulk": {"pages": 512, "objects": 4, "seed": 3}},
                 ]},
    }


def _say(text: str) -> None:
    print(f"demo: {text}", file=sys.stderr, flush=True)


def _verify(result: Dict[str, Any]) -> List[str]:
    """Problems found comparing the source's tmem at suspend with the destination's."""
    src = ((result.get("plugins") or {}).get("tmem-digest") or {}).get("pools")
    dst_report = result.get("destination") or {}
    dst = ((dst_report.get("plugins") or {}).get("tmem-digest") or {}).get("pools")
    if src is None or dst is None:
        return ["no tmem digest from " + ("the source" if src is None else "the destination")]
    problems = []
    for pool in sorted(set(src) | set(dst), key=int):
        a, b = src.get(pool), dst.get(pool)
        if a != b:
            problems.append(f"pool {pool}: source at suspend {a}, destination {b}")
    return problems


AGREEMENT = 0.25      # issue 7: estimates within 25 % of the actual figures


def _expected_lines(result: Dict[str, Any]) -> List[str]:
    """The downtime expected before the suspend against the actual one, and why
    the destination's restore is part of both: the tmem-digest check hashes all
    persistent tmem there before the guest may run (a check of the state the
    guest resumes with cannot run after it resumed), so the destination
    announces that cost at pre-flight and the source's estimate includes it."""
    actual, est = result.get("downtime_ms"), result.get("est_downtime_ms")
    if not isinstance(actual, (int, float)) or not isinstance(est, (int, float)):
        return []
    restore = result.get("est_restore_ms")
    lines = []
    if isinstance(restore, (int, float)) and restore > 0:
        lines.append(f"the destination's tmem-digest check hashes all persistent tmem before "
                     f"the guest runs there: ~{restore:.0f} ms of the downtime, announced at "
                     "pre-flight and included in the estimate (the source hashes after the "
                     "destination runs the guest)")
    # the rule (as the policy grid's): the two differ by at most AGREEMENT of the
    # larger (or 5 ms); the figure printed is that same fraction, named after
    # what it is a fraction of, so "+30 %" never stands beside "within 25 %"
    larger, diff = max(actual, est), abs(actual - est)
    agree = diff <= max(AGREEMENT * larger, 5.0)
    of = "the actual" if actual >= est else "the estimate"
    lines.append(f"downtime {actual:.1f} ms against {est:.1f} ms expected before the suspend "
                 f"(off by {diff:.0f} ms, {diff / larger if larger > 0 else 0.0:.0%} of {of}): "
                 f"{'within' if agree else 'NOT within'} {AGREEMENT:.0%}")
    return lines


def main(args: argparse.Namespace) -> int:
    tmem_mib, ram_mib = SIZES[args.size]
    tmem_mib = args.tmem_mib if args.tmem_mib is not None else tmem_mib
    ram_mib = args.ram_mib if args.ram_mib is not None else ram_mib
    if tmem_mib < 1 or ram_mib < 1:
        print("Error: --tmem-mib and --ram-mib must be at least 1", file=sys.stderr)
        return 1
    capacity = tmem_mib + tmem_mib // 4 + 64
    root = Path(tempfile.mkdtemp(prefix="xend-tmem-demo-"))
    hosts = [_Host("source", root, args, capacity), _Host("destination", root, args, capacity)]
    src, dst = hosts
    ok = False
    try:
        _say("starting two xend daemons on 127.0.0.1, each with its hypervisor process")
        for h in hosts:
            h.xend("start")
        _say(f"two xend daemons on 127.0.0.1 (relocation ports {src.port} and {dst.port}), "
             f"state in {root}")
        dom = root / "demo1.yaml"
        dom.write_text(yaml.safe_dump(_domain(tmem_mib, ram_mib), sort_keys=False))
        t0 = time.monotonic()
        _say(f"creating demo1 on the source: {ram_mib} MiB RAM, {tmem_mib} MiB persistent tmem "
             f"(+{max(1, tmem_mib // 8)} MiB ephemeral, 2 MiB shared) ...")
        src.xm("create", str(dom))
        _say(f"created demo1 in {time.monotonic() - t0:.1f} s; its guest workload runs for "
             "2 s before the migration")
        time.sleep(2.0)
        _say(f"xm migrate --live --progress -p {dst.port} demo1 127.0.0.1 (plan {args.plan}, "
             f"layout {args.layout})")
        # xm's progress goes to our stderr: a bar per phase on a terminal, a line
        # per phase and every few seconds in a log (--progress)
        r = src.xm("migrate", "--live", "--json", "--progress", "-p", str(dst.port), "demo1",
                   "127.0.0.1", check=False, show_stderr=True)
        if r.returncode:
            raise DemoError(f"the migration failed (xm migrate exited {r.returncode}; its "
                            "error is above)")
        result = json.loads(r.stdout)
        problems = _verify(result)
        if args.json:
            print(json.dumps(result, indent=2, sort_keys=True))
        else:
            for line in shown_lines(result):
                print(line)
        listing = dst.xm("list").stdout.splitlines()
        running = any(line.split()[:1] == ["demo1"] and "r" in line.split()[4]
                      for line in listing[1:] if len(line.split()) > 4)
        if problems:
            for p in problems:
                print(f"Error: tmem differs: {p}", file=sys.stderr)
            return 1
        pools = result["plugins"]["tmem-digest"]["pools"]
        pages = sum(p["pages"] for p in pools.values())
        print(f"verified: the destination's persistent tmem equals the source's at suspend "
              f"({plural(pages, 'page')} in {plural(len(pools), 'pool')}, sha256 per pool); "
              "demo1 is "
              f"{'running' if running else 'NOT running'} on the destination")
        parts = [f"{label} {result[key]:.1f} ms" for key, label in
                 (("image_ms", "image complete after"), ("restore_ms", "restore"),
                  ("handshake_ms", "received -> running"))
                 if isinstance(result.get(key), (int, float))]
        if parts:
            print(f"downtime parts: {', '.join(parts)} (the source's clock from suspend; the "
                  "guest's own figure is its heartbeat's gap)")
        for line in _expected_lines(result):
            print(line)
        ok = running
        return 0 if ok else 1
    except DemoError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    finally:
        if any(h.started for h in hosts):
            _say("stopping the daemons and their hypervisor processes")
        for h in hosts:
            if h.started:
                h.run(sys.executable, "-m", "xend_tmem.xend.daemon", "stop", check=False)
            # the hypervisor outlives xend: shut this host down (its domains with it)
            h.run(sys.executable, "-m", "xend_tmem.cli.tool", "hypervisor", "stop", "--force",
                  check=False)
        if args.keep or not ok:
            _say(f"logs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


__all__ = ["add_arguments", "main"]
