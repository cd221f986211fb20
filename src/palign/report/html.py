"""One self-contained HTML page per run, sweep or reproduction: the markdown report (tables,
notes) rendered with Python-Markdown and every plot embedded as a base64 PNG, so the page can be
mailed or archived alone."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

import markdown

from palign.rundir import write_atomic

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f2f2f2; }
tbody tr:nth-child(even) { background: #fafafa; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""


def page(report: str, images: Sequence[Path], title: str) -> str:
    """The HTML of ``report`` (markdown) followed by ``images`` (PNG files), embedded."""
    body = markdown.markdown(report, extensions=["tables", "fenced_code"])
    figures = []
    for path in images:
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        name = html.escape(Path(path).name)
        figures.append(
            f'<figure><img alt="{name}" src="data:image/png;base64,{data}">'
            f"<figcaption>{name}</figcaption></figure>"
        )
    plots = "\n<h2>Plots</h2>\n" + "\n".join(figures) if figures else ""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n"
        f"<body>\n{body}\n{plots}\n</body></html>\n"
    )


def write_page(path: Path, report: str, images: Sequence[Path], title: str) -> Path:
    """Write :func:`page` to ``path`` atomically; returns ``path``."""
    write_atomic(path, page(report, images, title))
    return path
