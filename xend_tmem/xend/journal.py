"""The job journal: what xend had in flight, so the next ``xend start`` can end it.

The hypervisor outlives xend; a xend killed mid-save or mid-migration leaves a
suspended guest, frozen tmem, a partial image or a half-restored domain behind.
Each save, restore and migration (either side) keeps one small JSON file in
``<xend-state-dir>/journal/`` for as long as it runs, rewritten atomically
(write to a temporary file, fsync, rename, fsync the directory) at every phase
change and removed when the job ends. :meth:`XendService.recover` reads them.

Besides the entries, ``migrations.json`` remembers how the last
:data:`MAX_OUTCOMES` incoming migrations ended (``running`` or ``aborted``) so a
source asking after a crash of this xend still gets a decisive answer.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

log = logging.getLogger("xend_tmem.xend.journal")

SUBDIR = "journal"
OUTCOMES = "migrations.json"
MAX_ENTRY_BYTES = 1 << 20         # a journal file larger than this is not ours
MAX_ENTRIES = 4096                # files read at start (each job has one)
MAX_OUTCOMES = 256
SUFFIX = ".json"

# operations
SAVE = "save"
RESTORE = "restore"
MIGRATE_OUT = "migrate-out"
MIGRATE_IN = "migrate-in"
OPS = (SAVE, RESTORE, MIGRATE_OUT, MIGRATE_IN)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: str, doc: Mapping[str, Any]) -> None:
    """Replace ``path`` with ``doc`` as JSON so a crash leaves the old or the new file."""
    data = json.dumps(doc, sort_keys=True, default=str).encode()
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


class Entry:
    """One job's journal file; every change is on disk when the call returns."""

    def __init__(self, journal: "Journal", path: str, doc: Dict[str, Any]) -> None:
        self.journal = journal
        self.path = path
        self.doc = doc
        self._lock = threading.Lock()
        self.removed = False

    @property
    def op(self) -> str:
        return str(self.doc.get("op"))

    def update(self, **fields: Any) -> None:
        """Record a phase change (or any facts) at once."""
        with self._lock:
            if self.removed:
                return
            self.doc.update(fields)
            self.doc["updated"] = time.time()
            write_atomically(self.path, self.doc)

    def note(self, plugin: str, mapping: Mapping[str, Any]) -> None:
        """A plugin's facts for its ``checkpoint_recover`` (merged per plugin)."""
        with self._lock:
            if self.removed:
                return
            notes = self.doc.setdefault("notes", {})
            notes.setdefault(str(plugin), {}).update(dict(mapping))
            write_atomically(self.path, self.doc)

    def clear_notes(self) -> None:
        """The save's done phase ran: nothing is owed to the plugins any more."""
        self.update(notes={})

    def remove(self) -> None:
        with self._lock:
            if self.removed:
                return
            self.removed = True
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            else:
                _fsync_dir(os.path.dirname(self.path))


