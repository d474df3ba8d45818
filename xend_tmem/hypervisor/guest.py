"""The guest process of a simulated domain, and the hypervisor's handle on it.

A domain with an active workload on a ``SimHypervisor(guest_processes=True)``
runs as ``python -m xend_tmem.hypervisor.guest``: a process of its own, so its
RAM writes never wait for the interpreter lock of the hypervisor or of the
toolstack that copies its pages (as a real guest's vcpus never wait for dom0).

What the two sides share (all handed over at spawn with ``pass_fds``):

* the domain's RAM memfd, mapped ``MAP_SHARED`` by both;
* the *log* memfd (:class:`GuestLog`): a 4 KiB control page followed by two
  dirty bitmaps of one byte per pfn;
* one end of a ``SOCK_SEQPACKET`` socketpair: the guest sends one
  :data:`MSG` per tick asking the hypervisor to play its tmem ops (no page
  data crosses it); the hypervisor sends one-byte nudges so the guest looks
  at its control page at once, and closing its end (or dying) is EOF, on
  which the guest exits.

Control page (u64 slots, each written by one side only): the hypervisor
writes ``CMD`` (run / stop / exit) and then bumps ``CMD_SEQ``; the guest, at a
tick boundary (never inside a batch of writes), reads ``CMD_SEQ`` then
``CMD`` and stores ``ACK_SEQ``. Pause and suspend are barriers: they return
only once ``ACK_SEQ`` reached their sequence number, after which the guest
writes nothing until a later run command. The dirty-log epoch works the same
way (``EPOCH`` / ``EPOCH_ACK``); see :meth:`GuestProcess.flip_epoch` for why
no write is lost. Aligned 8-byte loads and stores through a ``memoryview``
cast to ``"Q"`` are single instructions on x86-64, whose total store order
makes "stores become visible in program order" the only ordering the
protocol needs.

Heartbeat (issue 7): while it runs, the guest writes its own clock into its
RAM at least every millisecond: :data:`HEARTBEAT` at :data:`HEARTBEAT_OFFSET`
of the last page (:func:`heartbeat_pfn`), clear of the pfn and name words at
+0 and the workload's stamp at +16. RAM moves with the domain, so after a
migration the destination reads the last beat the source wrote and waits for
the first beat its own guest writes; both are ``CLOCK_MONOTONIC`` of one host,
and their difference is the stop the guest itself noticed
(:func:`xend_tmem.heartbeat.guest_gap_ms`). A restarted guest process
continues the count it finds in RAM. Only guest processes beat (the
in-process :meth:`~xend_tmem.hypervisor.sim.SimHypervisor.tick` does not).

This module is imported by the guest process: it imports nothing heavy at
module level (``subprocess`` only inside :meth:`GuestProcess.spawn`) and
nothing else from ``xend_tmem``.
"""
from __future__ import annotations

import mmap
import os
import random
import signal
import socket
import struct
import sys
import time
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

from .. import fdwait
from ..xen import PAGE_SIZE

if TYPE_CHECKING:
    import subprocess

CONTROL_SIZE = 4096
MAGIC = 0x3174736575674E58            # "XNguest1"

# control page: u64 slots
SLOT_MAGIC = 0
SLOT_CMD = 1            # hypervisor: CMD_RUN / CMD_STOP / CMD_EXIT
SLOT_CMD_SEQ = 2        # hypervisor: bumped after every CMD store
SLOT_ACK_SEQ = 3        # guest: last CMD_SEQ it obeys
SLOT_EPOCH = 4          # hypervisor: which bitmap the guest marks (EPOCH & 1)
SLOT_EPOCH_ACK = 5      # guest: the EPOCH its writes mark from now on
SLOT_RAM_WRITES = 6     # guest: pages written so far (also the stamp's generation)
SLOT_HEARTBEAT = 7      # guest: CLOCK_MONOTONIC ns of its last loop
SLOT_PID = 8            # guest: its pid, once running
SLOT_COLLECTED = 9      # hypervisor: the last EPOCH whose previous bitmap it collected
RATES_OFFSET = 128      # 4 doubles: ram dirty, tmem puts, gets, flushes per second
CMD_RUN, CMD_STOP, CMD_EXIT = 0, 1, 2

