"""Page checksums where both ends are this project (issue 8 #4).

Xen's image format has no checksum and a new chunk marker would make a stock
reader reject the image, so the checksums travel beside it:

* ``xm save FILE`` writes ``FILE.crc`` (the *sidecar*) next to the image: a
  header naming the image it belongs to (its size, the CRC32 of its first
  64 KiB and of the whole file), then one record per page *in the order the
  pages appear in the image*: RAM pages by pfn, tmem pages by pool, oid and
  index, each with the CRC32 of its 4096 bytes. ``xm restore FILE`` uses it
  when present and its header matches the image; a stock reader never opens it.
* A migration between two of these daemons negotiates ``crc32-frames`` in the
  pre-flight: every image frame is followed by the CRC32 of its bytes, and the
  same page records travel in their own frames ahead of the pages they cover.

:class:`PageLog` collects the records while a save writes pages;
:class:`PageCheck` compares them, as pages arrive, with what the restore reads
and raises :class:`IntegrityError` naming the first bad page -- before the
domain is ever unpaused (the restore removes it).
"""
from __future__ import annotations

import os
import struct
import zlib
from typing import BinaryIO, Iterable, List, Optional, Sequence, Tuple

from .errors import XendTmemError

PAGE = 4096
RAM = 0
TMEM = 1
SIDECAR_SUFFIX = ".crc"
SIDECAR_MAGIC = b"XTMCRC01"
HEAD_BYTES = 64 << 10                         # the image prefix the header fingerprints
_HEADER = struct.Struct("<8sQIIQ")            # magic, image size, head crc, image crc, count
_RECORD = struct.Struct("<BIQQQQI")           # kind, pool, oid0..2 (pfn in oid0), index, crc
RECORD_SIZE = _RECORD.size
MAX_RECORDS = 1 << 26                         # 64 Mi pages (256 GiB): a sane sidecar's bound

# (kind, pool, oid0, oid1, oid2, index, crc)
Record = Tuple[int, int, int, int, int, int, int]


class IntegrityError(XendTmemError):
    """A page (or frame) does not match its checksum: the image is corrupt."""


def describe(rec: Record) -> str:
    """``RAM page pfn N`` or ``tmem page pool P oid A:B:C index I``."""
    kind, pool, o0, o1, o2, index, _ = rec
    if kind == RAM:
        return f"RAM page pfn {o0}"
    return f"tmem page pool {pool} oid {o0}:{o1}:{o2} index {index}"


def encode(records: Iterable[Record]) -> bytes:
    return b"".join(_RECORD.pack(*r) for r in records)


def decode(data: bytes) -> List[Record]:
    """Records from their wire/file form (a length not a multiple is refused)."""
    if len(data) % RECORD_SIZE:
        raise IntegrityError(f"page checksum records of {len(data)} bytes: not a multiple "
                             f"of {RECORD_SIZE}")
    out: List[Record] = []
    for i in range(0, len(data), RECORD_SIZE):
        rec = _RECORD.unpack_from(data, i)
        if rec[0] not in (RAM, TMEM):
            raise IntegrityError(f"page checksum record {i // RECORD_SIZE} has kind {rec[0]}")
        out.append(rec)
    return out


class PageLog:
    """The save side: one record per page written, in stream order."""

    def __init__(self) -> None:
        self.records: List[Record] = []
        self.sent = 0            # records already handed to a stream (migration)

    def ram(self, pfns: Sequence[int], data) -> None:
        mv = memoryview(data).cast("B")
        for i, pfn in enumerate(pfns):
            self.records.append((RAM, 0, pfn, 0, 0, 0,
                                 zlib.crc32(mv[i * PAGE:(i + 1) * PAGE])))

    def tmem(self, pool_id: int, version: int, records, count: int, page_size: int) -> None:
        from .codec import tmemchunk as tc
        for oid, index, data in tc.iter_records(version, records, count, page_size):
            self.records.append((TMEM, pool_id, *oid, index, zlib.crc32(data)))

    def take_unsent(self) -> List[Record]:
        out = self.records[self.sent:]
        self.sent = len(self.records)
        return out


