"""The report's page: one self-contained HTML file (inline CSS, images as data URIs)."""

from __future__ import annotations

import base64
import html

from velcro.report._tables import Table, tone_class

CSS = """
:root { --ink: #1d2430; --muted: #5d6675; --rule: #d9dee6; --accent: #1f5fa8; }
* { box-sizing: border-box; }
body { margin: 0; background: #f4f6f9; color: var(--ink);
       font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1100px; margin: 0 auto; padding: 28px 32px 48px; background: #fff;
       min-height: 100vh; box-shadow: 0 0 24px rgba(0,0,0,.06); }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 34px 0 10px; padding-bottom: 4px;
     border-bottom: 2px solid var(--rule); }
.subtitle { color: var(--muted); margin: 0 0 18px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 16px 0 8px; }
.card { flex: 1 1 160px; border: 1px solid var(--rule); border-radius: 8px; padding: 10px 14px; }
.card .label { color: var(--muted); font-size: 12px; text-transform: uppercase;
               letter-spacing: .04em; }
.card .value { font-size: 22px; font-weight: 600; color: var(--accent); }
table { border-collapse: collapse; margin: 10px 0 6px; font-size: 14px; width: auto;
        max-width: 100%; }
caption { text-align: left; font-weight: 600; padding: 4px 0 6px; }
th, td { padding: 5px 12px; border-bottom: 1px solid var(--rule); }
th { background: #eef2f7; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.txt, th.txt { text-align: left; }
tbody tr:nth-child(even) { background: #fafbfd; }
figure { margin: 14px 0; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--rule); border-radius: 6px; }
figcaption { color: var(--muted); font-size: 13px; }
.note { color: var(--muted); font-size: 13px; margin: 2px 0 12px; }
.scroll { max-height: 420px; overflow-y: auto; border: 1px solid var(--rule); }
.scroll table { margin: 0; width: 100%; }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; }
.down, .card .value.down { color: #b42318; }
.down::before { content: "\\25BC\\00A0"; font-size: .8em; }
.up, .card .value.up { color: #067647; }
.up::before { content: "\\25B2\\00A0"; font-size: .8em; }
"""


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def page(title: str, subtitle: str, cards: list[tuple[str, str]],
         sections: list[tuple[str, list]], footer: str) -> str:
    """Sections are (heading, parts); a part is a Table, ("figure", png, caption),
    ("scroll", Table) or ("note", text)."""
    out = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>", f"<style>{CSS}</style>", "</head>",
        "<body><main>", f"<h1>{html.escape(title)}</h1>",
        f'<p class="subtitle">{html.escape(subtitle)}</p>', '<div class="cards">',
    ]
    for label, value in cards:
        out.append(f'<div class="card"><div class="label">{html.escape(label)}</div>'
                   f'<div class="value{tone_class(value)}">{html.escape(value)}</div></div>')
    out.append("</div>")
    for heading, parts in sections:
        out.append(f"<section><h2>{html.escape(heading)}</h2>")
        for part in parts:
            if isinstance(part, Table):
                out.append(part.html())
            elif part[0] == "figure":
                png, caption = part[1], part[2]
                out.append(f'<figure><img src="{data_uri(png)}" alt="{html.escape(caption)}">'
                           f"<figcaption>{html.escape(caption)}</figcaption></figure>")
            elif part[0] == "scroll":
                out.append(f'<div class="scroll">{part[1].html()}</div>')
            elif part[0] == "note":
                out.append(f'<p class="note{tone_class(part[1])}">{html.escape(part[1])}</p>')
        out.append("</section>")
    out.append(f"<footer>{html.escape(footer)}</footer></main></body></html>")
    return "\n".join(out) + "\n"
