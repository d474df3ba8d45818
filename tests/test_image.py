"""xend image header: signature, big-endian config length, SXP config (SPEC §1)."""
from __future__ import annotations

import io
import struct

import pytest

from xend_tmem.binio import StreamReader, StreamWriter
from xend_tmem.codec import image, legacy, sxp
from xend_tmem.errors import StreamError

PV_CONFIG = ("(domain (domid 3) (name web1) (memory 512) (vcpus 1) "
             "(image (linux (kernel /boot/vmlinuz) (args 'root=/dev/xvda1 ro'))))")
HVM_CONFIG = ("(domain (domid 4) (name win1) (memory 1024) "
              "(image (hvm (kernel /usr/lib/xen/boot/hvmloader) (device_model qemu-dm))))")


def _image(config: str, tail: bytes = b"") -> bytes:
    buf = io.BytesIO()
    w = StreamWriter(buf)
    image.write_header(w, config)
    w.write(tail)
    w.flush()
    return buf.getvalue()


def _read(data: bytes, **kw) -> image.ImageHeader:
    return image.read_header(StreamReader(io.BytesIO(data)), **kw)


def test_header_bytes_follow_spec():
    raw = _image(PV_CONFIG)
    n = len(PV_CONFIG)
    assert raw[:16] == b"LinuxGuestRecord"
    assert raw[16:20] == struct.pack(">i", n)       # big-endian, unlike the rest
    assert raw[20:] == PV_CONFIG.encode()


@pytest.mark.parametrize("config, guest", [(PV_CONFIG, "pv"), (HVM_CONFIG, "hvm")])
def test_round_trip(config, guest):
    hdr = _read(_image(config))
    assert hdr.config_text == config
    assert hdr.config == sxp.parse(config)
    assert hdr.guest == guest
    assert hdr.offset_after == 20 + len(config)


def test_round_trip_of_generated_config_with_non_ascii():
    cfg = sxp.to_string(sxp.from_mapping("domain", {"name": "wéb 1", "memory": 256}))
    hdr = _read(_image(cfg))
    assert sxp.child_value(hdr.config, "name") == "wéb 1"
    assert hdr.offset_after == 20 + len(cfg.encode())


def test_legacy_stream_follows_at_offset_after():
    buf = io.BytesIO()
    w = StreamWriter(buf)
    image.write_header(w, HVM_CONFIG)
    legacy.write_p2m_size(w, 16, 8)
    legacy.write_end(w)
    legacy.write_hvm_tail(w, (1, 2, 3), b"ctx", b"qemu-state")
    w.flush()
    r = StreamReader(io.BytesIO(buf.getvalue()))
    hdr = image.read_header(r)
    head, body, tail = legacy.read_stream(r, 8, hdr.guest)
    assert head.offset == hdr.offset_after
    assert body.chunks == [(0, hdr.offset_after + 8)]
    assert tail.dm_bytes == len(b"qemu-state")


def test_wrong_signature_does_not_echo_the_file():
    # xend may read files its user cannot: the message must not reveal content (issue 8 #7)
    with pytest.raises(StreamError) as ei:
        _read(b"\x10\x00\x00\x00\x00\x00\x00\x00GARBAGE!" + bytes(32))
    msg = str(ei.value)
    assert "not a xend save image" in msg and "LinuxGuestRecord" in msg
    assert "GARBAGE" not in msg and "x10" not in msg
    assert ei.value.offset == 0 and ei.value.field == "signature"


def test_short_file():
    with pytest.raises(StreamError, match="ends after 5 bytes"):
        _read(b"Linux")
    with pytest.raises(StreamError, match="not a xend save image") as ei:
        _read(b"hello")
    assert "hello" not in str(ei.value)
    with pytest.raises(StreamError) as ei:
        _read(image.SIGNATURE + b"\x00\x00")
    assert ei.value.field == "config length" and ei.value.offset == 16


@pytest.mark.parametrize("length", [-1, -(2 ** 31), 17 << 20])
def test_bad_length(length):
    data = image.SIGNATURE + struct.pack(">i", length)
    with pytest.raises(StreamError) as ei:
        _read(data)
    assert ei.value.field == "config length"
    assert ei.value.value == length
    assert ei.value.offset == 16


def test_custom_bound_and_truncated_config():
    with pytest.raises(StreamError, match="0..10"):
        _read(_image(PV_CONFIG), max_config=10)
    raw = _image(PV_CONFIG)
    with pytest.raises(StreamError) as ei:
        _read(raw[:-3])
    assert ei.value.field == "config"


def test_bad_sxp_points_at_byte():
    raw = _image("(domain (name wéb1) (memory 512)")   # never closed
    with pytest.raises(StreamError) as ei:
        _read(raw)
    assert "never closed" in str(ei.value)
    assert ei.value.offset == 20
    raw = _image("(domain (name wéb1)) )")
    with pytest.raises(StreamError) as ei:
        _read(raw)
    assert ei.value.offset == 20 + len("(domain (name wéb1)) ".encode())


def test_not_utf8_and_not_domain():
    data = image.SIGNATURE + struct.pack(">i", 4) + b"(a\xff)"
    with pytest.raises(StreamError, match="UTF-8") as ei:
        _read(data)
    assert ei.value.offset == 22
    with pytest.raises(StreamError, match="starts with 'vm'"):
        _read(_image("(vm (name x))"))
    with pytest.raises(StreamError, match="config is empty|no SXP"):
        _read(_image(""))


def test_is_image():
    assert image.is_image(image.SIGNATURE)
    assert image.is_image(image.SIGNATURE + b"more")
    assert not image.is_image(b"LinuxGuestRecor")
    assert not image.is_image(b"\xfb\xff\xff\xff" + bytes(12))
    assert image.QEMU_SIGNATURE == b"QemuDeviceModelRecord" and len(image.QEMU_SIGNATURE) == 21
