"""File extensions for the MIME types cellbox keeps (artifact downloads, the CLI's saved files)."""

from __future__ import annotations

import mimetypes

EXTENSIONS = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/gif": "gif",
    "image/webp": "webp",
    "image/svg+xml": "svg",
    "application/pdf": "pdf",
    "text/html": "html",
    "text/plain": "txt",
    "application/json": "json",
}


def extension_for(mime: str) -> str:
    """``"image/png"`` -> ``"png"``; ``"bin"`` for a type with no known extension."""
    known = EXTENSIONS.get(mime)
    if known:
        return known
    guessed = mimetypes.guess_extension(mime)
    return guessed.lstrip(".") if guessed else "bin"
