"""CRC32 for the page checksums (the integrity sidecar, the hypervisor's
``save_get_pages(crcs=)`` / ``restore_put_pages(crcs=)`` / ``ram_page_crcs``)
and for the relocation stream's ``crc32-frames``.

The same function as ``zlib.crc32`` (polynomial, values and the optional
running ``value`` argument alike), so images and sidecars are unchanged. ISA-L's
implementation (package ``isal``, extra ``fast``) is used when installed: it
folds with carry-less multiplies and takes ~0.36 us per 4 KiB page where zlib
1.2 takes ~1.5 us; a save or restore of a 1.5 GiB image checksums ~400 000
pages, so that is ~0.45 s of CPU per operation on a two-core host where the
copy competes for the same cores (benchmarks/README.md, seam benchmark).
"""
from __future__ import annotations

try:                                    # pragma: no cover - depends on what is installed
    from isal.isal_zlib import crc32
    IMPLEMENTATION = "isal"
except ImportError:                     # pragma: no cover
    from zlib import crc32
    IMPLEMENTATION = "zlib"

__all__ = ["crc32", "IMPLEMENTATION"]