class Journal:
    """The journal directory of one state directory."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.directory = os.path.join(state_dir, SUBDIR)
        self._outcomes_lock = threading.Lock()

    def begin(self, op: str, **fields: Any) -> Entry:
        """A new entry for a job that starts now, written before it acquires anything."""
        if op not in OPS:
            raise ValueError(f"unknown journal operation {op!r}")
        os.makedirs(self.directory, exist_ok=True)
        job = uuid.uuid4().hex
        doc: Dict[str, Any] = {"op": op, "job": job, "pid": os.getpid(),
                               "started": time.time(), **fields}
        entry = Entry(self, os.path.join(self.directory, f"{op}-{job}{SUFFIX}"), doc)
        entry.update()
        return entry

    def entries(self) -> List[Entry]:
        """Every entry left on disk, oldest first; unreadable files are logged,
        moved aside (``.bad``) and skipped."""
        try:
            names = sorted(n for n in os.listdir(self.directory) if n.endswith(SUFFIX))
        except FileNotFoundError:
            return []
        out: List[Entry] = []
        for name in names[:MAX_ENTRIES]:
            path = os.path.join(self.directory, name)
            doc = _read_json(path)
            if not isinstance(doc, dict) or doc.get("op") not in OPS:
                log.error("journal: %s is not a journal entry; moved to %s.bad", path, path)
                try:
                    os.replace(path, path + ".bad")
                except OSError:
                    pass
                continue
            out.append(Entry(self, path, doc))
        mine = f".{os.getpid()}."
        for name in os.listdir(self.directory):
            # a write cut short by a dead xend: the old file stands (ours may be in flight)
            if name.endswith(".tmp") and mine not in name:
                try:
                    os.unlink(os.path.join(self.directory, name))
                except OSError:
                    pass
        out.sort(key=lambda e: float(e.doc.get("started") or 0))
        return out

    # -- how incoming migrations ended ---------------------------------------------
    def record_outcome(self, migration_id: str, outcome: str) -> None:
        """Remember ``running``/``aborted`` for a source that asks later."""
        if not migration_id:
            return
        os.makedirs(self.state_dir, exist_ok=True)
        path = os.path.join(self.state_dir, OUTCOMES)
        with self._outcomes_lock:
            doc = _read_json(path)
            items = doc.get("migrations") if isinstance(doc, dict) else None
            items = [i for i in items if isinstance(i, list) and len(i) == 2
                     and i[0] != migration_id] if isinstance(items, list) else []
            items.append([migration_id, outcome])
            write_atomically(path, {"migrations": items[-MAX_OUTCOMES:]})

    def outcome(self, migration_id: str) -> Optional[str]:
        doc = _read_json(os.path.join(self.state_dir, OUTCOMES))
        items = doc.get("migrations") if isinstance(doc, dict) else None
        for item in items if isinstance(items, list) else []:
            if isinstance(item, list) and len(item) == 2 and item[0] == migration_id:
                return str(item[1])
        return None


# -- test-only kill points ----------------------------------------------------------
# The crash-recovery tests SIGKILL xend at chosen points. With
# XEND_TMEM_KILLPOINT=POINT (or POINT@BYTES for a point inside a stream) the job
# that reaches POINT logs it, writes POINT to $XEND_TMEM_KILLPOINT_FILE if set,
# and blocks there until the process is killed. Unset (always, outside tests),
# every helper below is a no-op and the wrappers return what they were given.
KILLPOINT_ENV = "XEND_TMEM_KILLPOINT"
KILLPOINT_FILE_ENV = "XEND_TMEM_KILLPOINT_FILE"


def _killpoint_wanted() -> Tuple[str, int]:
    spec = os.environ.get(KILLPOINT_ENV, "")
    point, _, at = spec.partition("@")
    return point, int(at) if at.isdigit() else 0


def killpoint(point: str) -> None:
    """Block forever at ``point`` if the test asked for it."""
    if _killpoint_wanted()[0] != point or not point:
        return
    log.warning("test kill point %s reached: waiting to be killed", point)
    marker = os.environ.get(KILLPOINT_FILE_ENV)
    if marker:
        with open(marker, "w") as f:
            f.write(point + "\n")
    while True:
        time.sleep(3600)


def killpoint_after_bytes(point: str, done: int) -> None:
    wanted, at = _killpoint_wanted()
    if wanted == point and done >= at:
        killpoint(point)


class _CountingFile:
    def __init__(self, f: Any, point: str) -> None:
        self._f = f
        self._point = point
        self._done = 0

    def write(self, data: Any) -> int:
        n: int = self._f.write(data)
        self._done += memoryview(data).nbytes
        killpoint_after_bytes(self._point, self._done)
        return n

    def readinto(self, buf: Any) -> int:
        n: int = self._f.readinto(buf) or 0
        self._done += n
        killpoint_after_bytes(self._point, self._done)
        return n

    def read(self, n: int = -1) -> bytes:
        data: bytes = self._f.read(n)
        self._done += len(data)
        killpoint_after_bytes(self._point, self._done)
        return data

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._f, attr)


def killpoint_stream(f: Any, point: str) -> Any:
    """``f`` itself, or (kill point ``point`` asked) a wrapper counting bytes through it."""
    return _CountingFile(f, point) if _killpoint_wanted()[0] == point else f


def killpoint_progress(progress: Callable[[str, int, Optional[int]], None], point: str
                       ) -> Callable[[str, int, Optional[int]], None]:
    """A progress callback that reaches ``point`` once ``done`` passes its bytes."""
    if _killpoint_wanted()[0] != point:
        return progress

    def wrapped(phase: str, done: int, total: Optional[int]) -> None:
        progress(phase, done, total)
        if phase in ("rounds", "tmem"):
            killpoint_after_bytes(point, done)
    return wrapped


def _read_json(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_ENTRY_BYTES + 1)
    except OSError:
        return None
    if len(data) > MAX_ENTRY_BYTES:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return None


__all__ = ["Journal", "Entry", "write_atomically", "SAVE", "RESTORE", "MIGRATE_OUT",
           "MIGRATE_IN"]
