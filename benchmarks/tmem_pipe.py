"""tmem save -> pipe -> restore between two processes, against a raw pipe.

    python benchmarks/tmem_pipe.py [--mib 1024] [--runs 3] [--json]

Each run moves the same number of bytes through a pipe in 1 MiB blocks
(written from a preallocated buffer, read and discarded: the baseline), then
saves a simulated domain's persistent tmem (``--mib`` of 4 KiB pages) as a
``-5`` chunk into a pipe while a second process restores it into its own
simulated hypervisor. Setup (generating the pages) is outside the timing.

The baseline starts where the tmem pair it is held against starts: beside
children that have just taken the memory that pair's setup takes, and keep it
(``raw_s``: the sender's pages, as before the cold pair; ``raw_prealloc_s``:
those and the receiving heap, as before the preallocated pair). In this VM
memory taken a moment ago leaves the free lists on pages the host has
reclaimed, and the pipe's own buffers are then allocated from those: the
first few hundred MiB through the pipe pay a host fault per page, whoever
writes them (a raw pipe right after a 2.2 GiB allocation took 0.51-1.12 s
against 0.38-0.48 s, benchmarks/README.md PERF9l). ``raw_unheld_s`` is the
baseline with nothing held, and ``ratio_unheld``/``ratio_prealloc_unheld``
the ratios against it.

Reported per run and as the median: throughput of both, the ratio
tmem/raw, the time a fresh process takes to commit the same number of bytes and
nothing else, started where the cold receiver starts (``commit_s``;
``ratio_commit_floor`` = raw / max(raw, commit): what a cold receiver could reach
if committing were all it did; ``commit_beside_pipe_s`` and
``ratio_commit_floor_beside_pipe``: the same commit while the raw pipe moves
the bytes beside it, as a cold receiver's stream does: in this VM the two
slow each other down), both again on recycled memory (``*_recycled*``:
see ``_recycle``), and each side's
memory: ``*_held_mib`` is the whole resident size (VmRSS, interpreter
included) of the process holding the pages (the sender after setup, the
receiver after the restore), ``*_peak_over_held_mib`` how far its peak during
the transfer (VmHWM, reset after setup) rose above that, and ``*_total_mib``
their sum, to hold against ``memory_limit_mib`` (page data x 1.02 + 32 MiB).
The cold receiver commits its memory during the timed transfer; the
preallocated one has it committed at startup (Xen's resident heap).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Iterator, Sequence, Tuple

MiB = 1 << 20
BLOCK = MiB
_CPU0 = [0.0]


def _rss_kib(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _ready_and_wait(info: dict) -> None:
    """Tell the parent setup is done, then wait for its 'go'."""
    sys.stdout.write(json.dumps({"ready": True, **info}) + "\n")
    sys.stdout.flush()
    sys.stdin.readline()
    _CPU0[0] = time.process_time()


def _report(info: dict) -> None:
    info["cpu_s"] = time.process_time() - _CPU0[0]
    sys.stdout.write(json.dumps(info) + "\n")
    sys.stdout.flush()


# -- child roles -------------------------------------------------------------------

def role_raw_send(fd: int, nbytes: int) -> None:
    block = os.urandom(BLOCK)
    out = os.fdopen(fd, "wb", buffering=0)
    _ready_and_wait({})
    t0 = time.monotonic()
    left = nbytes
    mv = memoryview(block)
    while left:
        n = min(left, BLOCK)
        wrote = out.write(mv[:n])
        left -= wrote
    out.close()
    _report({"t0": t0, "t1": time.monotonic()})


def role_raw_recv(fd: int, nbytes: int) -> None:
    inp = os.fdopen(fd, "rb", buffering=0)
    buf = bytearray(BLOCK)
    _ready_and_wait({})
    t0 = time.monotonic()
    got = 0
    while True:
        n = inp.readinto(buf)
        if not n:
            break
        got += n
    _report({"t0": t0, "t1": time.monotonic(), "bytes": got})


def _domain_config(pages: int):
    from xend_tmem.domconfig import parse_domain_config
    return parse_domain_config({
        "name": "bench", "memory": 1, "vcpus": 1,     # guest RAM is not what is measured
        "tmem": {"version": 1, "pools": [
            {"id": 0, "persistent": True, "shared": False, "pagebits": 0, "uuid": [0, 0],
             "pages": [], "bulk": {"pages": pages, "objects": max(1, pages // 512)}}]},
    })


def role_save(fd: int, pages: int) -> None:
    from xend_tmem.binio import StreamWriter
    from xend_tmem.hypervisor.sim import SimHypervisor
    from xend_tmem.tmem.save import TmemWriter
    hv = SimHypervisor(tmem_version=1, tmem_capacity_pages=pages + 1024)
    domid = hv.create_domain(_domain_config(pages))
    hv.suspend(domid)
    out = os.fdopen(fd, "wb", buffering=0)
    _reset_peak()
    before = held = _rss_kib()
    _ready_and_wait({})
    t0 = time.monotonic()
    w = StreamWriter(out)
    writer = TmemWriter(hv, domid, live=False)
    try:
        writer.begin()
        writer.write_tmem(w)
        w.flush()
    finally:
        writer.end()
    out.close()
    t1 = time.monotonic()
    _report({"t0": t0, "t1": t1, "bytes": w.offset, "pages": writer.pages,
             "held_kib": held, "rss_before_kib": before, "peak_kib": _rss_kib("VmHWM")})


def _prealloc_mib(pages: int) -> int:
    return (pages * 4124 >> 20) + 16


def role_restore(fd: int, pages: int, prealloc: bool) -> None:
    from xend_tmem.binio import StreamReader
    from xend_tmem.hypervisor.sim import SimHypervisor
    from xend_tmem.tmem.restore import TmemRestorer
    hv = SimHypervisor(tmem_version=1, tmem_capacity_pages=pages + 1024,
                       tmem_prealloc_mib=_prealloc_mib(pages) if prealloc else 0)
    domid = hv.create_domain_shell("bench", 256, 1)
    inp = os.fdopen(fd, "rb", buffering=0)
    _reset_peak()
    start_rss = _rss_kib()
    _ready_and_wait({})
    t0 = time.monotonic()
    r = StreamReader(inp)
    rest = TmemRestorer(hv, domid)
    off = r.offset
    rest.read_chunk(r, r.s32("marker"), off)
    rest.finish()
    t1 = time.monotonic()
    end_rss = _rss_kib()
    _report({"t0": t0, "t1": t1, "pages": rest.page_count, "bytes": r.offset,
             "held_kib": end_rss, "rss_before_kib": start_rss,
             "rss_end_kib": end_rss, "peak_kib": _rss_kib("VmHWM")})


def role_hold(fd: int, pages: int) -> None:
    """The sender's setup and nothing else: it takes the memory the sender
    takes, in the same order, and holds it until killed."""
    from xend_tmem.hypervisor.sim import SimHypervisor
    hv = SimHypervisor(tmem_version=1, tmem_capacity_pages=pages + 1024)
    hv.suspend(hv.create_domain(_domain_config(pages)))
    _ready_and_wait({})


def role_hold_heap(fd: int, pages: int) -> None:
    """The preallocated receiver's setup and nothing else: its committed heap,
    held until killed."""
    from xend_tmem.hypervisor.sim import SimHypervisor
    hv = SimHypervisor(tmem_version=1, tmem_capacity_pages=pages + 1024,  # noqa: F841 - held
                       tmem_prealloc_mib=_prealloc_mib(pages))
    _ready_and_wait({})


def role_commit(nbytes: int) -> None:
    """The floor under a cold receiver: a fresh process committing ``nbytes`` of
    memory (MAP_POPULATE, in the store's segment size) and nothing else."""
    import mmap
    from xend_tmem.hypervisor.pagestore import SEGMENT_BYTES
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    _ready_and_wait({})
    t0 = time.monotonic()
    segs = [mmap.mmap(-1, SEGMENT_BYTES, flags=flags) for _ in range(-(-nbytes // SEGMENT_BYTES))]
    t1 = time.monotonic()
    _report({"t0": t0, "t1": t1, "segments": len(segs)})


# -- parent ------------------------------------------------------------------------

def _spawn(role: str, fd: int, arg: int):
    return subprocess.Popen([sys.executable, __file__, "--role", role, "--fd", str(fd),
                             "--arg", str(arg)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            pass_fds=(fd,) if fd >= 0 else (), text=True)


def _recycle(nbytes: int) -> None:
    """Touch ``nbytes`` and free them: the next process to commit memory gets
    pages the guest kernel used a moment ago. Left free a while, memory on this
    VM goes back to the host (free page reporting) and its next first touch
    costs a fault in the host too, several times the kernel's own commit; a
    bare-metal dom0 never pays that."""
    import mmap
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                  | getattr(mmap, "MAP_POPULATE", 0))
    m.close()


def _ready(p) -> None:
    if not p.stdout.readline():
        raise SystemExit(f"benchmark child {p.args[3]} died during setup")


def _go(p) -> None:
    p.stdin.write("go\n")
    p.stdin.flush()


def _collect(p) -> dict:
    line = p.stdout.readline()
    p.wait()
    if p.returncode or not line:
        raise SystemExit(f"benchmark child {p.args[3]} failed (exit {p.returncode})")
    return json.loads(line)


def _result(p) -> dict:
    _go(p)
    return _collect(p)


F_SETPIPE_SZ = 1031


@contextlib.contextmanager
def _holding(holds: Sequence[Tuple[str, int]]) -> Iterator[None]:
    """Children that take memory as a pair's setup takes it (``role_hold``:
    the sender's pages, ``role_hold_heap``: a preallocated receiver's heap), in
    that order, and keep it until the block ends."""
    holders = []
    try:
        for role, pages in holds:
            holders.append(_spawn(role, -1, pages))
            _ready(holders[-1])
        yield
    finally:
        for h in holders:           # they hold memory and nothing else: no result to wait for
            h.kill()
            h.wait()


def _alone(role: str, arg: int, recycle: int = 0, after_hold: int = 0) -> dict:
    """One child alone. ``after_hold``: first a child takes the memory a
    sender of that many pages takes (``role_hold``) and keeps it meanwhile, so
    the child starts where a cold receiver starts; ``recycle``: that many bytes
    are touched and freed just before its timing (``_recycle``)."""
    with _holding([("hold", after_hold)] if after_hold else []):
        p = _spawn(role, -1, arg)
        _ready(p)
        if recycle:
            _recycle(recycle)
        return _result(p)


def _pair(send_role: str, recv_role: str, arg: int, recycle: int = 0,
          holds: Sequence[Tuple[str, int]] = ()):
    """``holds``: the pair runs beside children holding that memory
    (``_holding``), taken just before its own setup."""
    with _holding(holds):
        return _pair_now(send_role, recv_role, arg, recycle)


def _pair_now(send_role: str, recv_role: str, arg: int, recycle: int, beside=None):
    """``beside``: a child, ready, told to go when the pair is (its result is
    the caller's to collect)."""
    r, w = os.pipe()
    try:   # both the baseline and tmem get the same 1 MiB pipe (the default is 64 KiB)
        import fcntl
        fcntl.fcntl(w, F_SETPIPE_SZ, BLOCK)
    except OSError:
        pass
    sender = _spawn(send_role, w, arg)
    receiver = _spawn(recv_role, r, arg)
    os.close(r)
    os.close(w)
    for p in (sender, receiver):
        _ready(p)
    if recycle:
        _recycle(recycle)
    for p in (receiver, sender) + ((beside,) if beside is not None else ()):
        _go(p)
    res = [_collect(p) for p in (sender, receiver)]
    elapsed = max(x["t1"] for x in res) - min(x["t0"] for x in res)
    return elapsed, res[0], res[1]


ROLES = {
    "raw-send": lambda fd, arg: role_raw_send(fd, arg),
    "raw-recv": lambda fd, arg: role_raw_recv(fd, arg),
    "save": lambda fd, arg: role_save(fd, arg),
    "restore": lambda fd, arg: role_restore(fd, arg, prealloc=False),
    "restore-prealloc": lambda fd, arg: role_restore(fd, arg, prealloc=True),
    "commit": lambda fd, arg: role_commit(arg),
    "hold": lambda fd, arg: role_hold(fd, arg),
    "hold-heap": lambda fd, arg: role_hold_heap(fd, arg),
}


def _profile_threads(role: str) -> None:
    """Profile every thread the role starts too (the restore's put thread, the
    heap's committing thread): one file per thread name, merged across the
    threads of that name, ``/tmp/bench-<role>-<thread>.prof``."""
    import cProfile
    import re
    import threading
    run = threading.Thread.run
    profiles: dict = {}
    lock = threading.Lock()

    def profiled_run(self: threading.Thread) -> None:
        pr = cProfile.Profile()
        pr.enable()
        try:
            run(self)
        finally:
            pr.disable()
            name = re.sub(r"[_-]?\d+$", "", self.name) or "thread"
            import pstats
            with lock:
                st = profiles.get(name)
                if st is None:
                    profiles[name] = st = pstats.Stats(pr)
                else:
                    st.add(pr)
                st.dump_stats(f"/tmp/bench-{role}-{name}.prof")

    threading.Thread.run = profiled_run  # type: ignore[method-assign]


def _run_role(args) -> None:
    ROLES[args.role](args.fd, args.arg)


def _commit_beside_pipe(nbytes: int, pages: int) -> float:
    """``role_commit`` started where the cold receiver starts (the sender's
    memory just taken and held), committing while the raw pipe moves the same
    bytes, as a cold receiver commits while its stream flows: in this VM the
    pipe's own first touches and the commit's are both host faults, and they
    slow each other down (PERF9l). The raw pair's time is not used."""
    with _holding([("hold", pages)]):
        p = _spawn("commit", -1, nbytes)
        _ready(p)
        _pair_now("raw-send", "raw-recv", nbytes, 0, beside=p)
        res = _collect(p)
    return float(res["t1"] - res["t0"])


def _raw_pair(nbytes: int, holds: Sequence[Tuple[str, int]]) -> float:
    t_raw, _, raw_recv = _pair("raw-send", "raw-recv", nbytes, holds=holds)
    if raw_recv["bytes"] != nbytes:
        raise SystemExit(f"raw pipe moved {raw_recv['bytes']} of {nbytes} bytes")
    return t_raw


def _tmem_run(pages: int, restore_role: str, recycle: int = 0) -> dict:
    t_tmem, save, restore = _pair("save", restore_role, pages, recycle)
    if restore["pages"] != pages or save["pages"] != pages:
        raise SystemExit(f"moved {save['pages']}/{restore['pages']} of {pages} pages")
    return {"s": t_tmem, "bytes": save["bytes"], "save": save, "restore": restore}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024, help="persistent tmem to move (MiB)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--role", help=argparse.SUPPRESS)
    ap.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--arg", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.role and os.environ.get("TMEM_BENCH_PROFILE") == args.role:
        import cProfile
        _profile_threads(args.role)
        cProfile.runctx("run(args)", globals(), {"run": _run_role, "args": args},
                        f"/tmp/bench-{args.role}.prof")
        return 0
    if args.role:
        _run_role(args)
        return 0
    pages = args.mib * MiB // 4096
    runs = []
    for i in range(args.runs):
        cold = _tmem_run(pages, "restore")
        warm = _tmem_run(pages, "restore-prealloc")
        nbytes = cold["bytes"]
        recycle = nbytes * 5 // 4
        recycled = _tmem_run(pages, "restore", recycle)
        # the baselines start as the tmem pairs start: right after the same
        # setup took the same memory (module doc), and once with nothing held
        t_raw = _raw_pair(nbytes, [("hold", pages)])
        t_raw_prealloc = _raw_pair(nbytes, [("hold", pages), ("hold-heap", pages)])
        t_raw_unheld = _raw_pair(nbytes, [])
        commit = _alone("commit", nbytes, after_hold=pages)
        commit_recycled = _alone("commit", nbytes, recycle=recycle)
        t_commit = commit["t1"] - commit["t0"]
        t_commit_recycled = commit_recycled["t1"] - commit_recycled["t0"]
        t_commit_beside = _commit_beside_pipe(nbytes, pages)
        save, restore = cold["save"], cold["restore"]
        run = {
            "bytes": nbytes, "raw_s": t_raw, "tmem_s": cold["s"], "tmem_prealloc_s": warm["s"],
            "raw_mib_s": nbytes / MiB / t_raw,
            "tmem_mib_s": nbytes / MiB / cold["s"],
            "tmem_prealloc_mib_s": nbytes / MiB / warm["s"],
            "ratio": t_raw / cold["s"],
            "ratio_prealloc": t_raw_prealloc / warm["s"],
            "raw_prealloc_s": t_raw_prealloc,
            "raw_unheld_s": t_raw_unheld,
            "ratio_unheld": t_raw_unheld / cold["s"],
            "ratio_prealloc_unheld": t_raw_unheld / warm["s"],
            "save_cpu_s": save["cpu_s"], "restore_cpu_s": restore["cpu_s"],
            "restore_prealloc_cpu_s": warm["restore"]["cpu_s"],
            "save_held_mib": save["held_kib"] / 1024,
            "save_peak_over_held_mib": (save["peak_kib"] - save["rss_before_kib"]) / 1024,
            "restore_held_mib": restore["held_kib"] / 1024,
            "restore_peak_over_held_mib": (restore["peak_kib"] - restore["rss_end_kib"]) / 1024,
            "commit_s": t_commit,
            "ratio_commit_floor": t_raw / max(t_raw, t_commit),
            "commit_beside_pipe_s": t_commit_beside,
            "ratio_commit_floor_beside_pipe": t_raw / max(t_raw, t_commit_beside),
            "tmem_recycled_s": recycled["s"],
            "ratio_recycled": t_raw / recycled["s"],
            "commit_recycled_s": t_commit_recycled,
            "ratio_commit_floor_recycled": t_raw / max(t_raw, t_commit_recycled),
            "page_data_mib": pages * 4096 / MiB,
            "memory_limit_mib": pages * 4096 / MiB * 1.02 + 32,
            "save_total_mib": save["peak_kib"] / 1024,
            "restore_total_mib": max(restore["peak_kib"], restore["rss_end_kib"]) / 1024,
            "restore_prealloc_total_mib": max(warm["restore"]["peak_kib"],
                                              warm["restore"]["rss_end_kib"]) / 1024,
        }
        runs.append(run)
        if not args.json:
            print(f"run {i + 1}: {nbytes / MiB:.0f} MiB  raw pipe {run['raw_mib_s']:.0f} MiB/s  "
                  f"tmem {run['tmem_mib_s']:.0f} MiB/s (ratio {run['ratio']:.2f}), with a "
                  f"preallocated tmem heap {run['tmem_prealloc_mib_s']:.0f} MiB/s (ratio "
                  f"{run['ratio_prealloc']:.2f}), against the raw pipe with nothing held "
                  f"{run['ratio_unheld']:.2f} and {run['ratio_prealloc_unheld']:.2f}; cold on "
                  f"recycled memory ratio {run['ratio_recycled']:.2f}; commit alone "
                  f"{run['commit_s']:.2f} s "
                  f"({run['commit_recycled_s']:.2f} s recycled); peak over held: save "
                  f"+{run['save_peak_over_held_mib']:.1f} of {run['save_held_mib']:.0f} MiB, "
                  f"restore +{run['restore_peak_over_held_mib']:.1f} of "
                  f"{run['restore_held_mib']:.0f} MiB", flush=True)
    summary = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    summary["runs"] = len(runs)
    if args.json:
        print(json.dumps({"median": summary, "runs": runs}, indent=1))
    else:
        print(f"median of {len(runs)}: raw pipe {summary['raw_mib_s']:.0f} MiB/s; tmem "
              f"{summary['tmem_mib_s']:.0f} MiB/s = ratio {summary['ratio']:.2f}; with a "
              f"preallocated tmem heap {summary['tmem_prealloc_mib_s']:.0f} MiB/s = ratio "
              f"{summary['ratio_prealloc']:.2f}; against the raw pipe with nothing held "
              f"{summary['ratio_unheld']:.2f} and {summary['ratio_prealloc_unheld']:.2f}; "
              f"cold on recycled memory ratio {summary['ratio_recycled']:.2f}; commit alone "
              f"{summary['commit_s']:.2f} s "
              f"({summary['commit_recycled_s']:.2f} s recycled); "
              f"memory, whole process at its peak: save {summary['save_total_mib']:.0f} MiB, "
              f"restore {summary['restore_total_mib']:.0f} MiB (limit "
              f"{summary['memory_limit_mib']:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
