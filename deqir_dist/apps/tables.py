"""Plain aligned text tables for the terminal."""
from __future__ import annotations


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain aligned text table (missing cells blank)."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
        return "" if v is None else str(v)
    grid = [columns] + [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in grid) for i in range(len(columns))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in grid]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
