"""The page map: guest-physical memory coloured by what the host can read, as a PNG.

One cell per 4 KiB page, 32 pages a row, in address order (row 0 starts at GPA 0).
A page is classified from the bytes the host reads (``Vm.read``: the memory slot):

* ``zero``        -- all zero bytes (never written, or written with zeros in the clear);
* ``ciphertext``  -- its non-zero 16-byte blocks look random (:func:`looks_encrypted`:
                     4 KiB of AES output measures ~7.95 bits per byte; code, text and
                     page tables stay below ~6 and have zero bytes or no high bytes);
* ``plaintext``   -- anything else, in a guest without memory encryption;
* ``shared``      -- anything else, in an SEV or SEV-ES guest: readable bytes in an
                     encrypted guest are pages the guest shares (C-bit clear), such as
                     the GHCB or a bounce buffer.

The PNG is written with ``zlib`` and ``struct`` only (RGB, 8 bits, filter 0): no
imaging dependency.  A legend strip at the bottom shows the four colours in the
order above.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections import Counter

PAGE = 4096
COLUMNS = 32
CELL = 14  # pixels per page cell, plus a 1-pixel grid line
CATEGORIES = ("zero", "ciphertext", "plaintext", "shared")
COLOURS = {
    "zero": (235, 235, 235),       # light grey
    "ciphertext": (40, 40, 120),   # dark blue: unreadable
    "plaintext": (220, 60, 40),    # red: the host reads it
    "shared": (240, 170, 30),      # amber: readable on purpose
}
GRID = (255, 255, 255)
ENTROPY_CIPHERTEXT = 7.0


def entropy(data: bytes) -> float:
    """Shannon entropy of the bytes, in bits per byte."""
    if not data:
        return 0.0
    n = len(data)
    return -sum(c / n * math.log2(c / n) for c in Counter(data).values())


def looks_encrypted(data: bytes) -> bool:
    """Whether the non-zero 16-byte blocks of ``data`` look like AES output.

    All-zero blocks are left out first (a page the launch or the guest filled only
    partly is ciphertext next to never-written zeros).  Then: almost no zero bytes,
    about half the bytes >= 0x80 (text has none), and an entropy near the maximum for
    that many bytes (at least 7.0 bits, or log2(n) - 0.5 for fewer than ~180 bytes).
    """
    blocks = b"".join(data[i:i + 16] for i in range(0, len(data), 16) if any(data[i:i + 16]))
    n = len(blocks)
    if n == 0:
        return False
    high = sum(1 for b in blocks if b >= 0x80) / n
    spread = (0.3, 0.7) if n >= 64 else (0.2, 0.8)  # one block: binomial noise
    return (blocks.count(0) <= max(1, n // 32) and spread[0] <= high <= spread[1]
            and entropy(blocks) >= min(ENTROPY_CIPHERTEXT, math.log2(n) - 0.5))


def classify_page(data: bytes, encrypted: bool) -> str:
    """One of :data:`CATEGORIES` for one page as the host reads it."""
    if not any(data):
        return "zero"
    if looks_encrypted(data):
        return "ciphertext"
    return "shared" if encrypted else "plaintext"


def classify_memory(memory: bytes, encrypted: bool) -> list[str]:
    """The category of every 4 KiB page of ``memory`` (guest-physical from 0)."""
    return [classify_page(memory[i:i + PAGE], encrypted) for i in range(0, len(memory), PAGE)]


def _png(width: int, height: int, rows: list[bytes]) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    raw = b"".join(b"\x00" + r for r in rows)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def render(categories: list[str], *, columns: int = COLUMNS, cell: int = CELL) -> bytes:
    """The PNG bytes of a page map (one cell per page, a legend strip below)."""
    pages = len(categories)
    rows_of_cells = max(1, -(-pages // columns))
    width = columns * (cell + 1) + 1
    legend_h = cell + 2
    height = rows_of_cells * (cell + 1) + 1 + legend_h
    pixels = [bytearray(GRID * width) for _ in range(height)]
    for i, cat in enumerate(categories):
        r, c = divmod(i, columns)
        colour = bytes(COLOURS[cat])
        y0, x0 = 1 + r * (cell + 1), 1 + c * (cell + 1)
        for y in range(y0, y0 + cell):
            pixels[y][3 * x0:3 * (x0 + cell)] = colour * cell
    y0 = rows_of_cells * (cell + 1) + 2
    for j, cat in enumerate(CATEGORIES):
        x0 = 1 + j * 4 * (cell + 1)
        for y in range(y0, min(height, y0 + cell)):
            pixels[y][3 * x0:3 * (x0 + 3 * cell)] = bytes(COLOURS[cat]) * (3 * cell)
    return _png(width, height, [bytes(p) for p in pixels])


def read_png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR (for tests and reports)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    return struct.unpack(">II", data[16:24])


def decode_png_rgb(data: bytes) -> list[bytes]:
    """Rows of RGB bytes of a PNG this module wrote (filter 0 only; for tests)."""
    width, height = read_png_size(data)
    pos, idat = 8, b""
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + n]
        pos += 12 + n
    raw = zlib.decompress(idat)
    stride = 1 + 3 * width
    return [raw[y * stride + 1:(y + 1) * stride] for y in range(height)]


def cell_colour(png: bytes, page: int, *, columns: int = COLUMNS, cell: int = CELL) -> tuple:
    """The colour of page ``page``'s cell in a rendered map (for tests)."""
    rows = decode_png_rgb(png)
    r, c = divmod(page, columns)
    y, x = 1 + r * (cell + 1) + cell // 2, 1 + c * (cell + 1) + cell // 2
    return tuple(rows[y][3 * x:3 * x + 3])
