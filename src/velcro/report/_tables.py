"""Tables for the report and the sweep: one row model, rendered as Markdown or HTML."""

from __future__ import annotations

import html


def pct(value: float | None, digits: int = 2) -> str:
    """``0.2773`` -> ``27.73%``; None -> an en dash."""
    return "–" if value is None else f"{100 * value:.{digits}f}%"


def points(value: float | None, digits: int = 2) -> str:
    """An accuracy difference in percentage points, signed."""
    return "–" if value is None else f"{100 * value:+.{digits}f} pp"


def interval(ci: list[float] | tuple[float, float] | None) -> str:
    return "–" if not ci else f"[{pct(ci[0])}, {pct(ci[1])}]"


def count(value: int | float | None) -> str:
    if value is None:
        return "–"
    return f"{value:,}" if isinstance(value, int) else f"{value:,.2f}"


class Table:
    """A titled table of strings; ``align`` per column: ``l`` or ``r``."""

    def __init__(self, title: str, header: list[str], rows: list[list[str]],
                 align: str | None = None, note: str = "") -> None:
        self.title = title
        self.header = header
        self.rows = rows
        self.align = align or "l" + "r" * (len(header) - 1)
        self.note = note

    def markdown(self) -> str:
        rule = ["---:" if a == "r" else "---" for a in self.align]
        lines = [f"| {' | '.join(self.header)} |", f"|{'|'.join(rule)}|"]
        lines += [f"| {' | '.join(cell.replace('|', '/') for cell in row)} |"
                  for row in self.rows]
        text = "\n".join(lines)
        if self.note:
            text += f"\n\n{self.note}"
        return f"**{self.title}**\n\n{text}" if self.title else text

    def html(self) -> str:
        def cells(row, tag):
            return "".join(
                f'<{tag} class="{"num" if a == "r" else "txt"}">{html.escape(c)}</{tag}>'
                for c, a in zip(row, self.align, strict=False))

        head = f"<thead><tr>{cells(self.header, 'th')}</tr></thead>"
        body = "".join(f"<tr>{cells(row, 'td')}</tr>" for row in self.rows)
        caption = f"<caption>{html.escape(self.title)}</caption>" if self.title else ""
        note = f'<p class="note">{html.escape(self.note)}</p>' if self.note else ""
        return f"<table>{caption}{head}<tbody>{body}</tbody></table>{note}"


def sweep_tables(tables: dict[str, list[dict]]) -> list[Table]:
    """The papers' three tables from :meth:`velcro.report.sweep.Sweep.tables`."""
    maximum = Table(
        "Maximum compression-saving ratio C at no accuracy loss (validation top-1)",
        ["model", "task", "granularity", "method", "max C", "top-1 there", "uncompressed",
         "zero share there", "setting"],
        [[r["model"], r["task"], r["granularity"], r["method"], pct(r["max_saving_ratio"]),
          pct(r["accuracy"]), pct(r["baseline_accuracy"]), pct(r["zero_share"]),
          "–" if r["setting"] is None else f"{r['setting']:g}"]
         for r in tables["max_saving_ratio"]],
        "llllrrrrr",
        "setting: the uniform threshold T, or the search tolerance.")
    zeros = Table(
        "Compressed elements whose constant is exactly zero",
        ["model", "task", "granularity", "min share", "max share", "plans"],
        [[r["model"], r["task"], r["granularity"], pct(r["min_zero_share"]),
          pct(r["max_zero_share"]), str(r["points"])] for r in tables["zero_share"]],
        "lllrrr")
    gains = Table(
        "Largest top-1 gain over the uncompressed model, and the C where it happens",
        ["model", "task", "granularity", "method", "gain", "at C"],
        [[r["model"], r["task"], r["granularity"], r["method"], points(r["gain"]),
          pct(r["saving_ratio"])] for r in tables["accuracy_gain"]],
        "llllrr")
    return [maximum, zeros, gains]


def sweep_tables_markdown(tables: dict[str, list[dict]]) -> str:
    return "\n\n".join(t.markdown() for t in sweep_tables(tables))
