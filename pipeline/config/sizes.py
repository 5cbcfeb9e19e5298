"""Memory sizes as people write them ("80GiB", "1.5 TB", 2**30) and as the planner prints them.

Kept beside the config (no torch import) because `cluster.device_memory` is validated here,
before anything heavy is loaded; the planner and the command line share the same parser.
"""

from __future__ import annotations

import math
import re

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | float | str) -> int:
    """Bytes from an int (bytes) or a string such as "80GiB", "80 GB", "512MiB", "1e9".

    GiB/MiB/KiB/TiB are powers of 1024, GB/MB/KB/TB (and G/M/K/T) powers of 1000, as on
    vendors' data sheets (an "80 GB" H100 has 80 GiB = 85.9e9 bytes: write 80GiB for it).
    Raises ValueError with the accepted forms; the caller names the key or flag.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as 80GiB or a number of bytes (got {value!r})")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        text = str(value)
        try:
            number, unit = float(text), ""  # "1e9", "85899345920"
        except ValueError:
            m = _SIZE.match(text)
            if not m or m.group(2).lower() not in _UNITS:
                raise ValueError(f"expected a size such as 80GiB, 512MiB or a number of bytes (got {value!r})"
                                 ) from None
            number, unit = float(m.group(1)), m.group(2).lower()
    if not math.isfinite(number):  # ("inf", "1e400": int() of it is an OverflowError, not one line)
        raise ValueError(f"a memory size must be a finite number of bytes (got {value!r})")
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"a memory size must be positive (got {value!r})")
    if not unit and size < 2**20:  # "80" meant 80 GiB: a device of less than 1 MiB is a unit left out
        raise ValueError(f"{value!r} with no unit is {size} bytes, less than 1 MiB: write the unit, e.g. "
                         f"{value}GiB or {value}GB")
    return size


def format_size(n: float) -> str:
    """Bytes as GiB above 1 GiB, else MiB (two decimals; a planner table reads in these units)."""
    if abs(n) >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB"
