"""Sanitized SVG for the HTML reports.

The reports inline every SVG figure found under the output folder. Before, the markup went in
verbatim: an SVG planted there with ``<script>`` or ``onload=`` ran in the reader's browser.
:func:`sanitize_svg` parses the file as XML and keeps an allow-list of drawing elements and
attributes (what matplotlib, nilearn and niworkflows write); it drops scripts,
``foreignObject``, event handlers (``on*``), references outside the document (``href`` other
than ``#fragment`` or an embedded ``data:image/...``; CSS ``url()`` other than ``url(#...)``;
``@import``), and entity declarations (the DOCTYPE is not copied). What is dropped is counted
in the log. A figure whose ``href`` points at the network or a file is refused as a whole
(``ValueError``: the report shows the error instead of the figure).
"""

from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET

LOGGER = logging.getLogger("bids_siamfuse.reports")

SVG_NS = "http://www.w3.org/2000/svg"
XLINK_NS = "http://www.w3.org/1999/xlink"

#: Drawing elements kept (SVG 1.1 minus script, foreignObject, animation, fonts, cursors).
ALLOWED_ELEMENTS = {
    "svg", "g", "defs", "desc", "title", "metadata", "symbol", "use", "switch",
    "path", "rect", "circle", "ellipse", "line", "polyline", "polygon",
    "text", "tspan", "textPath",
    "image", "clipPath", "mask", "pattern", "marker",
    "linearGradient", "radialGradient", "stop", "style",
    "filter", "feBlend", "feColorMatrix", "feComponentTransfer", "feComposite",
    "feConvolveMatrix", "feDiffuseLighting", "feDisplacementMap", "feFlood", "feFuncA",
    "feFuncB", "feFuncG", "feFuncR", "feGaussianBlur", "feMerge", "feMergeNode",
    "feMorphology", "feOffset", "feSpecularLighting", "feTile", "feTurbulence",
    "feDistantLight", "fePointLight", "feSpotLight",
}  # fmt: skip
#: Metadata vocabularies matplotlib writes inside <metadata> (RDF, Dublin Core, Creative
#: Commons): kept as inert data.
_METADATA_NS = (
    "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "http://purl.org/dc/elements/1.1/",
    "http://creativecommons.org/ns#",
)
_ATTR_NS = ("", XLINK_NS, "http://www.w3.org/XML/1998/namespace", *_METADATA_NS)
_URL = re.compile(r"url\s*\(\s*(['\"]?)\s*(?!#)[^)]*\)", re.I)
_IMPORT = re.compile(r"@import[^;]*;?", re.I)
_SAFE_DATA = re.compile(r"^\s*data:image/(png|jpeg|gif|webp);base64,", re.I)
_ATTR_NAME = re.compile(r"^[A-Za-z_:][-A-Za-z0-9_:.]*$")


def _local(tag: str) -> tuple[str, str]:
    if tag.startswith("{"):
        ns, _, name = tag[1:].partition("}")
        return ns, name
    return "", tag


def _clean_css(text: str) -> str:
    text = _IMPORT.sub("", text)
    return _URL.sub("none", text)


def _safe_href(value: str) -> bool:
    value = value.strip()
    return value.startswith("#") or bool(_SAFE_DATA.match(value))


def sanitize_svg(text: str, *, where: str = "SVG") -> str:
    """The SVG markup with everything active or external removed (see the module doc).

    Raises ``ValueError`` when the text is not an SVG document (unparsable, or its root is not
    ``<svg>``).
    """
    if re.search(r"<!ENTITY", text[:4096], re.I):
        raise ValueError(f"{where}: declares XML entities; not used by any figure writer")
    try:
        root = ET.fromstring(text.encode("utf-8") if isinstance(text, str) else text)
    except ET.ParseError as exc:
        raise ValueError(f"{where}: not a well-formed SVG file ({exc})") from None
    if _local(root.tag) != (SVG_NS, "svg"):
        raise ValueError(f"{where}: not an SVG file (root element {root.tag})")
    dropped: list[str] = []

    def walk(element) -> None:
        for child in list(element):
            if not isinstance(child.tag, str):  # comments, processing instructions
                element.remove(child)
                continue
            ns, name = _local(child.tag)
            inside_metadata = ns in _METADATA_NS
            if not inside_metadata and (ns != SVG_NS or name not in ALLOWED_ELEMENTS):
                dropped.append(f"<{name}>")
                element.remove(child)
                continue
            clean_attributes(child)
            if name == "style" and child.text:
                child.text = _clean_css(child.text)
            walk(child)

    def clean_attributes(element) -> None:
        for key in list(element.attrib):
            ns, name = _local(key)
            value = element.attrib[key]
            lower = name.lower()
            if lower.startswith("on") or not _ATTR_NAME.match(name) or ns not in _ATTR_NS:
                dropped.append(f"@{name}")
                del element.attrib[key]
            elif lower in ("href", "src") and not _safe_href(value):
                if re.match(r"\s*(https?:|//|file:|ftp:)", value, re.I):
                    # a figure that needs the network or another file is not ours: refused
                    raise ValueError(f"{where}: references external resources ({value[:60]})")
                dropped.append(f"@{name}={value[:40]}")
                del element.attrib[key]
            elif lower == "style":
                element.attrib[key] = _clean_css(value)
            elif "url(" in value.lower() and _URL.search(value):
                element.attrib[key] = _URL.sub("none", value)
            elif re.match(r"\s*javascript:", value, re.I):
                dropped.append(f"@{name}")
                del element.attrib[key]

    clean_attributes(root)
    walk(root)
    if dropped:
        LOGGER.warning(
            "%s: removed %d unsafe part(s) before inlining (%s)",
            where,
            len(dropped),
            ", ".join(sorted(set(dropped))[:6]),
        )
    for prefix, uri in (
        ("", SVG_NS),
        ("xlink", XLINK_NS),
        ("rdf", _METADATA_NS[0]),
        ("dc", _METADATA_NS[1]),
        ("cc", _METADATA_NS[2]),
    ):
        ET.register_namespace(prefix, uri)
    return ET.tostring(root, encoding="unicode")
