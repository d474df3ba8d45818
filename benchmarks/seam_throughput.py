"""``xm save`` / ``xm restore`` through real xend + hypervisor process, against ``cp`` + ``sync``.

    python benchmarks/seam_throughput.py [--ram-mib 512] [--tmem-mib 1024] [--dir DIR] [--json]

One run, on one filesystem (``--dir``, default the temporary directory):

1. ``cp`` of a file the size of the expected image, then ``sync FILE`` (an
   fsync of the copy, as the save fsyncs its image): the baseline;
2. ``xm save`` of an idle domain with ``--ram-mib`` of RAM and ``--tmem-mib``
   of persistent tmem, through a real ``xend`` and its hypervisor process
   (every page crosses the seam: RAM through the client's mapping, tmem
   through the shared buffer);
3. ``xm restore`` of that image (the domain's RAM and tmem digests are checked
   against the saved domain's afterwards, outside the timing).

Each step is timed around the whole command (``cp``+``sync``, ``xm``).
Throughput is bytes of the file (copy or image) per second; the ratios
save/cp and restore/cp are reported (target: >= 0.8 each). The hypervisor's tmem
heap is committed before the timing (``tmem-prealloc-mb``: Xen's heap is
resident); the source file of the copy is written and synced before its timing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

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


def run(ram_mib: int, tmem_mib: int, where: str, keep: bool) -> Dict[str, Any]:
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
        src, dst = root / "source.bin", root / "copy.bin"
        _write_source(src, size)
        cp_s = _timed([["cp", str(src), str(dst)], ["sync", str(dst)]], env)
        cp_bytes = dst.stat().st_size
        src.unlink()
        dst.unlink()

        # 2. xm save (fsyncs the image)
        save_s = _timed([xm + ["save", "bench1", str(image)]], env)
        image_bytes = image.stat().st_size

        # 3. xm restore
        restore_s = _timed([xm + ["restore", str(image)]], env)
        hv = HypervisorClient(str(state))
        try:
            domid = next(d.domid for d in hv.list_domains() if d.name == "bench1")
            got = (hv.ram_digest(domid), hv.tmem_digest(domid))
        finally:
            hv.close()
        if got != want:
            raise SystemExit("Error: the restored domain differs from the saved one")
    finally:
        if started:
            subprocess.run([py, "-m", "xend_tmem.xend.daemon", "stop"], env=env,
                           capture_output=True)
        subprocess.run([py, "-m", "xend_tmem.cli.tool", "hypervisor", "stop", "--force"],
                       env=env, capture_output=True)
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    cp_tp = cp_bytes / cp_s / MiB
    save_tp = image_bytes / save_s / MiB
    restore_tp = image_bytes / restore_s / MiB
    return {
        "ram_mib": ram_mib, "tmem_mib": tmem_mib, "filesystem_dir": where,
        "image_bytes": image_bytes, "copy_bytes": cp_bytes,
        "cp_sync_s": round(cp_s, 3), "save_s": round(save_s, 3), "restore_s": round(restore_s, 3),
        "cp_sync_mib_s": round(cp_tp, 1), "save_mib_s": round(save_tp, 1),
        "restore_mib_s": round(restore_tp, 1),
        "save_over_cp": round(save_tp / cp_tp, 3), "restore_over_cp": round(restore_tp / cp_tp, 3),
        "verified": True,
    }


def main(argv: List[str] = None) -> int:  # type: ignore[assignment]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ram-mib", type=int, default=512)
    p.add_argument("--tmem-mib", type=int, default=1024)
    p.add_argument("--dir", default=tempfile.gettempdir(),
                   help="directory on the filesystem to measure (default: the temp dir)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON only")
    p.add_argument("--keep", action="store_true", help="keep the working directory (logs)")
    args = p.parse_args(argv)
    if args.ram_mib < 1 or args.tmem_mib < 1:
        print("Error: --ram-mib and --tmem-mib must be at least 1", file=sys.stderr)
        return 1
    res = run(args.ram_mib, args.tmem_mib, args.dir, args.keep)
    if args.json:
        print(json.dumps(res, indent=2, sort_keys=True))
        return 0
    print(f"domain: {res['ram_mib']} MiB RAM, {res['tmem_mib']} MiB persistent tmem; "
          f"image {res['image_bytes'] / MiB:.0f} MiB in {res['filesystem_dir']}")
    print(f"cp + sync   {res['cp_sync_s']:7.2f} s  {res['cp_sync_mib_s']:7.1f} MiB/s")
    print(f"xm save     {res['save_s']:7.2f} s  {res['save_mib_s']:7.1f} MiB/s  "
          f"{res['save_over_cp']:.2f} x cp")
    print(f"xm restore  {res['restore_s']:7.2f} s  {res['restore_mib_s']:7.1f} MiB/s  "
          f"{res['restore_over_cp']:.2f} x cp")
    print(json.dumps(res, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
