"""The README's capability table, generated from :func:`genprog.models.capabilities`.

Run ``python -m genprog.models.table`` to print it as Markdown.
"""

from __future__ import annotations

from .base import capabilities


def markdown_table() -> str:
    """The capability table as a Markdown table (one row per class)."""
    table = capabilities()
    header = "| model | " + " | ".join(table.columns) + " |"
    rule = "|---" * (len(table.columns) + 1) + "|"
    rows = ["| " + " | ".join([str(name), *map(str, row)]) + " |"
            for name, row in zip(table.index, table.to_numpy())]
    return "\n".join([header, rule, *rows])


if __name__ == "__main__":
    print(markdown_table())
