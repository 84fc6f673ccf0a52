"""Stage 2 — decode: image bytes -> a fully loaded PIL image, or a recorded reason why not.

Every failure (zero bytes, truncated, corrupt, unsupported format, too many pixels) comes back as a
:class:`DecodeError` with a short reason; the pipeline records it against the sample's key and moves
on, so a bad image never fails the shard and never shifts another image's row.

The pixel limit is checked on the size read from the header, BEFORE the pixels are decoded, so a
decompression bomb costs a few hundred bytes of parsing, not gigabytes of memory.

Only the formats a WebDataset image member can hold are opened (JPEG incl. MPO, PNG, WebP, GIF, BMP,
TIFF): Pillow would otherwise sniff any bytes against every plugin it has, EPS (which shells out to
Ghostscript) included.
"""

from __future__ import annotations

import io
import threading
import warnings

from PIL import Image

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "DIB", "TIFF")

# We enforce our own (configurable) limit before decoding; Pillow's global check would otherwise
# reject images between its limit and ours, and warn about the ones we accept on purpose.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
_limit_lock = threading.Lock()


class DecodeError(Exception):
    """An image that cannot be embedded; ``reason`` goes into the manifest."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _allow_pixels(max_pixels: int) -> None:
    """Raise Pillow's process-wide bomb threshold to at least our limit (it only ever grows), so
    our own check is the one that decides."""
    with _limit_lock:
        current = Image.MAX_IMAGE_PIXELS
        if current is not None and current < max_pixels:
            Image.MAX_IMAGE_PIXELS = max_pixels


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Parse the header of ``data`` (no pixels decoded yet) and check its size against
    ``max_pixels``. Raises :class:`DecodeError`."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    _allow_pixels(max_pixels)
    try:
        img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as e:
        # Pillow's own message names its process-wide threshold, which depends on the largest limit
        # this process has seen: the recorded reason must not.
        raise DecodeError(f"decompression bomb: over twice the limit of {max_pixels} pixels") from e
    except Image.UnidentifiedImageError as e:
        raise DecodeError("not a supported image (unrecognised data)") from e
    except Exception as e:  # a broken header can raise almost anything inside a plugin
        raise DecodeError(f"corrupt image header: {type(e).__name__}: {e}") from e

    width, height = img.size
    if width <= 0 or height <= 0:
        raise DecodeError(f"invalid image size {width}x{height}")
    if width * height > max_pixels:
        raise DecodeError(f"too many pixels: {width}x{height} = {width * height} > limit {max_pixels}")
    return img


def load_image(img: Image.Image) -> Image.Image:
    """Decode the pixels of an image from :func:`open_image`. Raises :class:`DecodeError`."""
    try:
        img.load()
    except Image.DecompressionBombError as e:
        # (as in open_image: Pillow's message depends on this process's history, the reason must not)
        raise DecodeError("decompression bomb: refused by the decoder's pixel limit while decoding") from e
    except Exception as e:
        # Truncation is OSError("image file is truncated ..."); corrupt streams raise OSError,
        # SyntaxError or ValueError depending on the codec.
        raise DecodeError(f"cannot decode {img.format or 'image'}: {type(e).__name__}: {e}") from e
    return img

