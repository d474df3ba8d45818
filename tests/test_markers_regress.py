"""Issue 8 #6: chunk markers belong to the plugin that declares them.

The plugin manager accepted a plugin declaring a marker the host does not
parse, but the legacy reader refused every handler but -5/-6, so one such
plugin broke every restore. A marker must reach the plugin that owns it (and
only that one), ``inspect`` must show it by its owner's name, and a marker
nobody owns must be an error naming it and its offset.
"""
from __future__ import annotations

import dataclasses
import io
import struct
from pathlib import Path
from typing import List, Optional

import pytest

from xend_tmem import plugins
from xend_tmem.checkpoint import restore_domain, save_domain
from xend_tmem.codec import legacy
from xend_tmem.domconfig import load_domain_config
from xend_tmem.errors import PluginError, StreamError
from xend_tmem.hooks import hookimpl
from xend_tmem.hypervisor.sim import SimHypervisor

VECTORS = Path(__file__).parent / "data" / "vectors"
SCENARIO = VECTORS / "v1" / "03-mixed-pools" / "scenario.yaml"


class Stamp:
    """A checkpoint plugin with a chunk of its own: marker, u32 length, bytes."""

    def __init__(self, name: str = "stamp", marker: int = -100, greedy: bool = False) -> None:
        self.__name__ = name            # pluggy's name for the registered object
        self.marker = marker
        self.greedy = greedy            # claims every chunk it is shown, consuming nothing
        self.read: List[bytes] = []
        self.offsets: List[int] = []

    def payload(self, domid: int) -> bytes:
        return f"{self.__name__} of domain {domid}".encode()

    @hookimpl
    def checkpoint_restore_markers(self) -> List[int]:
        return [self.marker]

    @hookimpl
    def checkpoint_save_after_suspend(self, session) -> None:
        data = self.payload(session.domid)
        session.out.write(struct.pack("<iI", self.marker, len(data)) + data)

    @hookimpl
    def checkpoint_restore_chunk(self, session, marker: int, reader, offset: int) -> Optional[bool]:
        if marker != self.marker:
            return True if self.greedy else None
        n = reader.u32("stamp length")
        self.read.append(reader.read_exact(n, "stamp"))
        self.offsets.append(offset)
        return True


def _image(*extra: object) -> bytes:
    hv = SimHypervisor()
    # 4 MiB of RAM: the chunk, not the pages, is what this is about
    domid = hv.create_domain(dataclasses.replace(load_domain_config(str(SCENARIO)), memory=4))
    out = io.BytesIO()
    save_domain(hv, domid, out, hooks=plugins.get_plugin_manager(["tmem"], {}, extra=extra),
                live=True)
    return out.getvalue()


def _marker_offset(data: bytes, payload: bytes) -> int:
    at = data.index(payload) - 8
    assert struct.unpack_from("<i", data, at)[0] < 0
    return at


def test_plugin_marker_round_trips_through_save_and_restore() -> None:
    saver = Stamp()
    data = _image(saver)
    sent = saver.payload(1)
    assert sent in data
    reader = Stamp()
    dst = SimHypervisor()
    domid, report = restore_domain(dst, io.BytesIO(data),
                                   hooks=plugins.get_plugin_manager(["tmem"], {}, extra=[reader]))
    assert reader.read == [sent]
    assert reader.offsets == [_marker_offset(data, sent)]
    assert report["plugins"]["tmem"]["pages"] > 0            # tmem still restored beside it
    assert domid in [d.domid for d in dst.list_domains()]


def test_each_marker_reaches_only_its_owner() -> None:
    """A plugin that claims whatever it is shown must not be offered another's chunk."""
    a, b = Stamp("alpha", -100, greedy=True), Stamp("beta", -101, greedy=True)
    data = _image(a, b)
    ra, rb = Stamp("alpha", -100, greedy=True), Stamp("beta", -101, greedy=True)
    restore_domain(SimHypervisor(), io.BytesIO(data),
                   hooks=plugins.get_plugin_manager(["tmem"], {}, extra=[ra, rb]))
    assert ra.read == [a.payload(1)] and rb.read == [b.payload(1)]


def test_unknown_marker_is_an_error_naming_it_and_its_offset() -> None:
    saver = Stamp()
    data = _image(saver)
    at = _marker_offset(data, saver.payload(1))
    dst = SimHypervisor()
    with pytest.raises(StreamError) as ei:
        restore_domain(dst, io.BytesIO(data), hooks=plugins.get_plugin_manager(["tmem"], {}))
    msg = str(ei.value)
    assert f"chunk -100 at offset {at}" in msg and "no checkpoint plugin" in msg
    assert ei.value.offset == at
    assert [d.domid for d in dst.list_domains()] == [0]


