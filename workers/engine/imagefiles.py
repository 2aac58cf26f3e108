"""The one way this project opens an image file it did not make: by content, with an explicit list of decoders.

``PIL.Image.open`` alone tries every plugin PIL has on whatever bytes it is given, whatever the file's name:
an EPS file named ``x.png`` reaches the EPS plugin (which runs Ghostscript where it is installed), a TIFF named
``.png`` decodes as a TIFF. Here only the formats a dataset may hold are tried, PIL's process-wide pixel limit
is left as it is (a size check belongs to the caller, read from the header before decoding), and its
decompression-bomb error reads as an image over the size limit.

No torch here: the web process imports it to check uploads.
"""
from __future__ import annotations

import warnings

SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # the file names a dataset's images may have
FORMATS = ("PNG", "JPEG", "WEBP", "BMP")  # the decoders PIL may use on them
FORMAT_NAMES = "PNG, JPEG, WebP or BMP"


class ImageRefused(ValueError):
    """Bytes that are not an image of an accepted format, or one too large to decode."""


def open_image(fp):
    """``PIL.Image.open`` of a path or binary file, trying only FORMATS; raises ImageRefused (a ValueError) for
    anything else. The image is opened lazily, as PIL does: call ``load()`` to decode it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the caller checks the size
            return Image.open(fp, formats=list(FORMATS))
    except UnidentifiedImageError:
        raise ImageRefused(f"not a {FORMAT_NAMES} image") from None
    except Image.DecompressionBombError as exc:
        raise ImageRefused(f"too large to decode ({exc})") from None
