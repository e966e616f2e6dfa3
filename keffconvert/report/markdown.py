"""Markdown pieces the reports share: tables and short numbers."""


def human(n):
    """1234567 -> '1.23M'."""
    if n is None:
        return "?"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def markdown_table(columns, rows, right=()):
    """A GitHub Markdown table; the columns named in `right` are right-aligned."""
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("---:" if c in right else "---" for c in columns) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)
