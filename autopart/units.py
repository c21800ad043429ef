"""Parsing and printing of sizes, FLOP counts and durations.

Byte sizes follow IEC 80000-13: ``KB/MB/GB/TB`` are powers of 1000, ``KiB/MiB/GiB/TiB`` powers of 1024.
Device memory is printed in binary units, because allocators and ``nvidia-smi`` count in MiB.
"""

from __future__ import annotations

import math
import re

from autopart.errors import AutopartError

__all__ = ["format_bytes", "format_bytes_up", "format_flops", "format_seconds", "parse_bytes"]

_BYTE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")
_ACCEPTED = (
    "a number of bytes such as 1024, or a number with a unit: B, KB/MB/GB/TB (powers of 1000) or "
    "KiB/MiB/GiB/TiB (powers of 1024), e.g. 80GiB or '1.5 TB'"
)


def parse_bytes(text: str | int) -> int:
    """Bytes in ``text`` (``"80GiB"``, ``"1.5 GB"``, ``"1024"``); an ``int`` is returned as is."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise AutopartError(f"a size cannot be negative, got {text}; give {_ACCEPTED}")
        return text
    match = _SIZE.fullmatch(str(text))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _BYTE_UNITS:
        raise AutopartError(f"cannot read {text!r} as a size: give {_ACCEPTED}")
    return round(float(match.group(1)) * _BYTE_UNITS[unit])


def format_bytes(nbytes: int | float) -> str:
    """``1536 * 2**20`` -> ``"1.50 GiB"``; below 1 KiB, whole bytes (``"512 B"``)."""
    if abs(nbytes) < 1024:
        return f"{nbytes:.0f} B"
    value = float(nbytes)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if abs(value) < 1024 or unit == "TiB":
            break
    return f"{value:.2f} {unit}"


def format_bytes_up(nbytes: int | float) -> str:
    """:func:`format_bytes` rounded up, not to the nearest: a need it names is enough as a limit
    (``403 MiB`` -> ``"403.00 MiB"``, ``(1 << 30) + 1`` -> ``"1.01 GiB"``)."""
    if abs(nbytes) < 1024:
        return f"{math.ceil(nbytes):.0f} B"
    value = float(nbytes)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if abs(value) < 1024 or unit == "TiB":
            break
    return f"{math.ceil(value * 100 - 1e-9) / 100:.2f} {unit}"


def format_flops(flops: int | float) -> str:
    """``3.2e9`` -> ``"3.2 GFLOP"`` (three significant digits, decimal prefixes)."""
    return _decimal(flops, ("", "k", "M", "G", "T", "P", "E")) + "FLOP"


def format_seconds(seconds: float) -> str:
    """``0.0123`` -> ``"12.3 ms"``; three significant digits from ns to s, whole seconds above 1000 s."""
    if seconds == 0:
        return "0 s"
    if abs(seconds) >= 999.5:
        return f"{seconds:.0f} s"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if abs(seconds) >= scale * 0.9995:  # a value that rounds to 1000 of the next unit
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def _decimal(value: float, prefixes: tuple[str, ...]) -> str:
    """Three significant digits and the largest decimal prefix that keeps the mantissa >= 1."""
    scaled, i = float(value), 0
    while abs(scaled) >= 999.5 and i < len(prefixes) - 1:
        scaled /= 1000
        i += 1
    return f"{scaled:.3g} {prefixes[i]}"
