"""Bounded, offset-tracking binary I/O over files, pipes and sockets.

Readers of untrusted streams must know the offset of every field (for error
messages) and must never allocate more than the data actually seen, so the
reader grows its buffer only as bytes arrive, in steps of at most ``CHUNK``.
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import fcntl
import os
import select
import stat
import struct
import termios
import time
from array import array
from typing import Any, Callable, Deque, Iterator, List, Optional, Protocol, Tuple, Union

from .errors import StreamError

CHUNK = 1 << 20          # largest single read from the underlying file
WRITEBACK_BYTES = 32 << 20   # a regular file's dirty pages are sent to the disk this often
WRITEBACK_RANGES = 2         # ranges on their way to the disk before the oldest is waited for
PIPE_BOUNCE = 128 << 10      # a large pipe write not spliced is copied through this much
_SETTLE_POLL_S = 0.0002      # how often StreamWriter.settle looks at the pipe
_SYNC_FILE_RANGE_WAIT_BEFORE = 1
_SYNC_FILE_RANGE_WRITE = 2
_SYNC_FILE_RANGE_WAIT_AFTER = 4
_SYNC_FILE_RANGE_WAIT = _SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WRITE | \
    _SYNC_FILE_RANGE_WAIT_AFTER


def _load_sync_file_range() -> Optional[Callable[..., int]]:
    """Linux's sync_file_range(2) (not in :mod:`os`), or None where libc lacks it."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()
Buffer = Union[bytes, bytearray, memoryview]


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _PyBuffer(ctypes.Structure):
    """CPython's ``Py_buffer``: the address of a read-only buffer (a lent view
    of a tmem store), which :meth:`ctypes.c_char.from_buffer` refuses."""
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p),
                ("len", ctypes.c_ssize_t), ("itemsize", ctypes.c_ssize_t),
                ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p),
                ("strides", ctypes.c_void_p), ("suboffsets", ctypes.c_void_p),
                ("internal", ctypes.c_void_p)]


def _load_vmsplice() -> Optional[Callable[..., int]]:
    """Linux's vmsplice(2) (not in :mod:`os`), or None where libc lacks it."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).vmsplice
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_size_t, ctypes.c_uint]
    fn.restype = ctypes.c_ssize_t
    return fn


_vmsplice = _load_vmsplice()


def _splice_all(fd: int, data: Buffer) -> None:
    """Hand ``data``'s pages to the pipe ``fd`` by reference (vmsplice(2), no
    copy): the reader copies them out of this process's memory, which must
    not change until it has (:meth:`StreamWriter.settle`)."""
    assert _vmsplice is not None
    view = _PyBuffer()
    obj = ctypes.py_object(data)
    if ctypes.pythonapi.PyObject_GetBuffer(obj, ctypes.byref(view), 0) != 0:
        raise BufferError("no contiguous buffer to splice")
    try:
        iov = _IoVec()
        done, total = 0, view.len
        while done < total:
            iov.base, iov.len = view.buf + done, total - done
            n = _vmsplice(fd, ctypes.byref(iov), 1, 0)
            if n < 0:
                err = ctypes.get_errno()
                if err == errno.EINTR:
                    continue
                raise OSError(err, os.strerror(err))
            done += n
    finally:
        ctypes.pythonapi.PyBuffer_Release(ctypes.byref(view))


def _pipe_unread(fd: int) -> int:
    """Bytes written to the pipe ``fd`` and not read yet; 0 once no reader is
    left (nothing will read them)."""
    p = select.poll()
    p.register(fd, select.POLLOUT)
    if any(ev & select.POLLERR for _, ev in p.poll(0)):
        return 0
    n = array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, n, True)
    return n[0]


class Source(Protocol):
    """What a :class:`StreamReader` reads: a file, pipe or socket file object, or a
    wrapper of one (its ``readinto`` is used when it has one)."""

    def read(self, n: int = -1, /) -> bytes: ...


class Sink(Protocol):
    """What a :class:`StreamWriter` writes to: ``write`` may take less than it was
    given (a non-blocking raw file returns None when it took nothing)."""

    def write(self, data: memoryview, /) -> Optional[int]: ...
_U32 = struct.Struct("<I")
_S32 = struct.Struct("<i")
_U64 = struct.Struct("<Q")


def _fd_of(f: object, kind: Callable[[int], bool]) -> int:
    """The descriptor behind ``f`` if its file is of ``kind`` (``stat.S_ISREG``,
    ``stat.S_ISFIFO``), else -1."""
    fileno: Optional[Callable[[], int]] = getattr(f, "fileno", None)
    if fileno is None:
        return -1
    try:
        fd = fileno()
        return fd if kind(os.fstat(fd).st_mode) else -1
    except (AttributeError, OSError, ValueError):   # BytesIO, closed, no fileno
        return -1


def widen_pipe(f: object) -> bool:
    """If ``f`` is a pipe or FIFO, give it room for one ``CHUNK`` and say so.

    Linux's default is 64 KiB, and a FIFO's two ends then take turns every 16
    pages (measured in this VM, 1 GiB through ``cat`` took 1.5 s at 64 KiB and
    0.5 s at 1 MiB). Either end may ask; where the kernel refuses (an
    unprivileged process over ``/proc/sys/fs/pipe-max-size``, a pipe of other
    users' at its limit) the pipe stays as it was."""
    fd = _fd_of(f, stat.S_ISFIFO)
    if fd < 0:
        return False
    try:
        if fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) < CHUNK:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, CHUNK)
    except (OSError, AttributeError):
        pass
    return True