def test_legacy_reader_takes_a_handler_for_a_plugin_marker() -> None:
    legacy.LegacyReader(io.BytesIO(), handlers={-100: lambda r, m, o: None})
    for host_id in (-1, -2, -7, -12, -18, 0, 1):
        with pytest.raises(ValueError, match="host"):
            legacy.LegacyReader(io.BytesIO(), handlers={host_id: lambda r, m, o: None})


def test_the_registry_knows_owners_and_reserves_host_ids() -> None:
    hooks = plugins.get_plugin_manager(["tmem"], {}, extra=[Stamp()])
    reg = hooks.registry
    assert reg.owner(-5) == reg.owner(-6) == "tmem"
    assert reg.owner(-100) == "stamp"
    assert reg.owner(-101) is None
    assert -100 in reg.markers and -7 not in reg.markers
    assert reg.host_ids == legacy.HOST_CHUNK_IDS


def test_a_plugin_declaring_markers_must_read_them() -> None:
    class Mute:
        __name__ = "mute"

        @hookimpl
        def checkpoint_restore_markers(self) -> List[int]:
            return [-100]

    with pytest.raises(PluginError, match=r"'mute' declares marker -100 but does not "
                                          r"implement checkpoint_restore_chunk"):
        plugins.get_plugin_manager([], {}, extra=[Mute()])


def test_inspect_shows_a_plugin_chunk_by_its_owner(tmp_path: Path) -> None:
    from xend_tmem.cli import inspect as insp

    class Described(Stamp):
        @hookimpl
        def checkpoint_inspect_chunk(self, marker: int, reader, offset: int):
            n = reader.u32("stamp length")
            return {"text": reader.read_exact(n, "stamp").decode()}

    saver = Described()
    path = tmp_path / "dom.img"
    path.write_bytes(_image(saver))
    at = _marker_offset(path.read_bytes(), saver.payload(1))
    hooks = plugins.get_plugin_manager(["tmem"], {}, extra=[Described()])
    info = insp.inspect_file(str(path), chunks_only=False, with_pages=False, hooks=hooks)
    assert info["plugin_chunks"] == [{"marker": -100, "plugin": "stamp", "offset": at,
                                      "size": 4 + len(saver.payload(1)),
                                      "info": {"text": saver.payload(1).decode()}}]
    assert [c["marker"] for c in info["chunks"]] == [-5, -6]
    text = insp.format_text(info)
    assert f"chunk -100 (plugin 'stamp') at offset {at}" in text
    assert "stamp of domain 1" in text
    # without the owner, inspect says whose chunk stopped it and where
    with pytest.raises(StreamError, match=rf"chunk -100 at offset {at}"):
        insp.inspect_file(str(path), chunks_only=False, with_pages=False,
                          hooks=plugins.get_plugin_manager(["tmem"], {}))


def test_a_plugin_chunk_before_p2m_size_is_dispatched_too() -> None:
    """``checkpoint_save_before_header`` is open to any plugin: the reader hands a
    plugin marker met where ``p2m_size`` would be to its owner."""

    class Early(Stamp):
        @hookimpl
        def checkpoint_save_before_header(self, session) -> None:
            self.checkpoint_save_after_suspend(session)

        @hookimpl
        def checkpoint_save_after_suspend(self, session) -> None:
            if not getattr(self, "_sent", False):
                self._sent = True
                super().checkpoint_save_after_suspend(session)

    saver = Early()
    data = _image(saver)
    at = _marker_offset(data, saver.payload(1))
    header_len = 20 + int.from_bytes(data[16:20], "big")
    assert at == header_len                     # the stream's very first int
    reader = Stamp()
    restore_domain(SimHypervisor(), io.BytesIO(data),
                   hooks=plugins.get_plugin_manager(["tmem"], {}, extra=[reader]))
    assert reader.read == [saver.payload(1)] and reader.offsets == [at]


def test_tmem_without_its_plugin_names_the_plugin_and_the_key() -> None:
    data = _image()
    with pytest.raises(StreamError, match=r"enable the 'tmem' checkpoint plugin \(toolstack "
                                          r"configuration key checkpoint-plugins\)"):
        restore_domain(SimHypervisor(), io.BytesIO(data), hooks=plugins.get_plugin_manager([], {}))