TICK_S = 0.01                           # the guest's time slice
MAX_TICK_OPS = 10_000                   # per kind and tick, as SimHypervisor.tick
MSG = struct.Struct("<IIII")            # tmem puts, gets, flushes; elapsed microseconds
STAMP = struct.Struct("<QQ")            # at +16 in a page: generation, random word
ACK_TIMEOUT_S = 10.0                    # a guest that cannot stop in this time is hung
_U32 = 0xFFFFFFFF

# the heartbeat record in guest RAM: magic, seq (odd while a beat is being
# written), CLOCK_MONOTONIC ns of the last beat, beats so far
HEARTBEAT = struct.Struct("<QQQQ")
HEARTBEAT_MAGIC = 0x3174616562474E58    # "XNGbeat1"
HEARTBEAT_OFFSET = 64                   # in the last page of RAM
HEARTBEAT_PERIOD_S = 0.0008             # nominal; at most ~1 ms between beats while running
_HB_SPINS = 200                         # a reader racing a writer: tight retries first,
_HB_WAIT_S = 0.02                       # then yielding ones, for at most this long


def heartbeat_pfn(p2m: int) -> int:
    """The page holding the heartbeat: the last page of RAM."""
    return p2m - 1


def _heartbeat_words(ram: mmap.mmap, p2m: int) -> Tuple[memoryview, memoryview]:
    off = heartbeat_pfn(p2m) * PAGE_SIZE + HEARTBEAT_OFFSET
    raw = memoryview(ram)[off:off + HEARTBEAT.size]
    return raw, raw.cast("Q")


def read_heartbeat(ram: mmap.mmap, p2m: int) -> Tuple[int, int]:
    """``(last beat ns, beats)`` from a domain's RAM; ``(0, 0)`` before any beat.

    A seqlock read (8-byte loads, see the module doc): a beat being written
    is waited out, so ns and count always belong to the same beat.
    """
    if p2m <= 0:
        return 0, 0
    raw, w = _heartbeat_words(ram, p2m)
    try:
        tries, deadline = 0, 0.0
        while True:
            s1 = w[1]
            if not s1 & 1:
                magic, ns, count = w[0], w[2], w[3]
                if w[1] == s1:
                    return (ns, count) if magic == HEARTBEAT_MAGIC else (0, 0)
            # a writer mid-beat: on a busy host it can be descheduled between
            # its two seq stores for longer than any number of tight retries
            # takes, so after those the reader yields, up to a time bound
            tries += 1
            if tries < _HB_SPINS:
                continue
            now = time.monotonic()
            if not deadline:
                deadline = now + _HB_WAIT_S
            elif now >= deadline:
                return 0, 0    # a writer stuck mid-beat (killed): no beat to report
            time.sleep(0)
    finally:
        w.release()
        raw.release()


