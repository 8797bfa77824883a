"""Image files for tests that a real camera would not make cheaply."""

from __future__ import annotations

import struct
import zlib


def declared_png(width: int, height: int) -> bytes:
    """A grayscale PNG that declares width x height but holds one row: what an image too
    large to decode looks like to a decoder, without its gigabytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(width + 1)))
        + chunk(b"IEND", b"")
    )
