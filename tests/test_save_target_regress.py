"""Issue 8 #3: ``xm save`` keeps its target's nature and mode.

A regular file is still written beside and renamed (no partial file on failure),
but into the directory a symlink resolves to and with the old file's mode; a new
image gets 0666 & ~umask (xm's umask, sent with the request); FIFOs and devices
are written through. A full device or file system reads "No space left on
device" with the path, leaves no partial file and the domain running.
"""
from __future__ import annotations

import os
import stat
import subprocess
import threading
from pathlib import Path
from typing import List

import pytest

from xend_tmem.config import parse_toolstack_config
from xend_tmem.domconfig import parse_domain_config
from xend_tmem.hypervisor.sim import SimHypervisor
from xend_tmem.integrity import SIDECAR_SUFFIX
from xend_tmem.plugins import get_plugin_manager
from xend_tmem.xend.service import XendService

DOMAIN = {"name": "web1", "memory": 4,
          "tmem": {"version": 1, "pools": [{"id": 0, "persistent": True,
                                            "bulk": {"pages": 8}}]}}
MAGIC = b"LinuxGuestRecord"
ROOT = os.geteuid() == 0


@pytest.fixture
def svc(tmp_path_factory):
    hv = SimHypervisor()
    hv.create_domain(parse_domain_config(DOMAIN))
    s = XendService(parse_toolstack_config({"xend-state-dir": str(tmp_path_factory.mktemp("st"))}),
                    hv, get_plugin_manager(["tmem"], {}))
    yield s
    s.stop(5)


def files(directory: Path) -> List[str]:
    """What a directory holds besides the images' checksum sidecars (issue 8 #4),
    which belong beside a regular image."""
    return sorted(n for n in os.listdir(directory) if not n.endswith(SIDECAR_SUFFIX))


def save(svc: XendService, path: Path, checkpoint: bool = True, **kw) -> dict:
    job = svc.jobs.get(svc.job_save("web1", str(path), checkpoint, **kw))
    assert job.finished_event.wait(30)
    return job.status()


def test_symlink_stays_a_symlink_and_the_file_it_names_is_written(svc, tmp_path: Path) -> None:
    real_dir = tmp_path / "images"
    real_dir.mkdir()
    real = real_dir / "web1.img"
    real.write_bytes(b"old")
    os.chmod(real, 0o640)
    link = tmp_path / "current.img"
    link.symlink_to(real)
    st = save(svc, link)
    assert st["state"] == "done", st
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_bytes()[:16] == MAGIC
    assert stat.S_IMODE(real.stat().st_mode) == 0o640
    assert files(real_dir) == ["web1.img"]
    assert files(tmp_path) == ["current.img", "images"]


def test_dangling_symlink_creates_its_target(svc, tmp_path: Path) -> None:
    real = tmp_path / "sub" / "new.img"
    real.parent.mkdir()
    link = tmp_path / "link.img"
    link.symlink_to(real)
    assert save(svc, link, umask=0o022)["state"] == "done"
    assert link.is_symlink() and real.read_bytes()[:16] == MAGIC
    assert stat.S_IMODE(real.stat().st_mode) == 0o644


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o604])
def test_existing_file_keeps_its_mode(svc, tmp_path: Path, mode: int) -> None:
    target = tmp_path / "web1.img"
    target.write_bytes(b"old image")
    os.chmod(target, mode)
    assert save(svc, target)["state"] == "done"
    assert target.read_bytes()[:16] == MAGIC
    assert stat.S_IMODE(target.stat().st_mode) == mode
    assert files(tmp_path) == ["web1.img"]


@pytest.mark.skipif(not ROOT, reason="changing a file's owner needs root")
def test_existing_file_keeps_its_owner_as_root(svc, tmp_path: Path) -> None:
    target = tmp_path / "web1.img"
    target.write_bytes(b"old image")
    os.chown(target, 4321, 4322)
    assert save(svc, target)["state"] == "done"
    assert (target.stat().st_uid, target.stat().st_gid) == (4321, 4322)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_image_mode_follows_the_callers_umask(svc, tmp_path: Path, umask: int,
                                                  mode: int) -> None:
    target = tmp_path / "web1.img"
    assert save(svc, target, umask=umask)["state"] == "done"
    assert stat.S_IMODE(target.stat().st_mode) == mode


def test_fifo_is_written_through(svc, tmp_path: Path) -> None:
    fifo = tmp_path / "web1.pipe"
    os.mkfifo(fifo)
    got: List[bytes] = []

    def reader() -> None:
        with open(fifo, "rb") as f:        # blocks until the daemon opens it to write
            got.append(f.read())

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    st = save(svc, fifo)
    if st["state"] != "done" or t.is_alive():
        with open(fifo, "wb"):            # unblock the reader before failing
            pass
    t.join(10)
    assert st["state"] == "done", st
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert got and got[0][:16] == MAGIC
    assert os.listdir(tmp_path) == ["web1.pipe"]


def make_node(path: Path, minor: int) -> None:
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, minor))
    except PermissionError as exc:
        pytest.skip(f"cannot make a device node here: {exc}")


def test_character_device_is_written_through(svc, tmp_path: Path) -> None:
    null = tmp_path / "null"
    make_node(null, 3)
    st = save(svc, null)
    assert st["state"] == "done", st
    assert stat.S_ISCHR(os.lstat(null).st_mode) and os.lstat(null).st_rdev == os.makedev(1, 3)
    assert os.listdir(tmp_path) == ["null"]


def assert_no_space(svc: XendService, st: dict, path: Path) -> None:
    assert st["state"] == "failed" and st["fault_code"] == 2, st
    assert st["error"] == f"{path}: No space left on device", st
    info = svc.hv.domain_info(svc.domid("web1"))
    assert info.name == "web1" and info.running


def test_full_device_says_no_space_and_stays_a_device(svc, tmp_path: Path) -> None:
    full = tmp_path / "full"
    make_node(full, 7)
    st = save(svc, full, checkpoint=False)
    assert_no_space(svc, st, full)
    assert stat.S_ISCHR(os.lstat(full).st_mode) and os.lstat(full).st_rdev == os.makedev(1, 7)
    assert os.listdir(tmp_path) == ["full"]
    assert svc._busy == {}


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_full_tmpfs_says_no_space_and_leaves_no_partial_file(svc, tiny_tmpfs: Path) -> None:
    target = tiny_tmpfs / "web1.img"
    st = save(svc, target, checkpoint=False)
    assert_no_space(svc, st, target)
    assert os.listdir(tiny_tmpfs) == []
