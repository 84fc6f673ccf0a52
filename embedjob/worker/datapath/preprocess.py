"""Stage 3 — preprocess: OpenAI CLIP's reference ``_transform``, bit for bit, without torchvision.

The reference (``clip/clip.py``) is::

    Compose([Resize(224, interpolation=BICUBIC), CenterCrop(224), _convert_image_to_rgb,
             ToTensor(), Normalize(MEAN, STD)])

applied to the PIL image exactly as ``Image.open`` returns it. Reproduced here step by step:

- Resize: the short side becomes 224, the long side ``int(224 * long / short)`` (torchvision's rule),
  with ``PIL.Image.resize(..., BICUBIC)`` on the image in its own mode. Pillow itself resizes "P"
  and "1" images with NEAREST whatever filter is asked, and RGBA/LA premultiplied: that is what the
  reference does, so it is what we do.
- CenterCrop: ``top = int(round((h - 224) / 2.0))``, ``left`` likewise (Python's round: halves to
  even), via ``Image.crop``.
- ``convert("RGB")`` AFTER the crop: alpha is dropped, not composited; palettes are looked up.
- ToTensor + Normalize: ``float32(u8) / 255``, then ``(x - mean) / std`` in float32, channel-first.

Where the reference produces garbage rather than an image, the input is converted first (and then
goes through the exact same path): 16-bit and 32-bit integer images (``I;16*``, ``I`` with values
above 255) are scaled to 8 bits instead of being clipped to white, float images in [0, 1] are
scaled to 0..255, and CIELab is colour-managed to sRGB. Anything Pillow cannot resize or convert at
all goes through the nearest mode that works (RGBA, LA, RGB, L); if none does, a
:class:`PreprocessError` records why.

The split into :func:`reference_crop` (uint8, done in the decode processes) and the normalisation
(float32, done per batch, on the model's device: ``embedjob.worker.model.embedder.normalize_on_device``; or
:func:`normalize` here) keeps queued samples at 150 KB instead of 600 KB and sends 4x fewer bytes to
the device; the arithmetic is the same element by element, so the result is identical.

Torch-free at import: the decode processes import this module and must not pay for torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from embedjob.worker.model.transform import (
    CLIP_ID,
    DEFAULT_TRANSFORM,
    OPENAI_MEAN,
    OPENAI_STD,
    ImageTransform,
    normalize,
)

if TYPE_CHECKING:
    import torch

PREPROCESSING_ID = CLIP_ID  # the default (224 px, OpenAI's mean/std); other sizes: ImageTransform.id
IMAGE_SIZE = DEFAULT_TRANSFORM.crop
MEAN = OPENAI_MEAN
STD = OPENAI_STD

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


class PreprocessError(Exception):
    """An image the transform cannot handle; ``reason`` goes into the manifest."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def resized_size(width: int, height: int, size: int = IMAGE_SIZE) -> tuple[int, int]:
    """torchvision ``Resize(size)`` output (width, height): short side ``size``, long side
    ``int(size * long / short)``."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def center_crop_box(width: int, height: int, size: int = IMAGE_SIZE) -> tuple[int, int, int, int]:
    """torchvision ``CenterCrop(size)`` box (left, top, right, bottom) for an image at least
    ``size`` on both sides (always the case after :func:`resized_size`)."""
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return left, top, left + size, top + size


def _scale_to_l(values: np.ndarray, full_scale: float) -> Image.Image:
    """Map ``0..full_scale`` linearly onto 8-bit grey, rounding to nearest."""
    v = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=full_scale, neginf=0.0)
    v = np.clip(np.rint(v * (255.0 / full_scale)), 0, 255)
    return Image.fromarray(v.astype(np.uint8), mode="L")


def _lab_to_rgb(img: Image.Image) -> Image.Image:
    from PIL import ImageCms

    transform = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
    return ImageCms.applyTransform(img, transform)


def to_reference_mode(img: Image.Image) -> Image.Image:
    """The image unchanged when the reference handles its mode sensibly, else a converted copy (see
    the module docstring). Deterministic: the same input always maps to the same image."""
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        return _scale_to_l(np.asarray(img), 65535.0)
    if mode == "I":
        arr = np.asarray(img)
        if arr.size and arr.max() > 255:  # 16-bit data in a 32-bit container (PGM/TIFF)
            return _scale_to_l(arr, 65535.0)
        return img
    if mode == "F":
        arr = np.asarray(img)
        finite = arr[np.isfinite(arr)]
        if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            return _scale_to_l(arr, 1.0)
        return img
    if mode == "LAB":
        return _lab_to_rgb(img)
    return img


def _reference(img: Image.Image, source_size: tuple[int, int] | None = None,
               transform: ImageTransform = DEFAULT_TRANSFORM) -> np.ndarray:
    if transform.rule == "squash":
        return _squash(img, transform.crop)
    new_size = resized_size(*(source_size or img.size), size=transform.resize)
    if new_size != img.size:
        img = img.resize(new_size, Image.Resampling.BICUBIC)
    box = center_crop_box(*img.size, size=transform.crop)
    if box != (0, 0, *img.size):
        img = img.crop(box)
    rgb = img.convert("RGB")
    return np.array(rgb, dtype=np.uint8)  # a writable copy (torch.as_tensor warns on read-only)


def _squash(img: Image.Image, size: int) -> np.ndarray:
    """Hugging Face's PIL image processor (SigLIP): RGB first, transparency composited on white, then a
    bicubic resize to ``size`` x ``size`` whatever the aspect ratio."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
    else:
        img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return np.array(img, dtype=np.uint8)


