"""Where ``xm save``/``xm restore`` time goes: the engine alone, with and without
the integrity sidecar, against ``cp`` + ``sync``, in one run.

    python benchmarks/seam_engine.py [--ram-mib 512] [--tmem-mib 1024] [--runs 3] [--dir DIR]

What ``seam_throughput.py`` times minus ``xm`` and ``xend``: ``save_domain`` into
a file through a hypervisor process (every page crosses the seam as in xend),
then the fsync; ``restore_domain`` of that file. Each run does, in order,
``cp``+``sync`` of a same-size file, save and restore *without* the sidecar work,
save and restore *with* it (the CRC writer, the page log and the sidecar file,
as xend's save does; the restore checks every page against the sidecar), each
step after the same untimed scratch write (see ``seam_throughput._warm``).
Medians, and each median's ratio to the cp + sync median. The restored
domain's digests are checked after every restore.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xend_tmem import integrity
from xend_tmem.checkpoint import restore_domain, save_domain
from xend_tmem.hypervisor.client import HypervisorClient, spawn
from xend_tmem.hypervisor.server import ServeOptions
from xend_tmem.plugins import get_plugin_manager

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seam_throughput import MiB, RECORD, _warm, _write_source


def run(ram_mib: int, tmem_mib: int, where: str, runs: int) -> Dict[str, List[float]]:
    root = Path(tempfile.mkdtemp(prefix="seam-engine-", dir=where))
    child = spawn(ServeOptions(state_dir=str(root / "state"), release="4.0.2",
                               capacity_mb=tmem_mib + 256, prealloc_mb=tmem_mib + 64))
    hv = HypervisorClient(str(root / "state"))
    times: Dict[str, List[float]] = {k: [] for k in ("cp", "save", "restore", "save+sidecar",
                                                     "restore+check")}
    try:
        pages = tmem_mib * 256
        domid = hv.create_domain({"name": "bench1", "memory": ram_mib, "vcpus": 1, "tmem": {
            "version": 1, "pools": [{"id": 0, "persistent": True, "bulk": {
                "pages": pages, "objects": max(1, pages // 64), "seed": 1}}]}})
        want = (hv.ram_digest(domid), hv.tmem_digest(domid))
        hooks = get_plugin_manager(["tmem"], {})
        size = ram_mib * MiB + pages * RECORD + MiB
        src, dst, img, scratch = (root / n for n in ("source.bin", "copy.bin", "img", "scratch"))
        _write_source(src, size)
        subprocess.run(["cp", str(src), str(dst)], check=True)      # untimed warm-up
        dst.unlink()
        for _ in range(runs):
            _warm(scratch, size)
            t0 = time.perf_counter()
            subprocess.run(["cp", str(src), str(dst)], check=True)
            subprocess.run(["sync", str(dst)], check=True)
            times["cp"].append(time.perf_counter() - t0)
            dst.unlink()
            for sidecar in (False, True):
                _warm(scratch, size)
                t0 = time.perf_counter()
                with open(img, "wb", buffering=0) as f:
                    log = integrity.PageLog() if sidecar else None
                    out = integrity.CrcWriter(f, log) if sidecar else f
                    save_domain(hv, domid, out, hooks=hooks, live=False,
                                **({"page_log": log} if sidecar else {}))
                    os.fsync(f.fileno())
                if sidecar:
                    integrity.write_sidecar(integrity.sidecar_path(str(img)), log, out)
                times["save+sidecar" if sidecar else "save"].append(time.perf_counter() - t0)
                hv.destroy_domain(domid)
                _warm(scratch, size)
                t0 = time.perf_counter()
                with open(img, "rb") as inp:
                    check = None
                    if sidecar:
                        check, note = integrity.load_sidecar(str(img), inp.fileno())
                        if check is None:
                            raise SystemExit(f"Error: the sidecar was not usable: {note}")
                    domid, _ = restore_domain(hv, check.reader(inp) if check else inp,
                                              hooks=hooks, paused=True, page_check=check)
                times["restore+check" if sidecar else "restore"].append(
                    time.perf_counter() - t0)
                if (hv.ram_digest(domid), hv.tmem_digest(domid)) != want:
                    raise SystemExit("Error: the restored domain differs from the saved one")
                img.unlink()
                Path(integrity.sidecar_path(str(img))).unlink(missing_ok=True)
    finally:
        hv.close()
        child.terminate()                 # the hypervisor process we started: reap it
        child.wait(30)
        shutil.rmtree(root, ignore_errors=True)
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ram-mib", type=int, default=512)
    p.add_argument("--tmem-mib", type=int, default=1024)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--dir", default=tempfile.gettempdir())
    args = p.parse_args()
    if args.ram_mib < 1 or args.tmem_mib < 1 or args.runs < 1:
        print("Error: --ram-mib, --tmem-mib and --runs must be at least 1", file=sys.stderr)
        return 1
    times = run(args.ram_mib, args.tmem_mib, args.dir, args.runs)
    cp = statistics.median(times["cp"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:14} runs {' '.join(f'{t:.2f}' for t in ts)} s  median {med:.3f} s  "
              f"{cp / med:.2f} x cp")
    return 0


if __name__ == "__main__":
    sys.exit(main())