def _drop_cached(fd: int, at: int, size: int) -> None:
    """Drop a file range's clean pages from the page cache (advice: a range
    still dirty or under writeback stays)."""
    try:
        os.posix_fadvise(fd, at, size, os.POSIX_FADV_DONTNEED)
    except (OSError, AttributeError):
        pass


class DropBehind:
    """A read-through regular file that drops what was read from the page cache,
    ``WRITEBACK_BYTES`` at a time and one such range behind the position.

    A restore reads a multi-gigabyte image once, front to back. Read from the
    disk, it would otherwise take page cache the size of the image, memory
    that must be free at once (in this VM memory that has been free a moment
    costs a host fault per page: an uncached 1.5 GiB image read in 0.65-1.94 s,
    0.62-0.76 s dropping behind, benchmarks/README.md PERF6h); what it pushes
    out of the cache is other domains' and services' data. An image still
    cached (just saved) reads as fast either way. Data is never at stake: only
    clean pages are dropped, and a range read again comes from the disk."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self._fd: int = f.fileno()
        self._pos = os.lseek(self._fd, 0, os.SEEK_CUR)
        self._dropped = self._pos

    def _advance(self, n: int) -> None:
        self._pos += n
        upto = self._pos - WRITEBACK_BYTES
        if upto - self._dropped >= WRITEBACK_BYTES:
            _drop_cached(self._fd, self._dropped, upto - self._dropped)
            self._dropped = upto

    def readinto(self, buf: Buffer) -> int:
        n: int = self._f.readinto(buf) or 0
        self._advance(n)
        return n

    def read(self, n: int = -1, /) -> bytes:
        data: bytes = self._f.read(n)
        self._advance(len(data))
        return data

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        self._f.close()


class StreamReader:
    """Buffered reader with a running offset.

    ``buf``/``pos``/``end`` are public so codecs can scan records in place
    (zero-copy) after :meth:`fill`; they must call :meth:`skip` for what they used.
    """

    def __init__(self, f: Source, offset: int = 0) -> None:
        self._f = f
        self._readinto = getattr(f, "readinto", None)
        self.buf = bytearray(CHUNK)
        self.pos = 0
        self.end = 0
        self._base = offset          # stream offset of buf[0]
        self._eof = False
        self._spare: List[bytearray] = []   # buffers given back after a :meth:`lend`
        widen_pipe(f)

    # -- position ---------------------------------------------------------
    @property
    def offset(self) -> int:
        """Stream offset of the next unread byte."""
        return self._base + self.pos

    @property
    def available(self) -> int:
        return self.end - self.pos

    # -- buffer management -------------------------------------------------
    def fill(self, n: int) -> int:
        """Make at least ``n`` bytes available unless the stream ends first.

        Returns the number of bytes available (may be < n only at EOF). The
        buffer grows by at most CHUNK per read, so a huge ``n`` costs memory
        only as fast as the peer actually sends data.
        """
        if self.end - self.pos >= n or self._eof:
            return self.end - self.pos
        if self.pos:
            # compact: move unread bytes to the front
            rest = self.end - self.pos
            if rest:
                self.buf[:rest] = self.buf[self.pos:self.end]
            self._base += self.pos
            self.pos, self.end = 0, rest
        while self.end < n and not self._eof:
            # read into the room the buffer has (up to CHUNK); grow it only
            # for bytes asked for that do not fit, by at most CHUNK a read
            need = min(n - self.end, CHUNK)
            if len(self.buf) - self.end < need:
                self.buf.extend(bytes(self.end + need - len(self.buf)))
            want = min(len(self.buf) - self.end, CHUNK)
            got = self._read_into(self.end, want)
            if not got:
                self._eof = True
                break
            self.end += got
        return self.end - self.pos

    def _read_into(self, at: int, n: int) -> int:
        mv = memoryview(self.buf)[at:at + n]
        try:
            if self._readinto is not None:
                got = self._readinto(mv)
                return got or 0
            data = self._f.read(n)
            if not data:
                return 0
            mv[:len(data)] = data
            return len(data)
        finally:
            mv.release()

    def lend(self, n: int) -> bytearray:
        """The buffer holding the next ``n`` available bytes (at ``pos``), for
        the caller to keep using after the reader moves on (another thread
        storing them while the next batch is read): the reader goes on in a
        spare buffer, with the bytes after those ``n`` copied to the same
        offsets, so ``pos``/``end`` and the offset are unchanged (the caller
        still calls :meth:`skip` for them). Hand it back with :meth:`give_back`."""
        if n > self.end - self.pos:
            raise ValueError(f"{n} bytes lent, {self.end - self.pos} available")
        old = self.buf
        new = self._spare.pop() if self._spare else bytearray(len(old))
        if len(new) < len(old):
            new.extend(bytes(len(old) - len(new)))
        keep = self.pos + n
        if self.end > keep:
            new[keep:self.end] = old[keep:self.end]
        self.buf = new
        return old

    def give_back(self, buf: bytearray) -> None:
        """Take back a buffer :meth:`lend` handed out (no view of it may remain)."""
        if len(self._spare) < 2:
            self._spare.append(buf)

    def read_direct(self, out: memoryview) -> int:
        """Consume the next ``len(out)`` bytes into ``out`` (e.g. a store's slots):
        what is buffered first, the rest read from the file straight into
        ``out``, with no copy through the buffer. Returns the bytes consumed:
        fewer only at the end of the stream. :meth:`unread` gives some back."""
        n = out.nbytes
        have = min(self.end - self.pos, n)
        if have:
            out[:have] = self.buf[self.pos:self.pos + have]
            self.pos += have
        got = have
        if got < n and not self._eof:
            self._base += self.pos       # the buffer is drained: start it afresh
            self.pos = self.end = 0
        while got < n and not self._eof:
            with out[got:] as rest:
                k = self._read_direct_into(rest)
            if not k:
                self._eof = True
                break
            got += k
            self._base += k
        return got

    def _read_direct_into(self, mv: memoryview) -> int:
        """Straight into ``mv``, from a pipe too: a tmem save into a pipe
        splices its pages (:meth:`StreamWriter.stable`), so this read is the
        transfer's one copy, out of the sender's own pages. (Through a buffer of
        the reader's own, as PERF9k had it against a copying writer, it took
        1.25-1.98 s for a cold receiver of 1 GiB where straight took
        0.76-1.18 s, alternated, benchmarks/README.md PERF9l; against a copying
        writer a straight read costs that writer some spinning on the pipe's
        lock: 0.58-0.88 s where the buffer took 0.45-0.55 s.)"""
        if self._readinto is not None:
            return self._readinto(mv) or 0
        data = self._f.read(min(mv.nbytes, CHUNK))
        mv[:len(data)] = data
        return len(data)

    def unread(self, data: Buffer) -> None:
        """Put ``data`` (bytes consumed last, e.g. by :meth:`read_direct`) back in
        front of the unread ones: the offset moves back by its length."""
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        if not n:
            return
        if n <= self.pos:
            self.buf[self.pos - n:self.pos] = data
            self.pos -= n
            return
        rest = self.end - self.pos
        merged = bytearray(data)
        merged += self.buf[self.pos:self.end]
        start = self.offset - n
        if len(self.buf) < n + rest:
            self.buf.extend(bytes(n + rest - len(self.buf)))
        self.buf[:n + rest] = merged
        self._base, self.pos, self.end = start, 0, n + rest

    def skip(self, n: int) -> None:
        """Consume ``n`` bytes already made available by :meth:`fill`."""
        self.pos += n

    def at_eof(self) -> bool:
        return self.fill(1) == 0

    # -- exact reads ------------------------------------------------------
    def _need(self, n: int, field: str) -> None:
        if self.fill(n) < n:
            raise StreamError(f"stream ends {self.available} bytes into a {n}-byte field",
                              offset=self.offset, field=field)

    def read_exact(self, n: int, field: str) -> bytes:
        if n <= CHUNK:
            self._need(n, field)
            data = bytes(self.buf[self.pos:self.pos + n])
            self.pos += n
            return data
        out = bytearray()
        start = self.offset
        while len(out) < n:
            step = min(CHUNK, n - len(out))
            if self.fill(step) < step:
                raise StreamError(f"stream ends {len(out) + self.available} bytes into a "
                                  f"{n}-byte field", offset=start, field=field)
            out += self.buf[self.pos:self.pos + step]
            self.pos += step
        return bytes(out)

    def discard(self, n: int, field: str) -> None:
        """Skip ``n`` bytes without keeping them (bounded memory)."""
        start = self.offset
        left = n
        while left:
            step = min(CHUNK, left)
            got = self.fill(step)
            if got == 0:
                raise StreamError(f"stream ends {n - left} bytes into a {n}-byte field",
                                  offset=start, field=field)
            step = min(step, got)
            self.pos += step
            left -= step

    def u32(self, field: str) -> int:
        self._need(4, field)
        v: int = _U32.unpack_from(self.buf, self.pos)[0]
        self.pos += 4
        return v

    def s32(self, field: str) -> int:
        self._need(4, field)
        v: int = _S32.unpack_from(self.buf, self.pos)[0]
        self.pos += 4
        return v

    def u64(self, field: str) -> int:
        self._need(8, field)
        v: int = _U64.unpack_from(self.buf, self.pos)[0]
        self.pos += 8
        return v

    def ulong(self, width: int, field: str) -> int:
        return self.u32(field) if width == 4 else self.u64(field)

    def peek(self, n: int) -> bytes:
        """Up to ``n`` upcoming bytes without consuming them."""
        got = self.fill(n)
        return bytes(self.buf[self.pos:self.pos + min(n, got)])


class StreamWriter:
    """Coalesces small writes; passes large buffers straight through.

    Tracks the offset so a writer can say where a chunk went.

    Writing a regular file, it streams the image to the disk: every
    ``WRITEBACK_BYTES`` it starts writing the new range out
    (``sync_file_range``, no wait) and waits for the range
    ``WRITEBACK_RANGES`` before it, which has had that long to reach the disk.
    The disk then works while the image is produced, with a bounded amount in
    flight, and the fsync a save ends with waits for the last ranges only.
    Measured in this VM through xend (1.5 GiB image, 4 saves each, alternated):
    0.84-1.04 s (one 2.5 s), where starting writeback of the whole file
    without waiting took 0.88-1.52 s (one 2.7 s). Durability is unchanged
    (the fsync still decides); pipes and sockets are left alone.

    The written ranges stay in the page cache. Dropping them once on the disk,
    as Xen's ``discard_file_cache`` did, needs no free memory the size of the
    image (writing and fsyncing 1.5 GiB: 0.64-0.82 s dropping, 0.56-2.88 s
    not, by how long ago the memory was freed), but the restore that follows
    must then read the image from the disk: ``seam_engine.py`` restores took
    0.99-1.52 s instead of 0.52-0.96 s, and through ``xm`` neither side moved
    beyond the noise (benchmarks/README.md, PERF6h).

    Writing a pipe, it copies a large buffer into a ``PIPE_BOUNCE`` buffer
    of its own, a piece at a time, and writes that. The kernel copies a pipe
    write while it holds the pipe's lock, which the reader needs to copy
    out: a source that is not in the cache (a tmem store's pages lent in
    place, guest RAM through a mapping) holds the lock for the whole cache
    miss while the reader spins on it. Copied first into a buffer that stays
    in the cache, the miss is paid outside the lock, overlapping the
    reader's copy. Measured in this VM, 1 GiB of lent tmem records into a
    1 MiB pipe (``benchmarks/tmem_pipe.py``'s preallocated receiver, 8 runs
    alternated): 0.71 s straight from the store, 0.39 s through 128 KiB
    (0.41 s through 1 MiB). Sockets and files take no lock a reader holds
    and are written straight. A pipe is widened to ``CHUNK`` first
    (:func:`widen_pipe`), as a reader widens one it reads.
    """

    def __init__(self, f: Sink, offset: int = 0, bufsize: int = CHUNK) -> None:
        self._f = f
        self._buf = bytearray()
        self._bufsize = bufsize
        self.offset = offset
        self._wb_fd = self._writeback_fd(f)
        self._wb_pending = 0
        self._wb_start = os.lseek(self._wb_fd, 0, os.SEEK_CUR) if self._wb_fd >= 0 else 0
        self._wb_sent: List[Tuple[int, int]] = []   # ranges on their way to the disk
        self._bounce: Optional[memoryview] = None
        self._to_pipe = widen_pipe(f)
        self._pipe_fd = _fd_of(f, stat.S_ISFIFO) if self._to_pipe else -1
        self._stable = 0                  # depth of stable() blocks open
        self._piped = 0                   # bytes handed to the sink: a splice learns from
                                          # it how much of its pipe the reader has taken
        # spliced objects the reader may not have taken yet: (_piped at their end, object)
        self._held: Deque[Tuple[int, object]] = collections.deque()

    @staticmethod
    def _writeback_fd(f: Sink) -> int:
        """The descriptor of a regular file to stream to the disk, else -1."""
        return -1 if _sync_file_range is None else _fd_of(f, stat.S_ISREG)

    def _writeback(self, n: int) -> None:
        self._wb_pending += n
        if self._wb_pending < WRITEBACK_BYTES:
            return
        start, length = self._wb_start, self._wb_pending
        self._wb_start += length
        self._wb_pending = 0
        fn = _sync_file_range                # not None: _writeback_fd gave a descriptor
        fd = self._wb_fd
        if fn is None or fn(fd, start, length, _SYNC_FILE_RANGE_WRITE) != 0:
            self._wb_fd = -1             # e.g. a filesystem that refuses it: the fsync does all
            return
        self._wb_sent.append((start, length))
        if len(self._wb_sent) > WRITEBACK_RANGES:
            at, size = self._wb_sent.pop(0)
            if fn(fd, at, size, _SYNC_FILE_RANGE_WAIT) != 0:
                self._wb_fd = -1

    def write(self, data: Buffer) -> None:
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        self.offset += n
        if n >= 65536:
            if self._buf:
                self._flush_buf()
            self._write_all(data)
            return
        self._buf += data
        if len(self._buf) >= self._bufsize:
            self._flush_buf()

    def u32(self, v: int) -> None:
        self.write(_U32.pack(v))

    def s32(self, v: int) -> None:
        self.write(_S32.pack(v))

    def u64(self, v: int) -> None:
        self.write(_U64.pack(v))

    def ulong(self, width: int, v: int) -> None:
        self.write(_U32.pack(v) if width == 4 else _U64.pack(v))

    @contextlib.contextmanager
    def stable(self) -> Iterator[None]:
        """A block whose large writes are of memory that does not change until
        the block ends (a frozen tmem client's pages, lent in place) or of
        immutable ``bytes``. Into a pipe they are spliced (vmsplice(2)): the
        pipe takes the pages by reference and the reader copies them straight
        out of this process, the one copy a pipe transfer needs, where a write
        copies them into the pipe first. Each spliced object is kept alive until
        the reader has taken it; the block's end waits for the reader to have
        taken everything (:meth:`settle`). A block left by an exception does not
        wait: the stream is failing, what it still carries no longer matters.
        Measured in this VM, 1 GiB through a 1 MiB pipe into a committed store,
        3 runs each: 0.38-0.43 s spliced, 0.47-0.53 s written through
        ``PIPE_BOUNCE`` (benchmarks/README.md PERF9l)."""
        self._stable += 1
        try:
            yield
        finally:
            self._stable -= 1
        if not self._stable:
            self.settle()

    def settle(self) -> None:
        """Wait until the reader has taken every page spliced into the pipe."""
        if not self._held:
            return
        self.flush()
        fd = self._pipe_fd
        while fd >= 0 and _pipe_unread(fd):
            time.sleep(_SETTLE_POLL_S)
        self._held.clear()

    def _splice_fd(self) -> int:
        """The pipe to splice this write into, or -1 to copy it."""
        fd = self._pipe_fd
        if not (self._stable and fd >= 0 and _vmsplice is not None):
            return -1
        try:
            return fd if fd >= 0 and os.get_blocking(fd) else -1
        except OSError:
            return -1

    def _splice(self, fd: int, whole: memoryview) -> None:
        """Splice ``whole`` into the pipe ``fd``, keep what it is a view of until
        the reader has taken it, and let go of what the reader has taken."""
        fl = getattr(self._f, "flush", None)
        if fl is not None:
            fl()              # what a buffered sink holds goes into the pipe first
        _splice_all(fd, whole)
        self._piped += whole.nbytes
        self._held.append((self._piped, whole.obj))
        # everything counted is in the pipe now: what is not unread was taken
        taken = self._piped - _pipe_unread(fd)
        while self._held and self._held[0][0] <= taken:
            self._held.popleft()

    def _write_all(self, data: Buffer, hot: bool = False) -> None:
        """``hot``: the data was just written here (the coalescing buffer) and
        needs no bounce on its way into a pipe."""
        with memoryview(data) as raw, raw.cast("B") as whole:
            total = whole.nbytes
            splice_fd = -1 if hot else self._splice_fd()
            if splice_fd >= 0:
                self._splice(splice_fd, whole)
            elif self._to_pipe and not hot and total > PIPE_BOUNCE:
                self._write_bounced(whole)
            else:
                self._write_view(whole)
        if self._wb_fd >= 0:
            self._writeback(total)

    def _write_view(self, mv: memoryview) -> None:
        self._piped += mv.nbytes
        while mv.nbytes:
            wrote: Optional[int] = self._f.write(mv)
            mv = mv[wrote or 0:]   # None: a non-blocking raw file wrote nothing
        mv.release()

    def _write_bounced(self, whole: memoryview) -> None:
        bounce = self._bounce
        if bounce is None:
            bounce = self._bounce = memoryview(bytearray(PIPE_BOUNCE))
        for at in range(0, whole.nbytes, PIPE_BOUNCE):
            with whole[at:at + PIPE_BOUNCE] as piece:
                n = piece.nbytes
                bounce[:n] = piece
            self._write_view(bounce[:n])

    def _flush_buf(self) -> None:
        buf, self._buf = self._buf, bytearray()
        self._write_all(buf, hot=True)

    def flush(self) -> None:
        if self._buf:
            self._flush_buf()
        fl = getattr(self._f, "flush", None)
        if fl is not None:
            fl()


def ensure_reader(f: Union[Source, StreamReader]) -> StreamReader:
    """Accept either a file object or an existing :class:`StreamReader`."""
    return f if isinstance(f, StreamReader) else StreamReader(f)


def ensure_writer(f: Union[Sink, StreamWriter]) -> StreamWriter:
    return f if isinstance(f, StreamWriter) else StreamWriter(f)


__all__ = ["StreamReader", "StreamWriter", "DropBehind", "ensure_reader", "ensure_writer", "CHUNK"]
