"""Headless Chromium for the tests that look at the HTML report, and a PNG reader (zlib
and struct: no imaging library) that tells a drawn page from a blank one."""

from __future__ import annotations

import shutil
import struct
import subprocess
import zlib
from collections import Counter
from pathlib import Path

import pytest

needs_chromium = pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="needs chromium (the Debian package; scripts/test.sh installs it)",
)


def chromium(page: Path, profile: Path, *args: str) -> str:
    """Run headless Chromium on a local page, never reaching the network; its stdout."""
    return subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            *args,
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout


def dump_dom(page: Path, profile: Path) -> str:
    """The page's DOM as Chromium built it."""
    return chromium(page, profile, "--dump-dom")


def screenshot(page: Path, png: Path, profile: Path, size: tuple[int, int] = (1400, 1000)) -> None:
    """A PNG of the page's first ``size`` pixels, in sRGB so that CSS colours stay exact."""
    chromium(
        page,
        profile,
        f"--screenshot={png}",
        f"--window-size={size[0]},{size[1]}",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        "--force-color-profile=srgb",
    )


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def png_colours(path: Path) -> Counter[str]:
    """How many pixels of each colour (``#rrggbb``, alpha dropped) an 8-bit RGB or RGBA,
    non-interlaced PNG holds: what Chromium writes."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path}: not a PNG"
    offset, header, idat = 8, b"", bytearray()
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        body = data[offset + 8 : offset + 8 + length]
        offset += 12 + length
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and colour in (2, 6) and interlace == 0, (depth, colour, interlace)
    bpp = 4 if colour == 6 else 3
    stride = width * bpp
    raw = zlib.decompress(bytes(idat))
    previous = bytearray(stride)
    found: Counter[str] = Counter()
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        if kind == 1:  # Sub
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif kind == 2:  # Up
            line = bytearray((x + p) & 0xFF for x, p in zip(line, previous, strict=True))
        elif kind == 3:  # Average
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + previous[i]) >> 1)) & 0xFF
        elif kind == 4:  # Paeth
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                corner = previous[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + _paeth(left, previous[i], corner)) & 0xFF
        found.update(line[i : i + 3].hex() for i in range(0, stride, bpp))
        previous = line
    return Counter({f"#{k}": n for k, n in found.items()})
