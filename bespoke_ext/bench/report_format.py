"""How the report writes numbers and tables: one place for the formats of REPORT.md and the README section."""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

__all__ = ["as_number", "fmt_blank", "fmt_g", "fmt_ms", "fmt_s", "fmt_x", "md_table", "met_status", "machine_line",
           "quick_mark", "shape_label"]


def as_number(value) -> Optional[float]:
    """Numbers as written by the results files ("inf"/"nan" strings included), else None."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def fmt_g(value, digits: int = 3) -> str:
    """``digits`` significant digits; "-" for a missing value, "inf" for an infinite one."""
    v = as_number(value)
    if v is None:
        return "-"
    if math.isinf(v):
        return "inf"
    return f"{v:.{digits}g}"


def fmt_ms(seconds) -> str:
    """Seconds as milliseconds."""
    v = as_number(seconds)
    return "-" if v is None else (f"{v * 1e3:.3g}" if v < 1 else f"{v * 1e3:.0f}")


def fmt_s(seconds) -> str:
    """Seconds, no decimals from 100 s on."""
    v = as_number(seconds)
    return "-" if v is None else (f"{v:.0f}" if v >= 100 else f"{v:.3g}")


def fmt_x(value) -> str:
    """A ratio, as "1.23x"."""
    v = as_number(value)
    return "-" if v is None else f"{v:.2f}x"


def fmt_blank(value) -> str:
    """A value as written, blank when missing (the kernel tables' cells)."""
    return "" if value is None else str(value)


def shape_label(shape: Sequence[int]) -> str:
    """A tensor shape as "4096x2"."""
    return "x".join(map(str, shape))


def md_table(head: Sequence[str], rows: Sequence[Sequence[str]], align: Optional[str] = None) -> List[str]:
    """A markdown table's lines; ``align`` has one "l" or "r" per column (default: first left, rest right)."""
    align = align or ("l" + "r" * (len(head) - 1))
    marks = ["---" if a == "l" else "---:" for a in align]
    return ["| " + " | ".join(head) + " |", "|" + "|".join(marks) + "|", *("| " + " | ".join(r) + " |" for r in rows)]


def met_status(met) -> str:
    return "met" if met else "**missed**"


def machine_line(m: dict) -> str:
    """One line naming the machine of a ``bespoke-ext bench`` results file."""
    info = m.get("machine", {})
    return (f"{info.get('cpu', '?')}, {info.get('cpu_count', '?')} cores, torch {info.get('torch', '?')}, "
            f"Python {info.get('python', '?')}")


def quick_mark(section: dict) -> str:
    """The warning a heading gets when its section comes from a quick (smoke-test) run."""
    return " (quick run: smoke-test settings, the numbers are not meaningful)" if section.get("quick") else ""