def bitmap_len(p2m: int) -> int:
    """Bytes of one dirty bitmap, rounded to whole pages."""
    return -(-p2m // PAGE_SIZE) * PAGE_SIZE


def log_size(p2m: int) -> int:
    return CONTROL_SIZE + 2 * bitmap_len(p2m)


class GuestLog:
    """The log memfd of one domain: control page + two dirty bitmaps.

    Exists for every guest domain (with or without a guest process) so the
    hypervisor's log-dirty code has one path; pages are committed lazily.
    """

    def __init__(self, fd: int, p2m: int) -> None:
        self.fd = fd
        self.p2m = p2m
        self.map = mmap.mmap(fd, log_size(p2m))
        self._mv = memoryview(self.map)
        self.ctl = self._mv[:CONTROL_SIZE].cast("Q")
        self.rates = self._mv[RATES_OFFSET:RATES_OFFSET + 32].cast("d")
        n = bitmap_len(p2m)
        self.bitmaps = (self._mv[CONTROL_SIZE:CONTROL_SIZE + p2m],
                        self._mv[CONTROL_SIZE + n:CONTROL_SIZE + n + p2m])

    @classmethod
    def create(cls, domid: int, p2m: int) -> "GuestLog":
        fd = os.memfd_create(f"xen-dom{domid}-log", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, log_size(p2m))
            log = cls(fd, p2m)
        except BaseException:
            os.close(fd)
            raise
        log.ctl[SLOT_MAGIC] = MAGIC
        log.ctl[SLOT_CMD] = CMD_STOP
        return log

    def set_rates(self, rates: Sequence[float]) -> None:
        for i, r in enumerate(rates):
            self.rates[i] = float(r)

    def current_bitmap(self) -> memoryview:
        return self.bitmaps[self.ctl[SLOT_EPOCH] & 1]

    def begin_flip(self) -> int:
        """Advance ``EPOCH``, unless the last flip's bitmap was never collected
        (its wait timed out): then that flip is completed instead. Returns the
        epoch to wait for."""
        ctl = self.ctl
        new = ctl[SLOT_EPOCH]
        if ctl[SLOT_COLLECTED] >= new:
            new += 1
            ctl[SLOT_EPOCH] = new
        return new

    def end_flip(self, new: int) -> memoryview:
        """The bitmap the flip to ``new`` retired (acknowledged), now the caller's."""
        self.ctl[SLOT_COLLECTED] = new
        return self.bitmaps[(new - 1) & 1]

    def flip_unattended(self) -> memoryview:
        """The flip when no guest process writes (none, or it died): the
        caller is the only writer and acknowledges it itself."""
        new = self.begin_flip()
        self.ctl[SLOT_EPOCH_ACK] = new
        return self.end_flip(new)

    @staticmethod
    def collect_and_clear(bitmap: memoryview) -> List[int]:
        """Sorted pfns marked in ``bitmap``, which is left all zero. Call only
        on a bitmap no writer marks (the previous epoch, or with no guest)."""
        out: List[int] = []
        size = len(bitmap)
        zero = bytes(PAGE_SIZE)
        for base in range(0, size, PAGE_SIZE):
            chunk = bytes(bitmap[base:base + PAGE_SIZE])
            if chunk == zero[:len(chunk)]:
                continue
            i = chunk.find(1)
            while i >= 0:
                out.append(base + i)
                i = chunk.find(1, i + 1)
            bitmap[base:base + len(chunk)] = zero[:len(chunk)]
        return out

    def close(self) -> None:
        for v in (*self.bitmaps, self.rates, self.ctl, self._mv):
            v.release()
        self.map.close()
        os.close(self.fd)


class GuestError(Exception):
    """A guest that did not acknowledge a barrier in time (the caller names the op)."""


class GuestProcess:
    """The hypervisor's handle on one guest process (spawn, barriers, stop)."""

    def __init__(self, proc: "subprocess.Popen[bytes]", sock: socket.socket,
                 log: GuestLog) -> None:
        self.proc = proc
        self.sock = sock
        self.log = log
        self.eof = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    def spawn(cls, ram_fd: int, log: GuestLog, seed: int, running: bool) -> "GuestProcess":
        """Start the guest; it obeys the control page's command from its first loop."""
        import subprocess
        ctl = log.ctl
        ctl[SLOT_CMD] = CMD_RUN if running else CMD_STOP
        ctl[SLOT_CMD_SEQ] += 1
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            ours.setblocking(False)
            argv = [sys.executable, "-m", "xend_tmem.hypervisor.guest", str(ram_fd),
                    str(log.fd), str(theirs.fileno()), str(log.p2m), str(seed)]
            # cwd "/": the guest must not keep a directory busy nor import from it
            proc = subprocess.Popen(argv, pass_fds=(ram_fd, log.fd, theirs.fileno()),
                                    stdin=subprocess.DEVNULL, close_fds=True, cwd="/")
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return cls(proc, ours, log)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def nudge(self) -> None:
        """Make the guest look at its control page now rather than next tick."""
        try:
            self.sock.send(b"!")
        except (BlockingIOError, OSError):
            pass        # a nudge is pending already, or the guest is gone

    def _wait(self, slot: int, value: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.00005
        ctl = self.log.ctl
        while ctl[slot] < value:
            if not self.alive():
                return          # a dead guest writes nothing: the barrier holds
            if time.monotonic() > deadline:
                raise GuestError(f"guest process {self.pid} did not acknowledge within "
                                 f"{timeout:g} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.001)

    def command(self, cmd: int, wait: bool, timeout: float = ACK_TIMEOUT_S) -> None:
        """Store ``cmd`` and, with ``wait``, return once the guest obeys it."""
        ctl = self.log.ctl
        ctl[SLOT_CMD] = cmd
        seq = ctl[SLOT_CMD_SEQ] + 1
        ctl[SLOT_CMD_SEQ] = seq          # after CMD: a guest that sees seq sees cmd
        self.nudge()
        if wait:
            self._wait(SLOT_ACK_SEQ, seq, timeout)

    def flip_epoch(self, timeout: float = ACK_TIMEOUT_S) -> memoryview:
        """Switch the guest to the other bitmap; returns the old one, complete.

        Why no write is lost: the guest reads ``EPOCH`` only between batches
        of writes, stores ``EPOCH_ACK`` right after it, and in every later
        batch writes each page *before* marking it in the bitmap of the epoch
        it last acknowledged. Once ``EPOCH_ACK`` shows the new
        epoch, the batch that marked the old bitmap is over, and since stores
        become visible in program order (x86-64 TSO) every mark of it is
        visible before the ack is: the old bitmap holds every page written
        under the old epoch, and no one marks it until the next flip, which
        comes after the caller cleared it. A page written after the flip is
        marked in the new bitmap, so it is in the next call's set. A page
        whose mark is in the old bitmap was written before its mark, so the
        caller's later read of RAM sees that write (or a newer one).

        A flip that timed out stays pending (its bitmap uncollected) and the
        next call completes it instead of flipping again, so the guest's epoch
        is always ``EPOCH`` or ``EPOCH - 1`` and the bitmap returned is never
        the one it marks.
        """
        new = self.log.begin_flip()
        self.nudge()
        self._wait(SLOT_EPOCH_ACK, new, timeout)
        return self.log.end_flip(new)

    def receive(self, limit: int = 256) -> List[Tuple[int, int, int, int]]:
        """Pending tmem requests (puts, gets, flushes, elapsed µs); sets ``eof``."""
        out: List[Tuple[int, int, int, int]] = []
        if self.eof:
            return out
        for _ in range(limit):
            try:
                data = self.sock.recv(64)
            except BlockingIOError:
                break
            except OSError:
                self.eof = True
                break
            if not data:
                self.eof = True
                break
            if len(data) == MSG.size:
                out.append(MSG.unpack(data))
        return out

    def stop(self, timeout: float = 5.0) -> None:
        """Make the guest exit and reap it by pid (killed if it does not exit)."""
        import subprocess
        if self.alive():
            try:
                self.command(CMD_EXIT, wait=False)
            except ValueError:
                pass
        try:
            self.sock.close()            # EOF: the guest exits even if it missed CMD_EXIT
        finally:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------------------
# the guest process
# ---------------------------------------------------------------------------

def run(ram: mmap.mmap, log: GuestLog, sock: socket.socket, seed: int, ppid: int) -> int:
    """The guest's loop; returns when told to exit or its hypervisor is gone.

    Every wake-up (its tick, a heartbeat, or a nudge) first plays the writes
    owed for the time since the last batch -- a guest dirtying memory
    continuously has done them by now -- and beats, and only then
    acknowledges commands and epochs, so a barrier or a flip sees every write
    made before it (the last beat included), as with a real guest.
    """
    ctl, rates, bitmaps, p2m = log.ctl, log.rates, log.bitmaps, log.p2m
    rng = random.Random(seed)
    randrange, getrandbits, pack_into = rng.randrange, rng.getrandbits, STAMP.pack_into
    ctl[SLOT_PID] = os.getpid()
    acked = -1
    epoch = -1
    bitmap = bitmaps[0]
    stopped = True
    acc = [0.0, 0.0, 0.0, 0.0]
    pending = [0, 0, 0, 0]
    last = time.monotonic()
    hb_pfn = heartbeat_pfn(p2m)
    hb_raw, hb = _heartbeat_words(ram, p2m)
    beats = 0                          # read from RAM when the guest first runs
    next_beat = 0.0
    timeout = 0.0                      # look at the first command at once
    try:
        while True:
            readable, _ = fdwait.wait(sock, read=True, timeout=timeout)
            if readable:
                while True:
                    try:
                        if not sock.recv(64):
                            return 0             # the hypervisor closed its end, or died
                    except BlockingIOError:
                        break
                    except OSError:
                        return 0
            if os.getppid() != ppid:
                return 0                         # orphaned: the hypervisor died
            resumed = False
            if not stopped:
                # the batch: marks go to the bitmap of the epoch acknowledged
                # *before* it (see GuestProcess.flip_epoch)
                now = time.monotonic()
                elapsed = now - last
                last = now
                counts = []
                for i in range(4):
                    acc[i] += rates[i] * elapsed
                    n = int(acc[i])
                    acc[i] -= n
                    counts.append(min(n, MAX_TICK_OPS))
                gen = ctl[SLOT_RAM_WRITES]
                for _ in range(counts[0]):
                    pfn = randrange(p2m)
                    gen += 1
                    pack_into(ram, pfn * PAGE_SIZE + 16, gen, getrandbits(64))
                    bitmap[pfn] = 1              # after the page
                ctl[SLOT_RAM_WRITES] = gen
                pending[0] += counts[1]
                pending[1] += counts[2]
                pending[2] += counts[3]
                pending[3] += int(elapsed * 1e6)
                # one message per tick (the heartbeat wakes us far more often),
                # and at once when a command waits: a barrier plays every op
                if pending[3] >= TICK_S * 1e6 or (any(pending[:3])
                                                   and ctl[SLOT_CMD_SEQ] != acked):
                    try:
                        sock.send(MSG.pack(*(min(v, _U32) for v in pending)))
                        pending = [0, 0, 0, 0]
                    except BlockingIOError:
                        pass                     # the hypervisor is behind: send it later
                beats += 1
                next_beat = _next_beat(next_beat, _beat(hb, beats))
                bitmap[hb_pfn] = 1               # after the page, as every write
            seq = ctl[SLOT_CMD_SEQ]              # seq first: the host stores it after CMD
            cmd = ctl[SLOT_CMD]
            if cmd == CMD_EXIT:
                return 0
            if seq != acked:
                if stopped and cmd == CMD_RUN:
                    last = time.monotonic()      # no catching up for time spent stopped
                    resumed = True
                stopped = cmd != CMD_RUN
                ctl[SLOT_ACK_SEQ] = seq
                acked = seq
            e = ctl[SLOT_EPOCH]
            if e != epoch:
                epoch = e
                bitmap = bitmaps[e & 1]
                ctl[SLOT_EPOCH_ACK] = e
            if resumed:
                # the first beat as soon as the guest runs again: the gap in the
                # beats is the stop the guest noticed. RAM is the truth while the
                # guest is stopped (a restore may have filled it since this
                # process started): count on from the beat it holds.
                if hb[0] == HEARTBEAT_MAGIC:
                    beats = hb[3]
                hb[1] &= ~1              # a beat a killed predecessor left half-written
                beats += 1
                next_beat = _beat(hb, beats) + HEARTBEAT_PERIOD_S
                bitmap[hb_pfn] = 1
            ctl[SLOT_HEARTBEAT] = time.monotonic_ns()
            timeout = 0.1 if stopped else max(0.0, min(TICK_S, next_beat - time.monotonic()))
    finally:
        hb.release()
        hb_raw.release()


def _next_beat(planned: float, beat_at: float) -> float:
    """When to beat next: on the period's grid when this beat came late by
    less than a period (a wake-up's latency, 0.1-0.4 ms in a VM, then does not
    push every later beat back: measured median steps 1.03-1.2 ms against the
    nominal 0.8 when each beat counted from the last), else a period after
    this one (it came early, woken for something else, or a period late)."""
    base = planned if beat_at - HEARTBEAT_PERIOD_S < planned <= beat_at else beat_at
    return base + HEARTBEAT_PERIOD_S


def _beat(hb: memoryview, beats: int) -> float:
    """Write one heartbeat (seqlock: seq odd while writing); returns its time in s."""
    now_ns = time.monotonic_ns()
    seq = hb[1] + 1
    hb[1] = seq
    hb[0] = HEARTBEAT_MAGIC
    hb[2] = now_ns
    hb[3] = beats
    hb[1] = seq + 1
    return now_ns / 1e9


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 5:
        print("Error: usage: python -m xend_tmem.hypervisor.guest RAM_FD LOG_FD SOCK_FD "
              "P2M SEED (started by the simulated hypervisor)", file=sys.stderr)
        return 2
    ram_fd, log_fd, sock_fd, p2m, seed = (int(a) for a in args)
    ppid = os.getppid()
    # the hypervisor decides when a guest stops: a ^C meant for it must not
    # kill its guests behind its back
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ram = mmap.mmap(ram_fd, p2m * PAGE_SIZE)
    log = GuestLog(log_fd, p2m)
    sock = socket.socket(fileno=sock_fd)
    sock.setblocking(False)
    try:
        return run(ram, log, sock, seed, ppid)
    finally:
        sock.close()


if __name__ == "__main__":
    sys.exit(main())