class PageCheck:
    """The restore side: pages as read, compared in order with the records
    (all known up front from a sidecar, or arriving ahead of their pages in a
    migration stream). Corrupt frames seen in transit are remembered too."""

    def __init__(self, records: Optional[List[Record]] = None, source: str = "") -> None:
        self.expected: List[Record] = list(records or [])
        self.source = source            # "FILE.crc" or "the migration stream"
        self.seen = 0
        self.bad_frames: List[str] = []

    def add_expected(self, records: List[Record]) -> None:
        if len(self.expected) + len(records) > MAX_RECORDS:
            raise IntegrityError(f"more than {MAX_RECORDS} page checksum records")
        self.expected.extend(records)

    def frame_bad(self, what: str) -> None:
        self.bad_frames.append(what)

    def _check(self, got: Record, offset: Optional[int]) -> None:
        where = f" (image offset {offset})" if offset is not None else ""
        if self.seen >= len(self.expected):
            raise IntegrityError(f"{describe(got)}{where} has no checksum in {self.source}: "
                                 "the image does not match its checksums")
        want = self.expected[self.seen]
        self.seen += 1
        if want[:6] != got[:6]:
            raise IntegrityError(f"{describe(got)}{where} is where {self.source} has "
                                 f"{describe(want)}: the image is corrupt")
        if want[6] != got[6]:
            raise IntegrityError(
                f"checksum mismatch in {describe(got)}{where}: CRC32 {got[6]:08x}, "
                f"{self.source} says {want[6]:08x}; the image is corrupt"
                + (f" ({'; '.join(self.bad_frames)})" if self.bad_frames else ""))

    def ram(self, pfns: Sequence[int], data, offset: Optional[int] = None) -> None:
        mv = memoryview(data).cast("B")
        for i, pfn in enumerate(pfns):
            self._check((RAM, 0, pfn, 0, 0, 0, zlib.crc32(mv[i * PAGE:(i + 1) * PAGE])),
                        None if offset is None else offset + i * PAGE)

    def tmem(self, pool_id: int, version: int, records, count: int, page_size: int,
             offset: Optional[int] = None) -> None:
        from .codec import tmemchunk as tc
        rec = tc.record_size(version, page_size)
        head = rec - page_size                    # the record's oid and index
        for i, (oid, index, data) in enumerate(tc.iter_records(version, records, count,
                                                               page_size)):
            self._check((TMEM, pool_id, *oid, index, zlib.crc32(data)),
                        None if offset is None else offset + i * rec + head)

    def finish(self) -> None:
        """The image is read: every page checked, nothing corrupt in transit."""
        if self.bad_frames:
            raise IntegrityError(f"the image was corrupted in transit: "
                                 f"{'; '.join(self.bad_frames)}")
        if self.seen != len(self.expected):
            raise IntegrityError(f"the image has {self.seen} pages, {self.source} lists "
                                 f"{len(self.expected)}: the image does not match")

    def explain(self, exc: BaseException) -> Optional[IntegrityError]:
        """A restore failure caused by a frame corrupted in transit, said so."""
        if self.bad_frames and not isinstance(exc, IntegrityError):
            return IntegrityError(f"the image was corrupted in transit "
                                  f"({'; '.join(self.bad_frames)}): {exc}")
        return None


# -- the sidecar file ----------------------------------------------------------------

def sidecar_path(image: str) -> str:
    return image + SIDECAR_SUFFIX


