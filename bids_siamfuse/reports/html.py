"""Self-contained HTML: Jinja2 templates from ``bids_siamfuse/data``, assets inlined.

A report is one file: CSS in a ``<style>`` element, figures inline (SVG reportlets as markup,
matplotlib figures as ``data:image/png`` URIs), system fonts only. Nothing is fetched when it is
opened, so reports work offline and can be mailed or archived as they are.
"""

from __future__ import annotations

import base64
import datetime as _dt
import re
from functools import lru_cache
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent.parent / "data"


@lru_cache(maxsize=1)
def environment():
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(
        loader=FileSystemLoader(str(DATA_DIR)),
        autoescape=select_autoescape(["html", "j2"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fmt"] = fmt
    return env


def fmt(value, digits: int = 3) -> str:
    """A number for a table cell (``n/a`` for missing values)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "n/a" if value is None else str(value)
    if number != number:  # NaN
        return "n/a"
    if number.is_integer() and abs(number) < 1e6:
        return str(int(number))
    return f"{number:.{digits}g}" if abs(number) < 1e-3 else f"{number:.{digits}f}"


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


_XML_HEAD = re.compile(r"^\s*(<\?xml[^>]*\?>\s*)?(<!DOCTYPE[^>]*>\s*)?", re.S)


def inline_svg(path: Path):
    """An SVG file's markup, ready to place in HTML (XML prolog and DOCTYPE removed).

    Raises ``ValueError`` when the file does not hold an ``<svg>`` element or references
    anything outside itself (``href`` to http(s) or a file), so a report never fetches.
    """
    from markupsafe import Markup

    text = Path(path).read_text(encoding="utf-8", errors="replace")
    text = _XML_HEAD.sub("", text, count=1)
    if "<svg" not in text[:2000]:
        raise ValueError(f"{path}: not an SVG file")
    from .sanitize import sanitize_svg

    # allow-list sanitizing: no scripts, event handlers, foreignObject or external references
    return Markup(sanitize_svg(text, where=str(path)))


def render(template: str, **context) -> str:
    css = (DATA_DIR / "report.css").read_text()
    from markupsafe import Markup

    from .. import __version__

    return (
        environment()
        .get_template(template)
        .render(
            css=Markup(css),
            version=__version__,
            generated=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            **context,
        )
    )


def write_html(path: Path, text: str) -> Path:
    """Write ``text`` atomically (a reader never sees half a report)."""
    from ..bids import atomic_path

    with atomic_path(Path(path)) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
