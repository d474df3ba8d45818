"""``xm save`` end to end (issue 8 #3, #5): a full device reads "No space left
on device" with the path and exits 1, the device stays a device and the domain
keeps running; a symlink target stays a symlink."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from .xendtest import STILL_DOMAIN, write_domain

pytestmark = pytest.mark.e2e


def test_xm_save_to_a_full_device_and_through_a_symlink(xends, tmp_path: Path) -> None:
    a = xends.start("a")
    a.xm_ok("create", str(write_domain(tmp_path, STILL_DOMAIN)))
    devdir = tmp_path / "dev"
    devdir.mkdir()
    full = devdir / "full"
    try:
        os.mknod(full, 0o666 | stat.S_IFCHR, os.makedev(1, 7))
    except PermissionError as exc:
        pytest.skip(f"cannot make a device node here: {exc}")
    r = a.xm("save", "still1", str(full))
    assert r.returncode == 1
    assert r.stderr == f"Error: xm save: {full}: No space left on device\n"
    assert stat.S_ISCHR(os.lstat(full).st_mode) and os.listdir(devdir) == ["full"]
    assert a.domains()["still1"][3] == "r-----"

    images = tmp_path / "images"
    images.mkdir()
    link = tmp_path / "still1.img"
    link.symlink_to(images / "still1.img")
    old = os.umask(0o027)
    try:
        a.xm_ok("save", "still1", str(link))
    finally:
        os.umask(old)
    assert link.is_symlink()
    assert stat.S_IMODE((images / "still1.img").stat().st_mode) == 0o640
    assert a.xm_ok("restore", str(link)).startswith("Restored domain still1")