class CrcWriter:
    """A write-through file that keeps the size, the CRC32 of the first
    :data:`HEAD_BYTES` and of everything written (the sidecar's header)."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.size = 0
        self.head_crc = 0
        self.crc = 0

    def write(self, data) -> int:
        mv = memoryview(data).cast("B")
        n = self.out.write(mv)
        n = mv.nbytes if n is None else n       # a partial write: only what went out
        done = mv[:n]
        if self.size < HEAD_BYTES:
            self.head_crc = zlib.crc32(done[:HEAD_BYTES - self.size], self.head_crc)
        self.crc = zlib.crc32(done, self.crc)
        self.size += n
        return n

    def flush(self) -> None:
        flush = getattr(self.out, "flush", None)
        if flush is not None:
            flush()

    def fileno(self) -> int:
        return self.out.fileno()

    def close(self) -> None:
        self.out.close()


def write_sidecar(path: str, log: PageLog, image: CrcWriter, rename: bool = True) -> str:
    """Write ``path`` for the image ``image`` wrote: ``PATH.part``, fsynced, then
    renamed (``rename`` False: left as ``.part`` for the caller to rename once
    the image is in place). Returns the file written."""
    tmp = f"{path}.part"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_HEADER.pack(SIDECAR_MAGIC, image.size, image.head_crc, image.crc,
                                 len(log.records)))
            f.write(encode(log.records))
            f.flush()
            os.fsync(f.fileno())
        if not rename:
            return tmp
        os.replace(tmp, path)
        return path
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class ImageCheck(PageCheck):
    """A :class:`PageCheck` from a sidecar that also checks the whole image's CRC."""

    def __init__(self, records: List[Record], source: str, size: int, crc: int) -> None:
        super().__init__(records, source)
        self.size = size
        self.crc = crc
        self._reader: Optional["CrcReader"] = None

    def reader(self, inp: BinaryIO) -> "CrcReader":
        """``inp`` read through a CRC32; :meth:`finish` checks the whole image."""
        self._reader = CrcReader(inp, self)
        return self._reader

    def finish(self) -> None:
        super().finish()
        if self._reader is not None:
            self.finish_image(self._reader)

    def finish_image(self, reader: "CrcReader") -> None:
        if reader.size != self.size or reader.crc != self.crc:
            raise IntegrityError(f"the image's CRC32 is {reader.crc:08x} over {reader.size} "
                                 f"bytes, {self.source} says {self.crc:08x} over {self.size}: "
                                 "the image is corrupt outside its pages")


class CrcReader:
    """A read-through file computing the CRC32 of what was read."""

    def __init__(self, inp: BinaryIO, check: ImageCheck) -> None:
        self.inp = inp
        self.page_check = check
        self.size = 0
        self.crc = 0

    def readinto(self, buf) -> int:
        n = self.inp.readinto(buf)
        if n:
            self.crc = zlib.crc32(memoryview(buf).cast("B")[:n], self.crc)
            self.size += n
        return n or 0

    def read(self, n: int = -1) -> bytes:
        data = self.inp.read(n)
        if data:
            self.crc = zlib.crc32(data, self.crc)
            self.size += len(data)
        return data

    def close(self) -> None:
        self.inp.close()

    def __enter__(self) -> "CrcReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_sidecar(image_path: str, image_fd: int) -> Tuple[Optional[ImageCheck], str]:
    """The sidecar of an image, if present and its header matches the image
    open as ``image_fd``: ``(check, note)``; ``check`` None with a note saying
    why it is not used (empty note: there is none)."""
    path = sidecar_path(image_path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return None, ""
    except OSError as exc:
        return None, f"{path} not used: {exc.strerror or exc}"
    with f:
        head = f.read(_HEADER.size)
        if len(head) < _HEADER.size:
            return None, f"{path} not used: too short"
        magic, size, head_crc, crc, count = _HEADER.unpack(head)
        if magic != SIDECAR_MAGIC:
            return None, f"{path} not used: not a page checksum file"
        st = os.fstat(image_fd)
        if size != st.st_size:
            return None, f"{path} not used: written for an image of {size} bytes, not {st.st_size}"
        prefix = os.pread(image_fd, HEAD_BYTES, 0)
        if zlib.crc32(prefix) != head_crc:
            return None, f"{path} not used: written for another image"
        if count > MAX_RECORDS or count * RECORD_SIZE != os.fstat(f.fileno()).st_size - len(head):
            return None, f"{path} not used: its record count does not match its size"
        records = decode(f.read(count * RECORD_SIZE))
    return ImageCheck(records, os.path.basename(path), size, crc), ""


__all__ = ["PageLog", "PageCheck", "ImageCheck", "IntegrityError", "CrcWriter", "CrcReader",
           "write_sidecar", "load_sidecar", "sidecar_path", "describe", "encode", "decode",
           "RECORD_SIZE"]
