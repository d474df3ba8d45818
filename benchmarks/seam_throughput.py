"""``xm save`` / ``xm restore`` through real xend + hypervisor process, against ``cp`` + ``sync``.

    python benchmarks/seam_throughput.py [--ram-mib 512] [--tmem-mib 1024] [--runs 3]
                                         [--dir DIR] [--json]

One run, on one filesystem (``--dir``, default the temporary directory), after
one untimed warm-up copy (first-touch memory in a VM is several times slower),
``--runs`` times in turn:

1. ``cp`` of a file the size of the expected image, then ``sync FILE`` (an
   fsync of the copy, as the save fsyncs its image): the baseline;
2. ``xm save`` of an idle domain with ``--ram-mib`` of RAM and ``--tmem-mib``
   of persistent tmem, through a real ``xend`` and its hypervisor process
   (every page crosses the seam: RAM through the client's mapping of the
   domain's RAM memfd, tmem through the connections' shared buffers);
3. ``xm restore`` of that image (the restored domain's RAM and tmem digests
   are checked against the first saved domain's, outside the timing; the next
   run saves the restored domain).

Before every timed step, cp, save and restore alike, a scratch file of the
image's size is written and deleted, untimed (:func:`_warm`: memory freed a
few seconds earlier costs a host commit again in this VM).

Each step is timed around the whole command (``cp``+``sync``, ``xm``). The
package's modules are compiled to bytecode first, as an install compiles them:
with ``PYTHONDONTWRITEBYTECODE`` set (this machine sets it) a checkout would
otherwise compile every module ``xm`` imports on every command (about 25 ms
of its 0.1 s start here).
Throughput is bytes of the file (copy or image) per second; the figures are
medians over the runs, and the ratios save/cp and restore/cp are those of the
medians (target: >= 0.8 each), with the ratio of the best runs beside them. The
hypervisor's tmem heap is committed before the timing (``tmem-prealloc-mb``:
Xen's heap is resident).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

MiB = 1 << 20
RECORD = 4096 + 24 + 4            # a tmem page's record in the image (v1 OID)


def _run(cmd: List[str], env: Dict[str, str], timeout: float = 1800) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    if r.returncode:
        raise SystemExit(f"Error: {' '.join(cmd[:4])} failed ({r.returncode}): "
                         f"{(r.stderr or r.stdout).strip()}")
    return r


def _timed(cmds: List[List[str]], env: Dict[str, str]) -> float:
    t0 = time.perf_counter()
    for cmd in cmds:
        _run(cmd, env)
    return time.perf_counter() - t0


def _write_source(path: Path, size: int) -> None:
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, MiB)
            f.write(block[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())


def _warm(path: Path, size: int) -> None:
    """Untimed, right before every timed step (cp, save and restore alike): write
    and delete a scratch file of the image's size. In this VM, memory freed a few
    seconds earlier has been handed back to the host and costs a commit on first
    touch again (measured: writing 1.5 GiB takes 0.3 s right after a delete,
    1.4-3.2 s after a 5-10 s pause); the steps differ in what ran just before
    them (a digest check, a previous step), so without this each step's figure
    depends on how long ago memory was freed, not on the step."""
    block = bytes(MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        left = size
        while left > 0:
            left -= os.write(fd, block[:min(left, MiB)])
    finally:
        os.close(fd)
        path.unlink()


def _compile_package() -> None:
    """Bytecode for every module of the package, as ``pip install`` writes it."""
    import compileall
    import xend_tmem
    compileall.compile_dir(os.path.dirname(xend_tmem.__file__), quiet=1)


def run(ram_mib: int, tmem_mib: int, where: str, keep: bool, runs: int) -> Dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="seam-bench-", dir=where))
    state = root / "state"
    cfg_path = root / "xend-config.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "xend-unix-socket": str(root / "xmlrpc.sock"), "xend-pid-file": str(root / "xend.pid"),
        "xend-state-dir": str(state), "logfile": str(root / "xend.log"), "loglevel": "INFO",
        "xend-relocation-server": False,
        "hypervisor": {"backend": "sim", "xen-release": "4.0.2",
                       "tmem-capacity-mb": tmem_mib + 256, "tmem-prealloc-mb": tmem_mib + 64},
        "checkpoint-plugins": ["tmem"],
    }, sort_keys=False))
    env = dict(os.environ, XEND_CONFIG=str(cfg_path), XM_SERVER=str(root / "xmlrpc.sock"))
    py = sys.executable
    xm = [py, "-m", "xend_tmem.xend.xm"]
    pages = tmem_mib * 256
    dom = root / "bench1.yaml"
    dom.write_text(yaml.safe_dump({
        "name": "bench1", "memory": ram_mib, "vcpus": 1,
        "tmem": {"version": 1, "pools": [{"id": 0, "persistent": True,
                                          "bulk": {"pages": pages, "objects": max(1, pages // 64),
                                                   "seed": 1}}]}}, sort_keys=False))
    image = root / "bench1.img"
    started = False
    cp_s: List[float] = []
    save_s: List[float] = []
    restore_s: List[float] = []
    cp_bytes = image_bytes = 0
    _compile_package()
    try:
        _run([py, "-m", "xend_tmem.xend.daemon", "start"], env)
        started = True
        _run(xm + ["create", str(dom)], env)
        from xend_tmem.hypervisor.client import HypervisorClient
        hv = HypervisorClient(str(state))
        try:
            domid = next(d.domid for d in hv.list_domains() if d.name == "bench1")
            want = (hv.ram_digest(domid), hv.tmem_digest(domid))
        finally:
            hv.close()

        # 1. the baseline: cp + sync of a file the size of the image
        size = ram_mib * MiB + pages * RECORD + MiB
        src, dst, scratch = root / "source.bin", root / "copy.bin", root / "scratch.bin"
        _write_source(src, size)
        # untimed warm-up: in a VM, memory the guest never touched costs a host
        # commit on first use (2 s/GiB here); the save and restore below reuse
        # memory already touched, so the baseline must too
        _timed([["cp", str(src), str(dst)], ["sync", str(dst)]], env)
        dst.unlink()
        # the steps interleave (cp, save, restore per run) so that a change in the
        # machine's load during the run reaches both sides alike
        for _ in range(runs):
            _warm(scratch, size)
            cp_s.append(_timed([["cp", str(src), str(dst)], ["sync", str(dst)]], env))
            cp_bytes = dst.stat().st_size
            dst.unlink()
            # 2. xm save (fsyncs the image; the domain is destroyed after it)
            _warm(scratch, size)
            save_s.append(_timed([xm + ["save", "bench1", str(image)]], env))
            image_bytes = image.stat().st_size
            # 3. xm restore (the next run saves the restored domain)
            _warm(scratch, size)
            restore_s.append(_timed([xm + ["restore", str(image)]], env))
            image.unlink()
            hv = HypervisorClient(str(state))
            try:
                domid = next(d.domid for d in hv.list_domains() if d.name == "bench1")
                got = (hv.ram_digest(domid), hv.tmem_digest(domid))
            finally:
                hv.close()
            if got != want:
                raise SystemExit("Error: the restored domain differs from the saved one")
        src.unlink()
    finally:
        if started:
            subprocess.run([py, "-m", "xend_tmem.xend.daemon", "stop"], env=env,
                           capture_output=True)
        subprocess.run([py, "-m", "xend_tmem.cli.tool", "hypervisor", "stop", "--force"],
                       env=env, capture_output=True)
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    cp_tp = [cp_bytes / t / MiB for t in cp_s]
    save_tp = [image_bytes / t / MiB for t in save_s]
    restore_tp = [image_bytes / t / MiB for t in restore_s]
    med = statistics.median
    return {
        "ram_mib": ram_mib, "tmem_mib": tmem_mib, "filesystem_dir": where, "runs": runs,
        "image_bytes": image_bytes, "copy_bytes": cp_bytes,
        "cp_sync_s": [round(t, 3) for t in cp_s], "save_s": [round(t, 3) for t in save_s],
        "restore_s": [round(t, 3) for t in restore_s],
        "cp_sync_mib_s": round(med(cp_tp), 1), "save_mib_s": round(med(save_tp), 1),
        "restore_mib_s": round(med(restore_tp), 1),
        "save_over_cp": round(med(save_tp) / med(cp_tp), 3),
        "restore_over_cp": round(med(restore_tp) / med(cp_tp), 3),
        "best_save_over_cp": round(max(save_tp) / max(cp_tp), 3),
        "best_restore_over_cp": round(max(restore_tp) / max(cp_tp), 3),
        "verified": True,
    }


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ram-mib", type=int, default=512)
    p.add_argument("--tmem-mib", type=int, default=1024)
    p.add_argument("--dir", default=tempfile.gettempdir(),
                   help="directory on the filesystem to measure (default: the temp dir)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON only")
    p.add_argument("--keep", action="store_true", help="keep the working directory (logs)")
    p.add_argument("--runs", type=int, default=3,
                   help="repetitions of each step; figures are medians (default 3)")
    args = p.parse_args(argv)
    if args.ram_mib < 1 or args.tmem_mib < 1 or args.runs < 1:
        print("Error: --ram-mib, --tmem-mib and --runs must be at least 1", file=sys.stderr)
        return 1
    res = run(args.ram_mib, args.tmem_mib, args.dir, args.keep, args.runs)
    if args.json:
        print(json.dumps(res, indent=2, sort_keys=True))
        return 0
    print(f"domain: {res['ram_mib']} MiB RAM, {res['tmem_mib']} MiB persistent tmem; "
          f"image {res['image_bytes'] / MiB:.0f} MiB in {res['filesystem_dir']}")
    def row(label: str, key: str, ratio: str = "") -> None:
        times = " ".join(f"{t:.2f}" for t in res[key + "_s"])
        extra = (f"  {res[ratio]:.2f} x cp (best runs {res['best_' + ratio]:.2f})"
                 if ratio else "")
        print(f"{label:11} {res[key + '_mib_s']:7.1f} MiB/s median (runs: {times} s){extra}")
    row("cp + sync", "cp_sync")
    row("xm save", "save", "save_over_cp")
    row("xm restore", "restore", "restore_over_cp")
    print(json.dumps(res, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