def _fallback(img: Image.Image, first: Exception, source_size: tuple[int, int] | None,
              transform: ImageTransform = DEFAULT_TRANSFORM) -> np.ndarray:
    """A mode Pillow cannot resize or convert to RGB directly (e.g. premultiplied "La", which
    converts only to "LA"): go through the nearest mode that works."""
    for mode in ("RGBA", "LA", "RGB", "L"):
        try:
            return _reference(img.convert(mode), source_size, transform)
        except Exception:  # noqa: BLE001, S112 - try the next mode
            continue
    raise PreprocessError(f"cannot preprocess mode {img.mode}: {type(first).__name__}: {first}") from first


def reference_crop(img: Image.Image, source_size: tuple[int, int] | None = None,
                   transform: ImageTransform = DEFAULT_TRANSFORM) -> np.ndarray:
    """Resize + center crop + RGB: a ``[224, 224, 3]`` uint8 array (``[crop, crop, 3]`` for another
    ``transform``: embedjob.worker.model.transform). Raises :class:`PreprocessError`.

    ``source_size``: the size of the image as encoded, when ``img`` was decoded at a reduced scale
    (the fast path's DCT-domain downscale): the resize target follows the original geometry."""
    if img.width <= 0 or img.height <= 0:
        raise PreprocessError(f"invalid image size {img.width}x{img.height}")
    try:
        prepared = to_reference_mode(img)
    except Exception as e:
        raise PreprocessError(f"cannot convert mode {img.mode}: {type(e).__name__}: {e}") from e
    try:
        out = _reference(prepared, source_size, transform)
    except Exception as first:
        out = _fallback(prepared, first, source_size, transform)
    if out.shape != (transform.crop, transform.crop, 3):
        raise PreprocessError(f"unexpected preprocessed shape {out.shape} for mode {img.mode} size {img.size}")
    return out




def preprocess(img: Image.Image, transform: ImageTransform = DEFAULT_TRANSFORM) -> torch.Tensor:
    """The whole reference transform on one image: float32 ``[3, 224, 224]`` (``[3, crop, crop]``)."""
    return normalize(reference_crop(img, transform=transform)[None], mean=transform.mean, std=transform.std)[0]
