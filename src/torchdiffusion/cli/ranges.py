"""The integer-list syntax of --seeds and --labels: '0-63', '3', '0,5,9', '0-4,9'."""
from __future__ import annotations


def parse_int_ranges(text: str) -> list[int]:
    """Ranges and single integers separated by commas, in order; ValueError on anything else (a descending range
    included). Empty parts are ignored, so the result may be empty."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            a, b = (int(v) for v in part.split("-", 1))
            if b < a:
                raise ValueError(part)
            out.extend(range(a, b + 1))
        elif part:
            out.append(int(part))
    return out
