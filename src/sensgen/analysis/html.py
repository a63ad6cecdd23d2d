"""HTML building blocks of the report: escaped tables (sortable), figures, the page shell.

Self-contained: the stylesheet and the few lines of table-sorting script are inline, so the
page works offline from a file:// URL with no CDN. Strings are escaped once, here.

Example:
    >>> import pandas as pd
    >>> table = html_table(pd.DataFrame({"a": [2.0, 10.0]}), ["a"], {}, "t", sortable=True)
    >>> 'data-v="10"' in table and 'class="sortable"' in table
    True
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from sensgen.analysis.numbers import significant

CSS = """\
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       max-width: 1200px; margin: 2em auto; padding: 0 1em; line-height: 1.45; }
h1 { font-size: 1.7em; margin-bottom: 0.2em; overflow-wrap: anywhere; }
h2 { margin-top: 1.8em; font-size: 1.3em; }
p.lead { max-width: 60em; } code { overflow-wrap: anywhere; } .muted { color: #666; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { padding: 0.25em 0.7em; border-bottom: 1px solid #e3e3e3; text-align: right; }
th { background: #f3f5f7; position: sticky; top: 0; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th[aria-sort="ascending"]::after { content: " ▲"; }
table.sortable th[aria-sort="descending"]::after { content: " ▼"; }
td.text, th.text { text-align: left; } tr:nth-child(even) td { background: #fafbfc; }
.scroll { overflow-x: auto; max-height: 40em; overflow-y: auto; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; height: auto;
         border: 1px solid #eee; } figcaption { color: #555; font-size: 0.95em; max-width: 60em; }
.holds { color: #05704a; font-weight: 600; } .fails { color: #b3261e; font-weight: 600; }
.open { color: #666; font-weight: 600; }
.banner { background: #fff4e5; border-left: 4px solid #e69f00; padding: 0.6em 1em;
          max-width: 60em; }
"""

# Click a header of a table.sortable to sort by it (numbers by data-v, text otherwise).
SORT_SCRIPT = """\
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var up = th.getAttribute("aria-sort") !== "ascending";
      table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", up ? "ascending" : "descending");
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      function key(row) {
        var cell = row.cells[col], v = cell.getAttribute("data-v");
        return v === null ? cell.textContent : parseFloat(v);
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (typeof x === "number" && isNaN(x)) return 1;
        if (typeof y === "number" && isNaN(y)) return -1;
        var c = typeof x === "number" ? x - y : String(x).localeCompare(String(y));
        return up ? c : -c;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


def esc(text: Any) -> str:
    """HTML-escaped text (quotes too, so it is safe in attributes)."""
    return html.escape(str(text), quote=True)


def format_cell(value: Any) -> str:
    """Compact text for one cell: 4 significant digits, blank for missing.

    A float that 4 digits would round onto a whole number it is not gets the digits that
    tell them apart (`numbers.significant`): a train accuracy of 0.99996 shows as
    "0.99996", never "1" beside a 100% inclusion rule.
    """
    if value is None or value is pd.NA:
        return ""
    if isinstance(value, float | np.floating):
        return "" if math.isnan(value) else significant(value)
    return str(value)


def is_text(values: pd.Series) -> bool:
    """True for string-like columns."""
    return not (pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values))


def html_table(
    frame: pd.DataFrame,
    columns: Iterable[str],
    headers: dict[str, str],
    table_id: str,
    *,
    sortable: bool = False,
) -> str:
    """An escaped HTML table; text left-aligned, numbers right-aligned (with their full
    value in ``data-v`` for sorting when ``sortable``)."""
    columns = list(columns)
    text = {name for name in columns if is_text(frame[name])}
    head = "".join(
        f"<th{_cls(name in text)}>{esc(headers.get(name, name))}</th>" for name in columns
    )
    rows = []
    for record in frame[columns].itertuples(index=False):
        cells = "".join(
            _cell(value, name in text, sortable)
            for name, value in zip(columns, record, strict=True)
        )
        rows.append(f"<tr>{cells}</tr>")
    kind = ' class="sortable"' if sortable else ""
    return (
        f'<table id="{esc(table_id)}"{kind}><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def figure_html(name: str, caption: str) -> str:
    """A figure with its PNG, a caption and a link to the SVG beside it."""
    return (
        f'<figure><img src="{esc(name)}.png" alt="{esc(caption)}">'
        f'<figcaption>{esc(caption)} <a href="{esc(name)}.svg">SVG</a></figcaption></figure>'
    )


def document(title: str, body: str) -> str:
    """A complete HTML5 document with the inline stylesheet and sorting script."""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>\n{CSS}</style>\n</head>\n"
        f"<body>\n{body}\n<script>\n{SORT_SCRIPT}</script>\n</body>\n</html>\n"
    )


def _cell(value: Any, text: bool, sortable: bool) -> str:
    shown = esc(format_cell(value))
    if text or not sortable:
        return f"<td{_cls(text)}>{shown}</td>"
    number = _number(value)
    return f'<td data-v="{number}">{shown}</td>'


def _number(value: Any) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "NaN"
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):  # JavaScript's parseFloat reads "Infinity", not Python's "inf"
        return "Infinity" if number > 0 else "-Infinity"
    return repr(number).removesuffix(".0")


def _cls(text: bool) -> str:
    return ' class="text"' if text else ""
