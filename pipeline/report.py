"""A workflow's run report: one self-contained HTML page of figures, tables, metrics and timings."""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.storage import atomic_path

if TYPE_CHECKING:
    from pipeline.workflow import Workflow

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222}
h1{font-size:1.6em}
h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:.85em;color:#555}.missing{color:#a33}pre{background:#f6f6f6;padding:.6em}
"""


def markdown_to_html(text: str) -> str:
    """Pipe tables, headings and paragraphs of a small Markdown file as HTML.

    Enough for the tables this project writes.
    """
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        if line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                rows.append(lines[i].strip().strip("|").split("|"))
                i += 1
            body = [r for r in rows if not all(re.fullmatch(r"\s*:?-+:?\s*", c) for c in r)]
            if body:
                head, *rest = body
                out.append(
                    "<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>"
                )
                for r in rest:
                    out.append("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>")
                out.append("</table>")
            continue
        m = re.match(r"(#{1,6})\s+(.*)", line)
        if m:
            level = min(6, len(m.group(1)) + 2)
            out.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
        elif line.startswith("```"):
            block = []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                block.append(lines[i])
                i += 1
            out.append("<pre>" + html.escape("\n".join(block)) + "</pre>")
        elif line:
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    return "\n".join(out)


def _inline(text: str) -> str:
    s = html.escape(text.strip())
    s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", s)


def _figure(path: Path) -> str:
    if not path.is_file():
        return f'<p class="missing">figure not found: {html.escape(str(path))}</p>'
    data = base64.b64encode(path.read_bytes()).decode()
    mime = "image/png" if path.suffix.lower() == ".png" else "image/jpeg"
    return (
        f'<figure><img alt="{html.escape(path.name)}" src="data:{mime};base64,{data}">'
        f"<figcaption>{html.escape(str(path))}</figcaption></figure>"
    )


def _metrics(path: Path) -> str:
    if not path.is_file():
        return f'<p class="missing">metrics not found: {html.escape(str(path))}</p>'
    data = json.loads(path.read_text())
    rows = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v))}</td></tr>"
        for k, v in _flatten(data).items()
    )
    return (
        f"<h3>{html.escape(str(path))}</h3>"
        f"<table><tr><th>metric</th><th>value</th></tr>{rows}</table>"
    )


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): data}


def _fmt(v: Any) -> str:
    return (
        f"{v:.4g}"
        if isinstance(v, float)
        else json.dumps(v)
        if isinstance(v, (list, dict))
        else str(v)
    )


def render_report(wf: Workflow, state: dict[str, Any]) -> str:
    """The report page as a string (figures embedded, so the page stands alone)."""
    spec = wf.report
    assert spec is not None
    title = spec.title or f"aurora-pipeline run report: {wf.name}"
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if wf.description:
        parts.append(f"<p>{html.escape(wf.description)}</p>")
    parts.append(
        f"<p>Last run finished {html.escape(str(state.get('last_run_utc', 'never')))}.</p>"
    )
    parts.append("<h2>Stages</h2><table><tr><th>stage</th><th>command</th><th>seconds</th>")
    parts.append("<th>finished (UTC)</th></tr>")
    for st in wf.stages:
        rec = state.get("stages", {}).get(st.name, {})
        parts.append(
            f"<tr><td>{html.escape(st.name)}</td><td>{html.escape(st.command)}</td>"
            f"<td>{rec.get('seconds', '')}</td>"
            f"<td>{html.escape(str(rec.get('finished_utc', '')))}</td></tr>"
        )
    parts.append("</table>")
    if spec.figures:
        parts.append("<h2>Figures</h2>")
        parts += [_figure(Path(p)) for p in spec.figures]
    if spec.tables:
        parts.append("<h2>Tables</h2>")
        for p in map(Path, spec.tables):
            if p.is_file():
                parts.append(f"<h3>{html.escape(str(p))}</h3>" + markdown_to_html(p.read_text()))
            else:
                parts.append(f'<p class="missing">table not found: {html.escape(str(p))}</p>')
    if spec.metrics:
        parts.append("<h2>Metrics</h2>")
        parts += [_metrics(Path(p)) for p in spec.metrics]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(wf: Workflow, state: dict[str, Any], path: str | Path) -> Path:
    """Write the report page atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(render_report(wf, state), encoding="utf-8")
    return Path(path)
