"""The job journal: atomic entries, plugin notes, outcomes, the test kill points."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from xend_tmem.xend import journal as jrn
from xend_tmem.xend.journal import Journal


def test_entry_lives_on_disk_from_begin_to_remove(tmp_path: Path) -> None:
    j = Journal(str(tmp_path))
    e = j.begin(jrn.SAVE, domain="web1", domid=3, phase="saving")
    on_disk = json.loads(Path(e.path).read_text())
    assert on_disk["op"] == "save" and on_disk["domain"] == "web1" and on_disk["phase"] == "saving"
    e.update(phase="written")
    e.note("tmem", {"save_begin": "issued"})
    e.note("tmem", {"save_begin": True})
    e.note("other", {"x": 1})
    doc = json.loads(Path(e.path).read_text())
    assert doc["phase"] == "written"
    assert doc["notes"] == {"tmem": {"save_begin": True}, "other": {"x": 1}}
    assert [x.doc["job"] for x in j.entries()] == [e.doc["job"]]
    e.remove()
    assert not os.path.exists(e.path) and j.entries() == []
    e.update(phase="late")                         # after remove: nothing comes back
    assert j.entries() == []


def test_unknown_operation_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown journal operation 'copy'"):
        Journal(str(tmp_path)).begin("copy")


def test_a_cut_write_leaves_the_old_entry(tmp_path: Path, monkeypatch) -> None:
    j = Journal(str(tmp_path))
    e = j.begin(jrn.MIGRATE_OUT, domain="web1", phase="streaming")

    def crash(*a, **k):
        raise OSError("killed between write and rename")

    monkeypatch.setattr(jrn.os, "replace", crash)
    with pytest.raises(OSError):
        e.update(phase="go-sent")
    monkeypatch.undo()
    ours = [n for n in os.listdir(j.directory) if n.endswith(".tmp")]
    assert len(ours) == 1                         # the cut write's temporary file
    dead = Path(j.directory) / "save-x.json.999999999.1.tmp"   # one a dead xend left
    dead.write_text("{")
    (left,) = j.entries()                         # the old file stands
    assert left.doc["phase"] == "streaming"
    # a dead process's .tmp is swept; ours may be a write in flight on another thread
    assert [n for n in os.listdir(j.directory) if n.endswith(".tmp")] == ours


def test_foreign_files_are_set_aside(tmp_path: Path) -> None:
    j = Journal(str(tmp_path))
    good = j.begin(jrn.RESTORE, path="/x.img")
    bad = Path(j.directory) / "save-garbage.json"
    bad.write_text("{not json")
    huge = Path(j.directory) / "save-huge.json"
    huge.write_bytes(b" " * (jrn.MAX_ENTRY_BYTES + 1))
    wrong = Path(j.directory) / "save-wrong.json"
    wrong.write_text(json.dumps({"op": "format-disk"}))
    assert [e.path for e in j.entries()] == [good.path]
    assert sorted(os.listdir(j.directory)) == sorted([
        os.path.basename(good.path), "save-garbage.json.bad", "save-huge.json.bad",
        "save-wrong.json.bad"])


def test_outcomes_are_remembered_and_bounded(tmp_path: Path) -> None:
    j = Journal(str(tmp_path))
    assert j.outcome("m0") is None
    for i in range(jrn.MAX_OUTCOMES + 10):
        j.record_outcome(f"m{i}", "running")
    j.record_outcome("m300", "aborted")
    j.record_outcome("m300", "running")          # the latest word wins
    assert j.outcome("m0") is None                # the oldest fell out
    assert j.outcome(f"m{jrn.MAX_OUTCOMES + 9}") == "running"
    assert Journal(str(tmp_path)).outcome("m300") == "running"   # survives a restart
    doc = json.loads((tmp_path / jrn.OUTCOMES).read_text())
    assert len(doc["migrations"]) == jrn.MAX_OUTCOMES


def test_kill_points_are_inert_unless_asked(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv(jrn.KILLPOINT_ENV, raising=False)
    f = open(tmp_path / "x", "wb")  # noqa: SIM115 - closed in the finally below
    try:
        assert jrn.killpoint_stream(f, "save-stream") is f
        progress = print
        assert jrn.killpoint_progress(progress, "migrate-stream") is progress
        jrn.killpoint("save-start")               # returns at once
        monkeypatch.setenv(jrn.KILLPOINT_ENV, "save-stream@100")
        wrapped = jrn.killpoint_stream(f, "save-stream")
        assert wrapped is not f
        assert jrn.killpoint_stream(f, "restore-stream") is f
        wrapped.write(b"x" * 99)                  # below the byte mark: no stop
    finally:
        f.close()
