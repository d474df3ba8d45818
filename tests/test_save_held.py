"""The tmem save through a hypervisor process's client keeps each batch in a
connection's shared buffer until it is written (``save_get_pages_held``): the
image and the page log must be what the plain path gives, every held buffer
must be handed back once (also when writing fails), and the counts asked never
pass the pages announced."""
from __future__ import annotations

import io
import struct
from array import array
from typing import List

import pytest
from hvfixtures import start_process, stop_process

from xend_tmem import integrity, xen
from xend_tmem.binio import StreamWriter
from xend_tmem.codec import tmemchunk as tc
from xend_tmem.crc import crc32
from xend_tmem.hypervisor.client import HypervisorClient
from xend_tmem.tmem.save import TmemWriter

RS = 24 + 4 + 4096


def _records(start: int, n: int) -> bytes:
    return b"".join(struct.pack("<QQQI", 1, 2, 3, start + i) + bytes([(start + i) & 0xFF]) * 4096
                    for i in range(n))


def _client(mocker, walk: int, released: List[int], asked: List[int]):
    hv = mocker.create_autospec(HypervisorClient, instance=True)
    left = [walk]

    def held(domid, pool_id, n, crcs=None):
        asked.append(n)
        k = min(n, left[0])
        start = walk - left[0]
        left[0] -= k
        recs = _records(start, k)
        if crcs is not None:
            crcs[:k] = array("I", [crc32(recs[i * RS + 28:(i + 1) * RS]) for i in range(k)])
        token = len(asked)
        return k, memoryview(recs), lambda: released.append(token)

    # what the process client declares (two batches held, 4 MiB each)
    hv.save_pages_lending.return_value = HypervisorClient.save_pages_lending(hv)
    hv.save_get_pages_held.side_effect = held
    hv.save_get_invs.side_effect = lambda d, start, n: [
        (0, (1, 2, 3), i) for i in range(start, 700 - walk)][:n]
    return hv


@pytest.mark.parametrize("n_pages,walk", [(2100, 2100), (2100, 1500), (5, 5)])
def test_held_batches_give_the_plain_image_and_are_all_handed_back(mocker, n_pages, walk):
    released: List[int] = []
    asked: List[int] = []
    hv = _client(mocker, walk, released, asked)
    hv.save_get_invs.side_effect = lambda d, start, n: [
        (0, (1, 2, 3), i) for i in range(n_pages - walk)][start:start + n]
    w = TmemWriter(hv, 1, live=True)
    w.version = 1
    w.page_log = integrity.PageLog()
    out = io.BytesIO()
    sw = StreamWriter(out)
    pool = tc.PoolRecord(0, xen.POOL_PERSIST | 1 << xen.POOL_VERSION_SHIFT, n_pages, (0, 0))
    w._write_pages(sw, pool)
    sw.flush()
    body = out.getvalue()
    assert body[:walk * RS] == _records(0, walk)
    assert body[walk * RS:] == (tc.terminator(1) if walk < n_pages else b"")
    per = hv.save_pages_lending.return_value.batch_bytes // RS
    got = [min(n, max(0, walk - sum(asked[:i]))) for i, n in enumerate(asked)]
    # never more than a batch, never past the pages announced and not yet received
    assert all(n <= min(per, n_pages - sum(got[:i])) for i, n in enumerate(asked))
    assert 0 not in got[:-1]                    # no call after the walk's end
    assert sorted(released) == list(range(1, len(asked) + 1))    # each once
    want = integrity.PageLog()
    want.tmem(0, 1, _records(0, walk), walk, 4096)
    assert bytes(w.page_log.data) == bytes(want.data)
    hv.save_get_pages.assert_not_called()


def test_a_failed_write_still_hands_every_buffer_back(mocker):
    released: List[int] = []
    asked: List[int] = []
    hv = _client(mocker, 3000, released, asked)

    class Full(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, b) -> int:
            raise OSError(28, "No space left on device")

    w = TmemWriter(hv, 1, live=False)
    w.version = 1
    pool = tc.PoolRecord(0, xen.POOL_PERSIST | 1 << xen.POOL_VERSION_SHIFT, 3000, (0, 0))
    with pytest.raises(OSError, match="No space"):
        w._write_pages(StreamWriter(Full()), pool)
    # batch 1 written (failed), batches 2 and 3 asked (two requests queued behind it)
    assert asked == [1017, 1017, 3000 - 2 * 1017]
    assert sorted(released) == [1, 2, 3]


def test_a_held_batch_is_the_walks_and_its_connection_serves_no_one_meanwhile() -> None:
    client, p, state_dir = start_process()
    small = HypervisorClient(state_dir, buffer_size=1 << 20)   # 254 records a round trip
    try:
        src = client.create_domain({"name": "src", "memory": 1, "tmem": {"pools": [
            {"id": 0, "persistent": True, "bulk": {"pages": 600, "objects": 3, "seed": 5}}]}})
        assert client.save_begin(src, False)
        want_n, want = client.save_get_pages(src, 0, 600)
        client.save_end(src)
        assert small.save_begin(src, False)
        crcs = array("I", bytes(4 * 400))
        n1, v1, rel1 = small.save_get_pages_held(src, 0, 400, crcs=crcs)
        assert n1 == (1 << 20) // 4128 == 254               # what one buffer holds
        assert list(crcs[:n1]) == [crc32(want[i * 4124 + 28:(i + 1) * 4124]) for i in range(n1)]
        n2, v2, rel2 = small.save_get_pages_held(src, 0, 400)   # a second connection
        assert bytes(v1) + bytes(v2) == want[:(n1 + n2) * 4124]
        rel1()
        rel1()                                        # a second release is harmless
        n3, v3, rel3 = small.save_get_pages_held(src, 0, 400)   # the first one again
        rel2()
        rel3()
        assert n1 + n2 + n3 == want_n == 600 and len(small._all) == 2
        assert small.save_get_pages_held(src, 0, 10)[0] == 0
        with pytest.raises(Exception, match="not a positive count"):
            small.save_get_pages_held(src, 0, 0)
        small.save_end(src)
    finally:
        small.close()
        stop_process(client, p, state_dir)
