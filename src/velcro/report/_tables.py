"""Tables for the report and the sweep: one row model, rendered as Markdown or HTML."""

from __future__ import annotations

import html

from velcro import _format


class Cell(str):
    """A table cell's text with a tone: ``down`` (a drop: red, ▼), ``up`` (a gain) or none."""

    tone: str = ""

    def __new__(cls, text: str, tone: str = "") -> Cell:
        cell = super().__new__(cls, text)
        cell.tone = tone
        return cell


def pct(value: float | None, digits: int = 2) -> str:
    """``0.2773`` -> ``27.73%``; None -> an en dash."""
    return _format.percent(value, digits)


def points(value: float | None, digits: int = 2) -> Cell:
    """An accuracy change in signed percentage points (``−1.20 pp``), toned for HTML."""
    return Cell(_format.points(value, digits), _format.tone(value, digits))


def interval(ci: list[float] | tuple[float, float] | None) -> str:
    return "–" if not ci else f"[{pct(ci[0])}, {pct(ci[1])}]"


def count(value: int | float | None) -> str:
    if value is None:
        return "–"
    return f"{value:,}" if isinstance(value, int) else f"{value:,.2f}"


def tone_class(text: str) -> str:
    tone = getattr(text, "tone", "")
    return f" {tone}" if tone else ""


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
                f'<{tag} class="{"num" if a == "r" else "txt"}{tone_class(c)}">'
                f"{html.escape(c)}</{tag}>"
                for c, a in zip(row, self.align, strict=False))

        head = f"<thead><tr>{cells(self.header, 'th')}</tr></thead>"
        body = "".join(f"<tr>{cells(row, 'td')}</tr>" for row in self.rows)
        caption = f"<caption>{html.escape(self.title)}</caption>" if self.title else ""
        note = f'<p class="note">{html.escape(self.note)}</p>' if self.note else ""
        return f"<table>{caption}{head}<tbody>{body}</tbody></table>{note}"


_CHOSEN_ON = {"search": "search split", "validation": "validation (same images)"}


def _maximum_title(rows: list[dict]) -> str:
    where = {r.get("chosen_on", "validation") for r in rows}
    if where == {"search"}:
        return ("Maximum compression-saving ratio C at no top-1 loss on the search split, "
                "and validation top-1 there (held out: not used to choose)")
    if where == {"validation"}:
        return ("Maximum compression-saving ratio C at no top-1 loss on the validation "
                "images, chosen on those same images (as the papers did; not held out)")
    return "Maximum compression-saving ratio C at no top-1 loss (chosen where 'chosen on' says)"


def _gain(row: dict) -> tuple[str, str]:
    if row.get("gain") is None:
        return Cell("none"), "–"
    return points(row["gain"]), pct(row["saving_ratio"])


def sweep_tables(tables: dict[str, list[dict]]) -> list[Table]:
    """The papers' three tables from :meth:`velcro.report.sweep.Sweep.tables`."""
    rows = tables["max_saving_ratio"]
    maximum = Table(
        _maximum_title(rows),
        ["model", "task", "granularity", "method", "max C", "chosen on", "validation top-1",
         "uncompressed", "change", "zero share there", "setting"],
        [[r["model"], r["task"], r["granularity"], r["method"], pct(r["max_saving_ratio"]),
          _CHOSEN_ON.get(r.get("chosen_on", "validation"), "?"), pct(r["accuracy"]),
          pct(r["baseline_accuracy"]),
          points(r.get("change", r["accuracy"] - r["baseline_accuracy"])),
          pct(r["zero_share"]), "–" if r["setting"] is None else f"{r['setting']:g}"]
         for r in rows],
        "llllrlrrrrr",
        "setting: the uniform threshold T, or the search tolerance. change: validation top-1 "
        "at that point minus the uncompressed model's, on the same images.")
    zeros = Table(
        "Compressed elements whose constant is exactly zero",
        ["model", "task", "granularity", "min share", "max share", "plans"],
        [[r["model"], r["task"], r["granularity"], pct(r["min_zero_share"]),
          pct(r["max_zero_share"]), str(r["points"])] for r in tables["zero_share"]],
        "lllrrr")
    gains = Table(
        "Largest top-1 gain over the uncompressed model on the validation images, and the C "
        "where it happens (the best of all points on the same images: optimistic)",
        ["model", "task", "granularity", "method", "gain", "at C"],
        [[r["model"], r["task"], r["granularity"], r["method"], *_gain(r)]
         for r in tables["accuracy_gain"]],
        "llllrr",
        "none: no point is more accurate than the uncompressed model.")
    return [maximum, zeros, gains]


def sweep_tables_markdown(tables: dict[str, list[dict]]) -> str:
    return "\n\n".join(t.markdown() for t in sweep_tables(tables))
