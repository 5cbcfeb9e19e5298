"""Ways to damage a file, as a crash or a bad disk does: the damaged-state tests share them."""

from __future__ import annotations

from pathlib import Path


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip(path: Path, count: int = 1000) -> None:
    data = bytearray(path.read_bytes())
    start = len(data) // 3
    for i in range(start, start + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
