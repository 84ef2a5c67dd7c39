"""Smaller QC figures, same pixels: the PNGs embedded in reportlet SVGs re-encoded as WebP.

niworkflows/nilearn reportlets are SVGs whose slices are base64 PNG ``<image>`` elements (over
90 % of each file). Lossless WebP holds the same pixels in 2.7-3.2x fewer bytes on the
participant figures (measured: 417 -> 152 KB and 328 -> 104 KB of embedded images in two
figures; lossy WebP at quality 90 and JPEG were *larger* on these flat-background slices), and
every browser the reports support shows WebP. An image is replaced only when WebP is smaller;
anything unreadable is left as it was.
"""

from __future__ import annotations

import base64
import io
import re

_PNG_URI = re.compile(r"data:image/png;base64,\s*([A-Za-z0-9+/=\s]+)")

#: libwebp effort (0 fastest .. 6 smallest); 2 was as small as 6 on the figures, 3x faster
WEBP_METHOD = 2


def png_to_webp(data: bytes) -> bytes | None:
    """Lossless WebP of a PNG, or None when it is not smaller (or WebP is unavailable)."""
    try:
        from PIL import Image, features

        if not features.check("webp"):
            return None
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            out = io.BytesIO()
            img.save(out, format="WEBP", lossless=True, method=WEBP_METHOD)
    except Exception:  # noqa: BLE001 - a figure that cannot be re-encoded stays as it is
        return None
    webp = out.getvalue()
    return webp if len(webp) < len(data) else None


def compress_svg_text(text: str) -> str:
    """``text`` with every embedded PNG that WebP stores in fewer bytes re-encoded."""

    def replace(match: re.Match) -> str:
        try:
            data = base64.b64decode("".join(match.group(1).split()), validate=True)
        except ValueError:
            return match.group(0)
        webp = png_to_webp(data)
        if webp is None:
            return match.group(0)
        return "data:image/webp;base64," + base64.b64encode(webp).decode("ascii")

    return _PNG_URI.sub(replace, text)
