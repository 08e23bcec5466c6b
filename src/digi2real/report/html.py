"""Small HTML building blocks for the self-contained report page.

Everything is inline: one ``<style>`` block, images as ``data:image/png;base64`` URIs, no script, no font, no link to
anything outside the file, so the page opens from disk anywhere (a cluster login node, an e-mail attachment, offline).
Every piece of text that comes from an artifact goes through :func:`esc`.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

CSS = """
:root { --fg: #1d2430; --muted: #5c6675; --line: #d9dee5; --bg: #ffffff; --soft: #f4f6f9; --accent: #2b5d9b;
        --warn: #8a5a00; --warnbg: #fff6e0; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--fg); background: var(--bg); }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 60px; }
header.top { border-bottom: 2px solid var(--accent); margin-bottom: 18px; padding-bottom: 10px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 34px 0 10px; padding-top: 8px; border-top: 1px solid var(--line); color: var(--accent); }
h3 { font-size: 15px; margin: 18px 0 6px; }
p.meta, p.caption { color: var(--muted); margin: 4px 0 10px; }
nav.toc ol { margin: 6px 0; padding-left: 22px; columns: 2; }
nav.toc a { color: var(--accent); text-decoration: none; }
table { border-collapse: collapse; margin: 8px 0 14px; font-size: 13px; }
th, td { border: 1px solid var(--line); padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: var(--soft); font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.paper td { color: var(--muted); font-style: italic; }
tr.ours td { font-weight: 600; }
pre { background: var(--soft); border: 1px solid var(--line); padding: 10px; overflow: auto; max-height: 460px;
      font-size: 12px; line-height: 1.35; }
details summary { cursor: pointer; color: var(--accent); margin: 6px 0; }
.na { background: var(--warnbg); color: var(--warn); border-left: 4px solid #e0a100; padding: 6px 10px; margin: 8px 0; }
figure { margin: 10px 0 16px; }
figure img.plot { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: 12px; margin-top: 4px; }
.ident { display: flex; gap: 14px; align-items: flex-start; padding: 8px 0; border-bottom: 1px dashed var(--line); }
.ident .label { width: 130px; flex: none; font-weight: 600; word-break: break-all; }
.ident .label span { display: block; font-weight: 400; color: var(--muted); font-size: 12px; }
.strip { display: flex; flex-wrap: wrap; gap: 4px; }
.strip h4 { width: 100%; margin: 0; font-size: 12px; color: var(--muted); font-weight: 600; }
.tile { margin: 0; text-align: center; font-size: 11px; color: var(--muted); }
.tile img { display: block; width: 96px; height: 96px; image-rendering: auto; border: 1px solid var(--line); }
.side { flex: 1 1 0; min-width: 0; }
.pair { display: flex; gap: 2px; padding: 2px; border: 1px solid var(--line); border-radius: 3px; }
.side + .side { border-left: 3px solid var(--line); padding-left: 12px; }
.ok { color: #1d7a3a; font-weight: 600; }
.bad { color: #a4262c; font-weight: 600; }
"""


def esc(value: Any) -> str:
    """Text of any value, HTML-escaped (quotes included, so it is safe in attributes too)."""
    return html.escape("" if value is None else str(value), quote=True)


def fmt(value: Any, digits: int = 3) -> str:
    """A number as short text (integers as they are, floats with ``digits`` significant decimals); '-' for None."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if v != v:
            return "-"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.{digits}g}"
        return f"{v:.{digits}f}"
    return str(value)


def png_uri(data: bytes) -> str:
    """A ``data:`` URI of PNG bytes (the only kind of image the page holds)."""
    if not data.startswith(PNG_MAGIC):
        raise ValueError("png_uri expects PNG bytes")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def array_png(rgb: np.ndarray, max_side: int | None = None) -> bytes:
    """PNG bytes of an RGB uint8 image, shrunk (aspect kept) so that its longer side is at most ``max_side``."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    if max_side is not None and max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def as_png(data: bytes) -> bytes:
    """PNG bytes as they are; any other image format PIL reads is re-encoded as PNG (the page holds no JPEG)."""
    if data.startswith(PNG_MAGIC):
        return data
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return array_png(np.asarray(img.convert("RGB")))


def img(data: bytes, alt: str, cls: str = "plot", title: str | None = None) -> str:
    t = f' title="{esc(title)}"' if title else ""
    return f'<img class="{esc(cls)}" alt="{esc(alt)}"{t} src="{png_uri(data)}">'


def figure(data: bytes, alt: str, caption: str = "") -> str:
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f"<figure>{img(data, alt)}{cap}</figure>"


def not_available(why: str) -> str:
    """The note a section shows instead of what it could not make."""
    return f'<p class="na">not available: {esc(why)}</p>'


def para(text: str, cls: str = "") -> str:
    c = f' class="{esc(cls)}"' if cls else ""
    return f"<p{c}>{esc(text)}</p>"


def pre(text: str) -> str:
    return f"<pre>{esc(text)}</pre>"


def details(summary: str, body: str) -> str:
    return f"<details><summary>{esc(summary)}</summary>{body}</details>"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], row_classes: Sequence[str] | None = None,
          cls: str = "", digits: int = 3) -> str:
    """An HTML table; numbers are formatted with :func:`fmt` (``digits`` decimals) and right-aligned, everything
    else escaped."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        rc = row_classes[i] if row_classes and i < len(row_classes) and row_classes[i] else ""
        cells = "".join(f'<td class="num">{esc(fmt(v, digits))}</td>' if _is_number(v) else f"<td>{esc(fmt(v))}</td>"
                        for v in row)
        body.append(f'<tr class="{esc(rc)}">{cells}</tr>' if rc else f"<tr>{cells}</tr>")
    c = f' class="{esc(cls)}"' if cls else ""
    return f"<table{c}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{body}</section>'


def page(title: str, subtitle: str, toc: Sequence[tuple[str, str]], sections: Sequence[str]) -> str:
    """The whole document: inline CSS, a table of contents with in-page anchors, then the sections."""
    links = "".join(f'<li><a href="#{esc(a)}">{esc(t)}</a></li>' for a, t in toc)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
        f'<header class="top"><h1>{esc(title)}</h1><p class="meta">{esc(subtitle)}</p></header>\n'
        f'<nav class="toc"><strong>Contents</strong><ol>{links}</ol></nav>\n'
        + "\n".join(sections)
        + "\n</main>\n</body>\n</html>\n"
    )
